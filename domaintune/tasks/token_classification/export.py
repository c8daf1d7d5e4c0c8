"""The export hook of a tagger: a transformers token-classification folder that pipeline() loads, plus
onnx / onnx-int8 variants held to the export gates on entity F1, a model card and checksums
(domaintune/export/tokens.py)."""
from __future__ import annotations

from domaintune.core.stage import StageIO
from domaintune.export.tokens import export_stage


def run(io: StageIO) -> str:
    return export_stage(io)
