"""The prediction log: every classifier prediction `serve` and `predict` make, one JSONL line per text and version,
bounded and rotated; `domaintune feedback` reads it back to score each version on delayed labels.

A line:
    {"id": "3f2a...", "time": "2025-01-01T12:00:00.000+00:00", "source": "serve", "role": "served",
     "version": "v1.2.0", "variant": "onnx-int8", "label": "refund", "confidence": 0.91,
     "probabilities": {"refund": 0.91, "parcel": 0.06, ...}, "text_sha256": "..."}
- id: the request's own id for the text (serve: the client's `ids`, else a uuid4 the response returns; predict:
  the row's id column, or `<input sha256[:12]>:<row>` for a row without one, the monitor review queue's scheme)
- role: "served" (the answer the client got) or "shadow" (`serve --shadow`: the candidate's answer on the same
  text, a line of its own under the same id and its own version; "predict" for `domaintune predict`)
- version: the registry version ("v1.2.0"), "workspace" for the project's unversioned models/export, or
  "dir:<folder>" for another folder
- variant: the export variant that answered (--variant auto resolved: "onnx-int8", "openvino-int8", ...)
- probabilities: the calibrated probability of every label of the model (its label set)
- the text as the `log_text` setting says (text_fields): "hash" (default) its SHA-256 as "text_sha256",
  "plain" the text as "text", "none" neither; predict lines also carry "input_sha256" (the input file's hash).
Lines are appended a batch at a time (one write, flushed) under a thread lock and an flock on `<log>.lock`, so
threads and processes sharing a log never interleave; before a batch that would take the file over `max_bytes`
it is rotated like logging.handlers.RotatingFileHandler: <log> -> <log>.1 -> ... -> <log>.<backups>, the oldest
dropped, so the log never holds more than about (backups + 1) x max_bytes.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from domaintune.core.errors import DataError
from domaintune.core.io import json_lines

LOG_TEXT = ("hash", "plain", "none")  # how a log stores request text (serve's --log-text)
MAX_BYTES = 50 << 20                  # a log file is rotated before it passes this
BACKUPS = 5                           # rotated files kept (<log>.1 newest ... <log>.5 oldest)
ROLES = ("served", "shadow", "predict")


def text_fields(text: str, how: str) -> dict:
    """The log fields of one request text under the `log_text` setting."""
    if how == "plain":
        return {"text": text}
    if how == "hash":
        return {"text_sha256": text_sha256(text)}
    return {}


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def records(ids: list[str], texts: list[str], version: str, labels: list[str], probs, decided: list[str], *,
            role: str, source: str, text: str = "hash", **extra) -> list[dict]:
    """The log lines of one batch: `probs` [n, len(labels)] calibrated probabilities, `decided` each row's label."""
    at = now()
    out = []
    for i, (rid, t) in enumerate(zip(ids, texts)):
        p = [round(float(x), 6) for x in probs[i]]
        out.append({"id": rid, "time": at, "source": source, "role": role, "version": version, "label": decided[i],
                    "confidence": max(p), "probabilities": dict(zip(labels, p)), **text_fields(t, text), **extra})
    return out


class PredictionLog:
    """Appends batches of records to a rotated JSONL file (module doc); safe across threads and processes."""

    def __init__(self, path: str | os.PathLike, text: str = "hash", max_bytes: int = MAX_BYTES,
                 backups: int = BACKUPS):
        if text not in LOG_TEXT:
            raise ValueError(f"log_text must be one of {', '.join(LOG_TEXT)}, got {text!r}")
        if max_bytes < 1 or backups < 0:
            raise ValueError(f"prediction log: max_bytes must be >= 1 and backups >= 0, got {max_bytes}, {backups}")
        self.path, self.text, self.max_bytes, self.backups = Path(path), text, max_bytes, backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = open(self.path.with_name(self.path.name + ".lock"), "a")
        self._lock = threading.Lock()
        self.rows = 0

    def write(self, recs: list[dict]) -> None:
        if not recs:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8", "surrogatepass")
        with self._lock:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX)
            try:
                size = self.path.stat().st_size if self.path.exists() else 0
                if size and size + len(data) > self.max_bytes:
                    self._rotate()
                with open(self.path, "ab") as fh:
                    fh.write(data)
                    fh.flush()
            finally:
                fcntl.flock(self._lockfile, fcntl.LOCK_UN)
            self.rows += len(recs)

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink()
            return
        for n in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{n}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def close(self) -> None:
        with self._lock:
            self._lockfile.close()


def log_files(where: str | os.PathLike) -> list[Path]:
    """The files of a log, oldest first: a log file and its rotated copies, or every *.jsonl log in a folder."""
    where = Path(where)
    bases = sorted(where.glob("*.jsonl")) if where.is_dir() else [where]
    out = []
    for base in bases:
        rotated = [p for p in base.parent.glob(base.name + ".*") if re.fullmatch(r"\d+", p.name[len(base.name) + 1:])]
        out += sorted(rotated, key=lambda p: -int(p.suffix[1:]))
        if base.is_file():
            out.append(base)
    return out


def read_records(files: list[Path]) -> Iterator[tuple[Path, int, dict]]:
    """(file, line, record) of every line, in order; a line that is not a complete record raises DataError."""
    for path in files:
        for n, rec in json_lines(path, errors="surrogateescape"):
            for key, kind in (("id", str), ("version", str), ("label", str), ("probabilities", dict)):
                if not isinstance(rec.get(key), kind):
                    raise DataError(path, n, key, f"missing or not a {kind.__name__}")
            yield path, n, rec


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
