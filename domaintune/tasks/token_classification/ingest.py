"""The ingest hook of a tagger: word-level, CoNLL or span sources -> sentences with IOB2 tags
(domaintune/data/tagged.py)."""
from __future__ import annotations

import dataclasses

from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.tagged import ingest_stage


def run(io: StageIO) -> None:
    p, base = load_params(io.params, "ingest", "base")
    ingest_stage(io, dataclasses.replace(p, source=io.source), base.seed)
