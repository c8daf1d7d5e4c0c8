"""The evaluate hook of a tagger: seqeval strict entity P/R/F1 (micro, per type), token accuracy, temperature
scaling of word probabilities with ECE before/after, error tables, evaluate.gate on entity F1
(domaintune/evaluate/entities.py)."""
from __future__ import annotations

from domaintune.core.stage import StageIO
from domaintune.evaluate.entities import evaluate_stage


def run(io: StageIO) -> str:
    return evaluate_stage(io)
