"""The one run key: which resumable checkpoint a training run (DAPT, fine-tuning, SFT) may continue from.

A key hashes the stage's params section without the launch settings (LAUNCH: a run may resume under another
process count, node layout, rendezvous or checkpoint interval), what the run reads (data hash, corpus texts,
max_length, seed, ...) and the start weights' fingerprint (config, safetensors and tokenizer files). Anything
else different gives another key, so a run never picks up a stale checkpoint.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from domaintune.core.params import as_dict
from domaintune.modeling.embeddings import encoder_fingerprint

LAUNCH = ("processes", "nnodes", "node_rank", "rdzv_endpoint", "checkpoint_every")  # may differ on resume


def run_key(section: str, params: Any, weights: str, texts: Iterable[str] = (), **reads: Any) -> str:
    """16 hex digits of sha256 over params.<section> less LAUNCH, `reads` (JSON-able), every text of `texts`
    (streamed: a corpus is never joined) and the fingerprint of the weights folder `weights`."""
    kept = {k: v for k, v in as_dict(params).items() if k not in LAUNCH}
    h = hashlib.sha256(json.dumps({section: kept, **reads}, sort_keys=True).encode())
    for t in texts:
        h.update(t.encode() + b"\0")
    h.update(encoder_fingerprint(weights).encode())
    return h.hexdigest()[:16]
