"""The export hook of a classifier: the calibrated model in every variant (export.variants), each verified
against the gates, with a model card (domaintune/export/classifier.py)."""
from __future__ import annotations

from domaintune.core.stage import StageIO
from domaintune.export.classifier import export_stage


def run(io: StageIO) -> None:
    export_stage(io)
