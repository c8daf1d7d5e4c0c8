"""Calibrated predictions from an exported model: what flows, drift monitoring and serving call.

    from domaintune.predict import Predictor
    p = Predictor.load("models/export")            # or variant="int8"
    probs = p.predict_proba(["my card was charged twice"])   # calibrated, rows sum to 1
    labels = p.predict(["my card was charged twice"])

An exported folder (stages/export.py) carries its calibration in model.json:
`temperature` (single-label: probabilities are softmax(logits / T)) or
`thresholds` (multi-label: per-label sigmoid cut-offs). A folder without them
(e.g. models/finetuned) can be given the evaluate stage's calibration.json.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from domaintune.data import LABEL_SEPARATOR, DataError, read_json

INT8_DIR = "int8"


class Predictor:
    def __init__(self, model, tokenizer, meta: dict, temperature: float = 1.0,
                 thresholds: dict | None = None, batch_size: int = 64):
        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        self.labels: list[str] = list(meta["labels"])
        self.problem_type: str = meta.get("problem_type", "single_label")
        self.max_length = int(meta.get("max_length", 128))
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        thr = thresholds or {}
        self.thresholds = np.array([float(thr.get(lab, 0.5)) for lab in self.labels])
        self.batch_size = batch_size

    @classmethod
    def load(cls, model_dir: str | os.PathLike, variant: str = "float", calibration: str | os.PathLike | None = None,
             dynamic_int8: bool = False, batch_size: int = 64) -> "Predictor":
        """variant 'float' loads model_dir itself; 'int8' loads model_dir/int8 (dequantised weights)."""
        model_dir = Path(model_dir)
        if variant == "float":
            from domaintune.modeling import load_classifier

            model, tok, meta = load_classifier(model_dir)
        elif variant == "int8":
            model, tok, meta = load_int8_classifier(model_dir / INT8_DIR, dynamic=dynamic_int8)
        else:
            raise ValueError(f"variant must be 'float' or 'int8', got {variant!r}")
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
        return cls(model, tok, meta, float(t), cal.get("thresholds"), batch_size)

    def logits(self, texts: Sequence[str], mean_pooled: bool = False):
        """Raw logits; mean_pooled=True also returns the mean-pooled text vectors of the same pass."""
        from domaintune.modeling import predict_logits

        return predict_logits(self.model, self.tokenizer, list(texts), self.batch_size, self.max_length, mean_pooled)

    def proba_from_logits(self, logits: np.ndarray) -> np.ndarray:
        from domaintune.calibration import sigmoid, softmax

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


def load_int8_classifier(int8_dir: str | os.PathLike, dynamic: bool = False):
    """(model, tokenizer, meta) from an export's int8/ folder; same interface as modeling.load_classifier."""
    from domaintune.modeling import assemble_classifier
    from domaintune.quantize import load_int8_encoder

    int8_dir = Path(int8_dir)
    meta = read_json(int8_dir / "model.json")
    enc = load_int8_encoder(int8_dir / "encoder", dynamic=dynamic)
    return (*assemble_classifier(enc, meta, int8_dir), meta)
