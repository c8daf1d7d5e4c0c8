"""A keyed on-disk cache of pooled sentence embeddings.

Embedding every text is the slowest part of the label audit (about 2 minutes
on 2 CPU cores for BANKING77's 13k texts; the cross-validation after it takes
about 1). The cache lets a stage re-run with other params without
re-embedding: it holds

  embeddings.npy   float32 [n, hidden], rows in the order of ids.json
  ids.json         the row ids, so a reuse can be checked row by row
  key.json         what the vectors depend on: a hash of the row ids and texts, the
                   encoder's identity (a fingerprint of its files), max_length
                   and pooling

and is reused only when key.json matches exactly. The arrays are read with
allow_pickle=False, so a tampered cache cannot run code.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from domaintune.core.io import atomic_output, read_json, write_json

# Files that decide what an encoder computes; optimizer states, READMEs etc. do not.
_FINGERPRINT_SUFFIXES = (".safetensors", ".json", ".txt", ".model")


def encoder_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 over the encoder folder's weight, config and tokenizer files (names + bytes).

    A hub name that is not a local folder is fingerprinted by its name only.
    """
    p = Path(path)
    h = hashlib.sha256()
    if not p.is_dir():
        h.update(f"name:{path}".encode())
        return h.hexdigest()
    for f in sorted(x for x in p.rglob("*") if x.is_file() and x.suffix in _FINGERPRINT_SUFFIXES):
        h.update(str(f.relative_to(p)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def load_cached(cache_dir: str | os.PathLike, key: dict, ids: Sequence[str]) -> np.ndarray | None:
    """The cached embeddings when the cache's key and ids match exactly, else None."""
    cache = Path(cache_dir)
    try:
        if read_json(cache / "key.json") != key or read_json(cache / "ids.json") != list(ids):
            return None
        emb = np.load(cache / "embeddings.npy", allow_pickle=False)
    except (FileNotFoundError, json.JSONDecodeError, ValueError, OSError):
        return None  # a missing or corrupt cache is simply recomputed
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        return None
    return emb


def cached_embeddings(cache_dir: str | os.PathLike, key: dict, ids: Sequence[str],
                      compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
    """Return (embeddings, reused). Calls compute() only when the cache does not match key/ids."""
    ids = [str(i) for i in ids]
    emb = load_cached(cache_dir, key, ids)
    if emb is not None:
        return emb, True
    emb = np.ascontiguousarray(compute(), dtype=np.float32)
    if emb.shape[0] != len(ids):
        raise ValueError(f"compute() returned {emb.shape[0]} rows for {len(ids)} ids")
    with atomic_output(cache_dir) as tmp:
        tmp.mkdir()
        np.save(tmp / "embeddings.npy", emb, allow_pickle=False)
        write_json(tmp / "ids.json", ids)
        write_json(tmp / "key.json", key)
    return emb, False
