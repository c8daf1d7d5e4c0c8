"""The ingest hook of a classifier: labels are classes (a label set, stratified splits)."""
from __future__ import annotations

import dataclasses

from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.ingest import ingest_stage


def run(io: StageIO) -> None:
    p, base = load_params(io.params, "ingest", "base")
    # The command line's --source (${ingest.source} in dvc.yaml, so DVC tracks the file) wins.
    ingest_stage(io, dataclasses.replace(p, source=io.source), base.seed, classes=True)
