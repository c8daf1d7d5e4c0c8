"""Opening a causal-LM export for prediction (predict, serve, drift, monitor)."""
from __future__ import annotations

from pathlib import Path

from domaintune.core.errors import DataError
from domaintune.predict.generation import GenerationPredictor


def load(folder: str | Path, variant: str = "float32", batch_size: int = 64, device: str = "cpu",
         calibration: str | Path | None = None, dynamic_int8: bool = False) -> GenerationPredictor:
    if variant not in ("float32", "float", "auto"):
        raise DataError(folder, None, "variant", f"a generation export has one variant, float32 (got {variant!r})")
    if calibration:
        raise DataError(folder, None, "calibration", "a generation export carries its own calibration")
    return GenerationPredictor(folder, batch_size, device)
