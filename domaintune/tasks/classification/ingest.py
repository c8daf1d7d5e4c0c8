"""The ingest hook of a classifier: labels are classes (a label set, stratified splits). Its metrics add the
texts' lengths in the model's tokens (modeling.chunks.length_stats), per split and over all: how much
base.max_length cuts, and whether base.long_text head_tail or chunks is worth it."""
from __future__ import annotations

import dataclasses
import logging

from domaintune.core.params import BaseParams, load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import SPLITS
from domaintune.data.ingest import ingest_stage
from domaintune.modeling.chunks import length_stats
from domaintune.modeling.encoders import load_tokenizer, resolve_model

log = logging.getLogger("domaintune")


def length_report(base: BaseParams):
    """report(split tables) -> {"length_tokens": {all: ..., per split: ...}} in base.model's tokens."""

    def report(tables: dict) -> dict:
        tok = load_tokenizer(resolve_model(base.model))
        parts = {s: [c.to_pylist() for c in tables[s].column("text").chunks] for s in SPLITS if s in tables}
        out = {"all": length_stats(tok, [c for s in parts for c in parts[s]], base.max_length)}
        out.update({s: length_stats(tok, parts[s], base.max_length) for s in parts})
        a = out["all"]
        if a["texts"]:
            log.info("text length in tokens: p50 %.0f, p95 %.0f, max %d; %.1f%% longer than base.max_length %d "
                     "(base.long_text %s)", a["p50"], a["p95"], a["max"], 100 * a["share_over_max_length"],
                     base.max_length, base.long_text)
        return {"length_tokens": {**out, "note": "content tokens of base.model's tokenizer (special tokens not "
                                  "counted); share_over_max_length: texts longer than one window of "
                                  "base.max_length, which base.long_text truncate cuts"}}

    return report


def run(io: StageIO) -> None:
    p, base = load_params(io.params, "ingest", "base")
    # The command line's --source (${ingest.source} in dvc.yaml, so DVC tracks the file) wins.
    ingest_stage(io, dataclasses.replace(p, source=io.source), base.seed, classes=True, report=length_report(base))
