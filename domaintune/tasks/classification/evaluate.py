"""The evaluate hook of a classifier: temperature scaling fitted on validation, accuracy / macro-F1 / ECE
before and after on test, the quality gate, report and plots (domaintune/evaluate/classifier.py)."""
from __future__ import annotations

from domaintune.core.stage import StageIO
from domaintune.evaluate.classifier import evaluate_stage


def run(io: StageIO) -> None:
    evaluate_stage(io)
