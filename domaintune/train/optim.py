"""Optimiser settings (weight-decay groups, LR schedules) that DAPT, fine-tuning and SFT share, so all follow
one rule."""
from __future__ import annotations

import math

_NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm", "layernorm")


def no_weight_decay(name: str) -> bool:
    """Biases and LayerNorm gains: decaying them just pulls them to 0."""
    return any(k in name for k in _NO_DECAY)


def lr_schedule(kind: str, warmup: int, total: int):
    """LR multiplier per step: linear warm-up, then constant, linear or cosine decay to 0."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(1.0, progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)
    return f
