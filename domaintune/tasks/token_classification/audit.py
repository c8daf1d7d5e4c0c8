"""The audit hook of a tagger: cleanlab.token_classification on out-of-fold word probabilities of a logistic
regression over frozen encoder embeddings; report or drop flagged sentences (domaintune/evaluate/tokaudit.py)."""
from __future__ import annotations

from domaintune.core.stage import StageIO
from domaintune.evaluate.tokaudit import audit_stage


def run(io: StageIO) -> str:
    return audit_stage(io)
