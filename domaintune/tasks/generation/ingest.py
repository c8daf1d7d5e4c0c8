"""The ingest hook of prompt -> response data: the prompt is the text, the response the label (no label set,
seeded random splits); chat conversations (ingest.messages_column) become prompt/response rows."""
from __future__ import annotations

import dataclasses

from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.chat import to_columns
from domaintune.data.ingest import ingest_stage


def run(io: StageIO) -> None:
    p, base = load_params(io.params, "ingest", "base")
    p = dataclasses.replace(p, source=io.source).for_prompts()
    prepare = (lambda t: to_columns(t, p.messages_column, p.label_column)) if p.messages_column else None
    ingest_stage(io, p, base.seed, classes=False, prepare=prepare)
