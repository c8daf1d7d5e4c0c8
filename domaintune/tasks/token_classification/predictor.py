"""Opening a token-tagger export for prediction (predict, serve, drift, monitor)."""
from __future__ import annotations

from pathlib import Path

from domaintune.core.errors import DataError
from domaintune.export.artifacts import variant_reads, verify_checksums
from domaintune.predict.entities import EntityPredictor


def load(folder: str | Path, variant: str = "float32", batch_size: int = 64, device: str = "cpu",
         calibration: str | Path | None = None, dynamic_int8: bool = False, verify: bool = True,
         max_batch_tokens: int | None = None) -> EntityPredictor:
    """The calibrated tagger of `variant` (float32, onnx, onnx-int8). verify: first check the files that variant
    reads against the export's checksums.json."""
    if calibration:
        raise DataError(folder, None, "calibration", "a token_classification export carries its own temperature")
    if variant == "auto":
        variant = "float32"
    if verify:
        verify_checksums(folder, variant_reads(variant))
    return EntityPredictor(folder, variant, batch_size, device, max_batch_tokens)
