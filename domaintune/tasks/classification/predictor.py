"""Opening a classifier export for prediction (predict, serve, drift, monitor)."""
from __future__ import annotations

from pathlib import Path

from domaintune.core import device as devices
from domaintune.export.artifacts import variant_reads, verify_checksums
from domaintune.export.variants import AUTO, REPORT, resolve_variant
from domaintune.predict.predictor import Predictor


def load(folder: str | Path, variant: str = "float32", batch_size: int = 64, device: str = "cpu",
         calibration: str | Path | None = None, dynamic_int8: bool = False, verify: bool = True,
         max_batch_tokens: int | None = devices.MAX_BATCH_TOKENS) -> Predictor:
    """The calibrated classifier of `variant` (auto: the fastest that passed its gates, resolved first from the
    export's recorded speeds; predictor.variant_choice says which and why); a PyTorch variant moves to `device`
    (ONNX runs where onnxruntime runs it). verify: first check the files that variant reads against the export's
    checksums.json (a changed or missing file is a DataError naming it). batch_size, max_batch_tokens: the most texts
    and the token budget of one model call (Predictor)."""
    if verify and variant == AUTO:  # the record auto chooses by is checked before it is trusted
        verify_checksums(folder, lambda rel: rel == REPORT)
    choice = resolve_variant(folder, variant)
    if verify:
        verify_checksums(folder, variant_reads(choice.variant))
    predictor = Predictor.load(folder, variant=choice.variant, calibration=calibration, dynamic_int8=dynamic_int8,
                               batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    predictor.variant_choice = choice
    if predictor.model is not None:
        devices.place_for_inference(predictor.model, device)
    return predictor
