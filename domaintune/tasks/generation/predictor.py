"""Opening a causal-LM export for prediction (predict, serve, drift, monitor)."""
from __future__ import annotations

from pathlib import Path

from domaintune.core.errors import DataError
from domaintune.export.artifacts import WRITTEN_BY, verify_checksums
from domaintune.modeling.encoders import MODEL_WEIGHTS, check_safetensors
from domaintune.predict.generation import GenerationPredictor

# What transformers reads from a generation export, besides the weights (MODEL_WEIGHTS).
PARTS = ("config.json", "tokenizer_config.json")


def load(folder: str | Path, variant: str = "float32", batch_size: int = 64, device: str = "cpu",
         calibration: str | Path | None = None, dynamic_int8: bool = False,
         verify: bool = True) -> GenerationPredictor:
    """The export's causal LM. verify: first check every file against the export's checksums.json."""
    if variant not in ("float32", "float", "auto"):
        raise DataError(folder, None, "variant", f"a generation export has one variant, float32 (got {variant!r})")
    if calibration:
        raise DataError(folder, None, "calibration", "a generation export carries its own calibration")
    folder = Path(folder)
    if verify:
        verify_checksums(folder)
    for part in PARTS:
        if not (folder / part).is_file():
            raise DataError(folder / part, None, None, f"missing; {WRITTEN_BY}")
    check_safetensors(folder, MODEL_WEIGHTS, WRITTEN_BY)
    return GenerationPredictor(folder, batch_size, device)
