"""Calibrated predictions from an exported model: what flows, drift monitoring and serving call.

    from domaintune.predict.predictor import Predictor
    p = Predictor.load("models/export")            # or variant="int8", "onnx", "onnx-int8", "openvino-int8",
                                                   # or "auto": the fastest that passed its gates (p.variant_choice)
    probs = p.predict_proba(["my card was charged twice"])   # calibrated, rows sum to 1, in request order
    # batches: sorted by token length, <= batch_size texts, (longest x texts) <= max_batch_tokens (Predictor.load)
    labels = p.predict(["my card was charged twice"])
    # one row per text, whatever its length: a model trained with base.long_text chunks reads a long document
    # as windows of max_length tokens and pools them (model.json long_text; modeling/chunks.py)

An exported folder (stages/export.py) carries its calibration in model.json:
`temperature` (single-label: probabilities are softmax(logits / T)) or
`thresholds` (multi-label: per-label sigmoid cut-offs). A folder without them
(e.g. models/finetuned) can be given the evaluate stage's calibration.json.
With evaluate.abstain on, model.json's `abstain` (and abstain.safetensors beside it, for Mahalanobis) is applied
after the calibration, one post-processing step on the same pass's logits (and text vectors):

    probs, abstained = p.predict_with_abstention(texts)   # abstained: bool per text, None without abstention
    labels = p.labels_with_abstention(probs, abstained)    # p.abstainer.label ("out_of_scope") where abstained
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from domaintune.core.device import MAX_BATCH_TOKENS
from domaintune.core.errors import DataError
from domaintune.core.io import read_json
from domaintune.data.dataset import LABEL_SEPARATOR
from domaintune.evaluate.abstain import Abstainer
from domaintune.evaluate.calibration import sigmoid, softmax
from domaintune.export.artifacts import load_variant
from domaintune.export.variants import VariantChoice, resolve_variant
from domaintune.modeling.chunks import LongText


class Predictor:
    def __init__(self, runner, meta: dict, temperature: float = 1.0, thresholds: dict | None = None,
                 batch_size: int = 64, variant: str = "float32", max_batch_tokens: int | None = MAX_BATCH_TOKENS):
        self.runner, self.meta, self.variant = runner, meta, variant
        self.model, self.tokenizer = runner.model, runner.tokenizer  # model is None for ONNX variants
        self.labels: list[str] = list(meta["labels"])
        self.problem_type: str = meta.get("problem_type", "single_label")
        self.max_length = int(meta.get("max_length", 128))
        # Documents longer than max_length: the model's own long_text (model.json; modeling/chunks.py). Under
        # chunks each document runs as its windows and comes back as one row (pooled logits).
        self.long_text = LongText.from_meta(meta)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        thr = thresholds or {}
        self.thresholds = np.array([float(thr.get(lab, 0.5)) for lab in self.labels])
        # Texts run sorted by token length in batches of at most `batch_size` texts whose (longest text) x (texts)
        # stays within `max_batch_tokens` (modeling.encoders.TokenBatches; None: by count alone); answers come
        # back in request order.
        if batch_size < 1 or (max_batch_tokens is not None and max_batch_tokens < 1):
            raise ValueError(f"batch_size and max_batch_tokens must be >= 1, got {batch_size}, {max_batch_tokens}")
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.variant_choice = VariantChoice(variant, variant)  # Predictor.load: how the variant was chosen
        self.abstainer: Abstainer | None = None  # evaluate.abstain (set by load); None: every text gets a label

    @classmethod
    def load(cls, model_dir: str | os.PathLike, variant: str = "float32",
             calibration: str | os.PathLike | None = None, dynamic_int8: bool = False,
             batch_size: int = 64, max_batch_tokens: int | None = MAX_BATCH_TOKENS) -> "Predictor":
        """variant: float32 (alias float), int8, onnx, onnx-int8 or openvino-int8 (export.variants.VARIANTS), or
        auto: the fastest that passed its gates as the export stage measured them (export.variants.resolve_variant;
        float32 for an export without speeds); self.variant is the one loaded, self.variant_choice says why.
        batch_size: the most texts per model call; max_batch_tokens: the token budget of one call (see __init__)."""

        model_dir = Path(model_dir)
        choice = resolve_variant(model_dir, variant)
        variant = choice.variant
        runner, meta = load_variant(model_dir, variant, dynamic_int8=dynamic_int8)
        cal = meta  # an exported model.json carries temperature/thresholds itself
        if calibration:
            path = Path(calibration)
            cal = read_json(path / "calibration.json" if path.is_dir() else path)
        if calibration and cal.get("labels") and list(cal["labels"]) != list(meta["labels"]):
            raise ValueError(f"{calibration}: calibration was fitted for labels {cal['labels']}, "
                             f"model has {meta['labels']}")
        t = cal.get("temperature")
        t = 1.0 if t is None else t  # uncalibrated (e.g. finetune's own folder)
        source = calibration or model_dir / "model.json"
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise DataError(source, None, "temperature", f"must be a positive number, got {t!r}")
        out = cls(runner, meta, float(t), cal.get("thresholds"), batch_size, variant, max_batch_tokens)
        out.variant_choice = choice
        if out.problem_type == "single_label":
            folder = Path(calibration) if calibration else model_dir
            out.abstainer = Abstainer.from_json(cal.get("abstain"), folder if folder.is_dir() else folder.parent,
                                                source)
        return out

    def logits(self, texts: Sequence[str], mean_pooled: bool = False):
        """Raw logits; mean_pooled=True also returns the mean-pooled text vectors of the same pass (torch only)."""
        return self.runner.logits(list(texts), self.batch_size, self.max_length, mean_pooled,
                                  max_batch_tokens=self.max_batch_tokens, long_text=self.long_text)

    def proba_from_logits(self, logits: np.ndarray) -> np.ndarray:
        if self.problem_type == "multi_label":
            return sigmoid(logits)
        return softmax(logits, self.temperature)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Calibrated probabilities [n, num_labels] (columns in self.labels order)."""
        return self.proba_from_logits(self.logits(texts))

    def predict(self, texts: Sequence[str]) -> list[str]:
        """Label names; multi-label predictions are the labels over their thresholds, joined by LABEL_SEPARATOR."""
        return self.labels_from_proba(self.predict_proba(texts))

    def labels_from_proba(self, probs: np.ndarray) -> list[str]:
        if self.problem_type == "multi_label":
            return [LABEL_SEPARATOR.join(lab for lab, on in zip(self.labels, row) if on)
                    for row in probs >= self.thresholds]
        return [self.labels[i] for i in probs.argmax(axis=1)]

    def predict_with_abstention(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(calibrated probabilities, abstained per text) from one pass; abstained is None without abstention."""
        if self.abstainer is None:
            return self.predict_proba(texts), None
        if self.abstainer.needs_features:
            logits, vectors = self.logits(texts, mean_pooled=True)
        else:
            logits, vectors = self.logits(texts), None
        return self.proba_from_logits(logits), self.abstained(logits, vectors)

    def abstained(self, logits: np.ndarray, vectors: np.ndarray | None = None) -> np.ndarray | None:
        """The post-processing step of abstention on a pass's logits (and mean-pooled vectors): True where the
        model answers self.abstainer.label; None without abstention."""
        return None if self.abstainer is None else self.abstainer.abstained(logits, vectors)

    def labels_with_abstention(self, probs: np.ndarray, abstained: np.ndarray | None) -> list[str]:
        labels = self.labels_from_proba(probs)
        if abstained is None:
            return labels
        return [self.abstainer.label if a else lab for lab, a in zip(labels, abstained)]

    def top_k(self, probs: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The k most probable labels of each row, highest first, with their calibrated probabilities."""
        k = max(1, min(int(k), len(self.labels)))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]
