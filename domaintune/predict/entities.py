"""Entities from an exported token tagger (base.task token_classification): what predict, serve and drift call.

    from domaintune.tasks import load_predictor
    p = load_predictor("models/export")                 # or variant="onnx", "onnx-int8"
    p.entities(["Order 1234 for the Acme X200 arrived on 3 May"])
    # [[{"start": 6, "end": 10, "text": "1234", "label": "order_id", "score": 0.97}, ...]]

The text is cut into words by the tokenizer's own pre-tokenizer (as transformers' pipeline does); each word's
tag is its first sub-word's argmax (as in training), its probability that softmax at the export's temperature
(fitted on validation words by the evaluate stage). Entities are grouped as the pipeline groups them
(data/tokens.lenient_entities: B-X opens one, I-X continues an X); an entity's score is the mean calibrated
probability of its words' tags. Words past max_length tokens are not tagged.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from domaintune.core.errors import DataError
from domaintune.core.io import read_json
from domaintune.data.tokens import lenient_entities
from domaintune.evaluate.calibration import softmax
from domaintune.export.artifacts import ONNX_FILE
from domaintune.export.tokens import INFO, onnx_runner
from domaintune.export.variants import canonical_variant
from domaintune.modeling.encoders import MODEL_WEIGHTS, check_safetensors, load_tokenizer
from domaintune.modeling.tagger import torch_runner, word_logits

NO_ENTITY = "(no entity)"  # drift's label for a text with no entity


class EntityPredictor:
    task = "token_classification"
    problem_type = "token_classification"

    def __init__(self, folder: str | Path, variant: str = "float32", batch_size: int = 64, device: str = "cpu",
                 max_batch_tokens: int | None = None):
        folder = Path(folder)
        info = read_json(folder / INFO)
        self.folder, self.info, self.variant = folder, info, canonical_variant(variant)
        self.tags: list[str] = list(info["tags"])
        self.entity_types: list[str] = list(info["entity_types"])
        self.labels: list[str] = self.entity_types + [NO_ENTITY]  # drift's label mix: each text's main entity type
        self.temperature = float(info.get("temperature") or 1.0)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise DataError(folder / INFO, None, "temperature", f"must be a positive number, got {self.temperature}")
        self.max_length = int(info["max_length"])
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.tokenizer = load_tokenizer(str(folder))
        if self.variant == "float32":
            from transformers import AutoModelForTokenClassification

            check_safetensors(folder, MODEL_WEIGHTS, "re-run the export stage")
            self.model = AutoModelForTokenClassification.from_pretrained(folder, use_safetensors=True).eval().to(device)
            self.run = torch_runner(self.model, device)
        elif self.variant in ("onnx", "onnx-int8"):
            path = folder / self.variant / ONNX_FILE
            if not path.is_file():
                why = info.get("variants_refused", {}).get(self.variant)
                raise DataError(path, None, None, f"missing: the export has no {self.variant} variant ("
                                + (f"refused by the export gates: {why}" if why else "export.variants") + ")")
            self.model = None
            self.run = onnx_runner(path)
        else:
            raise DataError(folder, None, "variant", f"a token_classification export has float32, onnx and onnx-int8, "
                            f"not {variant!r}")

    def word_probs(self, texts: Sequence[str]):
        """(word offsets, calibrated tag probabilities [words, tags], kept) per text."""
        wl = word_logits(self.run, self.tokenizer, list(texts), len(self.tags), self.max_length, self.batch_size,
                         words=False, max_batch_tokens=self.max_batch_tokens)
        return [(off, softmax(lg, self.temperature) if len(lg) else lg, kept)
                for off, lg, kept in zip(wl.offsets, wl.logits, wl.kept)]

    def entities(self, texts: Sequence[str]) -> list[list[dict]]:
        """Per text: its entities as {start, end, text, label, score} (character offsets, calibrated score)."""
        texts = list(texts)
        out = []
        o = self.tags.index("O")
        for text, (off, probs, kept) in zip(texts, self.word_probs(texts)):
            idx = np.where(kept, probs.argmax(1) if len(probs) else np.zeros(0, int), o)
            tags = [self.tags[k] for k in idx]
            conf = probs.max(1) if len(probs) else np.zeros(0)
            ents = []
            for typ, a, b in lenient_entities(tags):
                s, e = off[a][0], off[b - 1][1]
                ents.append({"start": int(s), "end": int(e), "text": text[s:e], "label": typ,
                             "score": round(float(conf[a:b].mean()), 6)})
            out.append(ents)
        return out

    # ---- the classifier-shaped view drift and monitor read (domaintune/monitor/drift.py)
    confidence_explanation = ("mean calibrated probability of the predicted tag over the text's words (falls when "
                              "the tagger is less sure of its tags)")

    def logits(self, texts: Sequence[str], mean_pooled: bool = False):
        """Per text a distribution over the entity types + NO_ENTITY: the type of its most confident entity
        (NO_ENTITY when it has none) holds the text's mean word confidence, the other columns share the rest
        evenly; with mean_pooled, the mean-pooled last hidden state too (float32 variant only). drift's label
        mix is then the entity-type mix, its confidence the tagger's word confidence."""
        texts = list(texts)
        labels = self.labels
        out = np.zeros((len(texts), len(labels)), dtype=np.float64)
        o = self.tags.index("O")
        for i, (_, probs, kept) in enumerate(self.word_probs(texts)):
            if not len(probs):
                out[i] = 1.0 / len(labels)
                continue
            idx = np.where(kept, probs.argmax(1), o)
            conf = probs.max(1)
            ents = lenient_entities([self.tags[k] for k in idx])
            top = max(ents, key=lambda e: conf[e[1]:e[2]].mean())[0] if ents else NO_ENTITY
            c = float(conf[kept].mean()) if kept.any() else 1.0 / len(labels)
            out[i] = (1.0 - c) / max(len(labels) - 1, 1)
            out[i, labels.index(top)] = c
        if not mean_pooled:
            return out
        return out, self.embeddings(texts)

    def embeddings(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if self.model is None:
            raise DataError(self.folder, None, "variant", "text embeddings need the float32 variant")
        hidden = self.model.config.hidden_size
        emb = np.zeros((len(texts), hidden), dtype=np.float32)
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            ids = enc["input_ids"][start:start + self.batch_size]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for j, x in enumerate(ids):
                input_ids[j, :len(x)] = torch.tensor(x)
                mask[j, :len(x)] = 1
            with torch.inference_mode():
                h = self.model.base_model(input_ids=input_ids.to(device),
                                          attention_mask=mask.to(device)).last_hidden_state
            m = mask.to(device).unsqueeze(-1).to(h.dtype)
            emb[start:start + len(ids)] = ((h * m).sum(1) / m.sum(1).clamp(min=1e-9)).float().cpu().numpy()
        return emb

    def proba_from_logits(self, logits: np.ndarray) -> np.ndarray:
        return logits  # logits() already gives the calibrated per-text distribution

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.logits(texts)

    def labels_from_proba(self, probs: np.ndarray) -> list[str]:
        labels = self.labels
        return [labels[i] for i in probs.argmax(axis=1)]
