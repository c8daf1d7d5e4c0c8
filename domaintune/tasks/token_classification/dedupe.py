"""The dedupe hook of a tagger: keyed on the sentence text (the same text tagged two ways is a conflict,
settled by dedupe.conflict_policy); the tag set (labels.json) passes through."""
from __future__ import annotations

from domaintune.core.stage import StageIO
from domaintune.data.dedupe import dedupe_stage


def run(io: StageIO) -> None:
    dedupe_stage(io, classes=False, keep_labels=True)
