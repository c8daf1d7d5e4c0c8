"""The dedupe hook (a class emptied from train stops the stage)."""
from __future__ import annotations

from domaintune.core.stage import StageIO
from domaintune.data.dedupe import dedupe_stage


def run(io: StageIO) -> None:
    dedupe_stage(io, classes=True)
