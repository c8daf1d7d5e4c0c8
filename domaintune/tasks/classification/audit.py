"""The audit hook of a classifier: cleanlab's label audit on out-of-sample probabilities of a cheap model
over frozen embeddings (domaintune/evaluate/audit.py)."""
from __future__ import annotations

from domaintune.core.stage import StageIO
from domaintune.evaluate.audit import audit_stage


def run(io: StageIO) -> None:
    audit_stage(io)
