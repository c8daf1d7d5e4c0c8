"""Keeping a warm-started model near where it started: L2-SP and EWC penalties added to the training loss.

    l2sp  strength/2 * sum_i (w_i - w0_i)^2        (Li et al. 2018, "Explicit inductive bias for transfer
                                                    learning"): L2 towards the start weights, not towards 0
    ewc   strength/2 * sum_i F_i (w_i - w0_i)^2    (Kirkpatrick et al. 2017): F the diagonal Fisher of the
                                                    previous model on the previous version's training data

w0 are the start weights (the warm-start version's encoder, or the base encoder), over the encoder's
trainable weights (methods full and freeze); the head is left out: its rows change meaning when labels come
and go. The Fisher is the empirical one, estimated per mini-batch as Avalanche and the EWC reference
implementations do (squared gradient of the batch's mean loss, averaged over batches), normalised so its
mean is 1: `regularize_strength` then means the same for l2sp and ewc (ewc spends it where the previous
task was sensitive). Both penalties are exactly 0 at the start weights.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("domaintune.regularize")


class Penalty:
    """strength/2 * sum F (w - w0)^2 over named parameters; F = 1 everywhere for L2-SP."""

    def __init__(self, kind: str, strength: float, params: dict, fisher: Optional[dict] = None):
        import torch

        self.kind, self.strength = kind, float(strength)
        self.params = params  # name -> the live parameter
        self.start = {n: p.detach().clone() for n, p in params.items()}
        self.fisher = fisher
        if kind == "ewc" and fisher is None:
            raise ValueError("ewc needs a Fisher")
        self._zero = torch.zeros(())

    def __call__(self) -> "object":
        import torch

        total = None
        for n, p in self.params.items():
            d = (p.float() - self.start[n].float()) ** 2
            if self.fisher is not None:
                d = d * self.fisher[n]
            term = d.sum()
            total = term if total is None else total + term
        if total is None:
            return self._zero
        return torch.as_tensor(0.5 * self.strength) * total

    def info(self) -> dict:
        out = {"kind": self.kind, "strength": self.strength, "tensors": len(self.params),
               "weights": int(sum(p.numel() for p in self.params.values()))}
        if self.fisher is not None:
            out["fisher_max"] = float(max(float(f.max()) for f in self.fisher.values()))
        return out


def encoder_params(model) -> dict:
    """The encoder's trainable weights by name (what the penalties pull back)."""
    return {f"encoder.{n}": p for n, p in model.encoder.named_parameters() if p.requires_grad}


def diagonal_fisher(model, tokenizer, texts: Sequence[str], y: np.ndarray, names: Sequence[str],
                    batch_size: int = 16, max_length: int = 128, device: str = "cpu") -> dict:
    """Empirical diagonal Fisher of `model` (an EncoderClassifier at the start weights, with its own head) on
    (texts, y): per mini-batch, the squared gradient of the mean cross-entropy, averaged over batches, then
    scaled to mean 1 over all entries. Keys as encoder_params: `names` picks them."""
    import torch
    import torch.nn.functional as F

    wanted = {n: p for n, p in model.named_parameters() if n in set(names)}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad = n in wanted
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in wanted.items()}
    texts = list(texts)
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it predicts
    batches = 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        target = torch.from_numpy(np.asarray(y[start:start + batch_size])).to(device)
        F.cross_entropy(logits.float(), target).backward()
        for n, p in wanted.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float() ** 2
        batches += 1
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad = saved[n]
    model.train(was_training)
    total = sum(float(f.sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    mean = total / max(1, batches) / max(1, count)
    scale = 1.0 / (max(1, batches) * mean) if mean > 0 else 0.0
    return {n: f * scale for n, f in fisher.items()}
