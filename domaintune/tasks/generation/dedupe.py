"""The dedupe hook (prompt -> response rows: the key is the prompt, no label set to keep whole)."""
from __future__ import annotations

from domaintune.core.stage import StageIO
from domaintune.data.dedupe import dedupe_stage


def run(io: StageIO) -> None:
    dedupe_stage(io, classes=False)
