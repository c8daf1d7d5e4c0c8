"""A causal-LM export behind the Predictor interface: prompt familiarity, hidden-state embeddings, generation."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from domaintune.modeling import llm

FAMILIARITY = ("prompt familiarity: the model's geometric-mean probability of the rendered prompt's tokens "
               "(lower: the prompts read less like what it was tuned on)")



def prompt_outputs(model, tok, prompts: Sequence[str], batch_size: int, max_length: int):
    """(mean NLL of each rendered prompt's tokens [m], mean last hidden state [m, hidden]) in one forward pass
    per batch. Padding is on the right; each prompt is cut to max_length tokens."""
    import torch
    import torch.nn.functional as F

    nll_rows, emb_rows = [], []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            texts = [llm.prompt_text(tok, p) for p in prompts[i: i + batch_size]]
            enc = tok(texts, add_special_tokens=False, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(model.device)
            out = model(**enc, output_hidden_states=True, use_cache=False)
            mask = enc["attention_mask"]
            h, m = out.hidden_states[-1].float(), mask.unsqueeze(-1).float()
            emb_rows.append(((h * m).sum(1) / m.sum(1)).cpu().numpy())
            nll = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), enc["input_ids"][:, 1:], reduction="none")
            tgt = mask[:, 1:].float()
            nll_rows.append(((nll * tgt).sum(1) / tgt.sum(1).clamp(min=1)).cpu().numpy())
    hidden = model.config.hidden_size
    return (np.concatenate(nll_rows) if nll_rows else np.zeros(0),
            np.concatenate(emb_rows).astype(np.float64) if emb_rows else np.zeros((0, hidden)))



class GenerationPredictor:
    """A causal LM export with the attributes and methods drift.Baseline / drift.build_baseline / monitoring
    call on a classifier's Predictor.

    Without a label set its "logits" are log-familiarities [m, 1], its "probabilities" familiarities, and it
    has no labels. With the label set the export recorded (evaluate.label_set: classification as generation)
    it is a single-label classifier: logits are each label's log-likelihood as the response (llm.label_loglik),
    probabilities their softmax at the temperature evaluate fitted, so the verdict also tests the predicted-label
    mix and estimates accuracy (CBPE) exactly as for a classifier."""

    def __init__(self, model_dir: str | Path, batch_size: int = 64, device: str = "cpu"):
        from domaintune.core.io import read_json
        from domaintune.modeling.causal import load_causal_lm

        model, self.tokenizer = load_causal_lm(str(model_dir))
        self.model = model.to(device).eval()
        self.batch_size = batch_size
        path = Path(model_dir) / "export_info.json"
        info = read_json(path) if path.is_file() else {}
        # prompts are cut where training cut them (base.max_length, recorded by the export stage)
        self.max_length = int(info.get("max_length") or min(getattr(model.config, "max_position_embeddings", 512)
                                                             or 512, 512))
        cls = info.get("classification") or {}
        self.labels = list(cls.get("labels") or [])
        self.temperature = float(cls.get("temperature") or 1.0)
        self.problem_type = "single_label" if self.labels else "generation"
        if not self.labels:
            self.confidence_explanation = FAMILIARITY

    def logits(self, texts: Sequence[str], mean_pooled: bool = False):
        nll, emb = prompt_outputs(self.model, self.tokenizer, list(texts), self.batch_size, self.max_length)
        if not self.labels:
            return (-nll)[:, None], emb
        return llm.label_loglik(self.model, self.tokenizer, list(texts), self.labels, self.max_length,
                                self.batch_size), emb

    def proba_from_logits(self, logits: np.ndarray) -> np.ndarray:
        if not self.labels:
            return np.exp(np.asarray(logits, dtype=np.float64))
        from domaintune.evaluate.calibration import softmax

        return softmax(logits, self.temperature)

    def labels_from_proba(self, probs: np.ndarray) -> list[str]:
        if not self.labels:
            return [""] * len(probs)
        return [self.labels[i] for i in np.asarray(probs).argmax(axis=1)]



def is_generation_export(model_dir: str | Path) -> bool:
    """An export folder of base.task generation (genexport.run_export writes export_info.json with the task)."""
    from domaintune.core.io import read_json

    info = Path(model_dir) / "export_info.json"
    return not (Path(model_dir) / "model.json").exists() and info.is_file() and \
        read_json(info).get("task") == "generation"

