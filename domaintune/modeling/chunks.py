"""Long documents: how a text longer than the model's window becomes model inputs, and how chunk outputs
become one document output. The one implementation behind training, evaluation, calibration, export,
predict, serve, drift and monitor (base.long_text, base.chunk_overlap, base.max_chunks).

Modes (base.long_text):
  truncate   the first max_length tokens (special tokens included); the rest is dropped. Exactly what the
             tokenizer's own truncation does (the inputs are tokenizer(texts, truncation=True, max_length)).
  head_tail  the first HEAD_SHARE of the window's content tokens and the last tokens of the document (Sun et
             al. 2019, "How to fine-tune BERT for text classification?": head 128 + tail 382 of 510 tokens).
  chunks     windows of max_length tokens (special tokens included) that share `overlap` content tokens with
             their neighbour, at most `max_chunks` per document; the tokens after the last window are not read
             and are counted (`Encoded.dropped`). Every window is one model input; a document's logits are
             the pooling (POOLINGS) of its windows' logits, its probabilities softmax(document logits / T)
             (single label) or sigmoid(document logits) (multi label), T fitted on document logits.

The windows of a document of n content tokens (special tokens not counted), W = max_length - (special
tokens of one input), step S = W - overlap: [0, W), [S, S + W), [2S, 2S + W), ... until one window reaches n
(the last one ends at n; a document of at most W tokens is one window, the same input `truncate` gives it).
Each window is wrapped in the tokenizer's own special tokens (prefix + window + suffix, e.g. [CLS] ... [SEP]).
The model card's ONNX snippet does the same in numpy (tests/export/test_onnx.py runs it without domaintune).

Pooling of chunk logits z[c, k] into document logits (the model's meta `long_text.pooling`):
  mean       mean over c
  max        max over c, per label
  logsumexp  log(mean over c of exp z[c, k]): between the mean and the max, smooth
A document with one window gets that window's logits under every pooling. Training (train/classifier.py)
gives every window its document's label; the pooling is then chosen on validation documents (see
`choose_pooling`), and bench/long.py measures the choice against truncation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

MODES = ("truncate", "head_tail", "chunks")
POOLINGS = ("mean", "logsumexp", "max")  # the order choose_pooling breaks ties in
HEAD_SHARE = 0.25  # head_tail: 128 of 510 content tokens, the split Sun et al. 2019 found best
log = logging.getLogger("domaintune")


@dataclass(frozen=True)
class LongText:
    """How a model reads documents longer than its window; recorded in model.json as `long_text`."""

    mode: str = "truncate"
    overlap: int = 32
    max_chunks: int = 16
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"long_text mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"long_text pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if not (isinstance(self.overlap, int) and self.overlap >= 0):
            raise ValueError(f"chunk overlap must be an integer >= 0, got {self.overlap!r}")
        if not (isinstance(self.max_chunks, int) and self.max_chunks >= 1):
            raise ValueError(f"max_chunks must be an integer >= 1, got {self.max_chunks!r}")

    @classmethod
    def from_params(cls, base, pooling: str = "mean") -> "LongText":
        """base.long_text / chunk_overlap / max_chunks (core.params.BaseParams)."""
        return cls(base.long_text, base.chunk_overlap, base.max_chunks, pooling)

    @classmethod
    def from_meta(cls, meta: dict) -> "LongText":
        """What model.json records; a model saved before long texts existed truncates."""
        lt = meta.get("long_text") or {}
        return cls(lt.get("mode", "truncate"), int(lt.get("chunk_overlap", 32)), int(lt.get("max_chunks", 16)),
                   lt.get("pooling", "mean"))

    def as_meta(self) -> dict:
        return {"mode": self.mode, "chunk_overlap": self.overlap, "max_chunks": self.max_chunks,
                "pooling": self.pooling, "head_share": HEAD_SHARE}


def windows(n: int, width: int, overlap: int, max_chunks: int) -> tuple[list[tuple[int, int]], int]:
    """Content-token spans [start, end) of a document of n tokens, and how many tokens after the last span are
    not read (max_chunks reached). See the module docstring."""
    if width < 1 or not 0 <= 2 * overlap <= width:
        raise ValueError(f"a window of {width} content tokens takes an overlap of 0 to {width // 2} tokens (no "
                         f"token read by three windows), got {overlap}")
    step, spans, start = width - overlap, [], 0
    while True:
        end = min(start + width, n)
        spans.append((start, end))
        if end >= n or len(spans) == max_chunks:
            return spans, n - end
        start += step


def head_tail(n: int, width: int) -> tuple[int, int]:
    """(head, tail): head_tail keeps content tokens [0, head) and [n - tail, n); head + tail = min(n, width)."""
    if n <= width:
        return n, 0
    head = int(round(width * HEAD_SHARE))
    return head, width - head


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids the tokenizer puts around one sequence, e.g. ([CLS], [SEP])."""
    for probe in ("a", "x", "0"):  # a short text; its content tokens sit between prefix and suffix
        content = tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = tokenizer(probe)["input_ids"]
        for at in range(len(full) - len(content) + 1):
            if content and full[at:at + len(content)] == content:
                return list(full[:at]), list(full[at + len(content):])
    raise ValueError(f"{type(tokenizer).__name__}: cannot tell where its special tokens go around a text")


@dataclass
class Encoded:
    """Model inputs of a list of documents: `inputs` as a tokenizer returns them (lists of ids per model input,
    unpadded), `doc[i]` the document of input i (inputs of one document are consecutive, in order),
    `tokens` each document's content tokens (None under truncate), `dropped` its content tokens no input
    holds (None under truncate)."""

    inputs: dict
    doc: np.ndarray
    n_docs: int
    tokens: np.ndarray | None = None
    dropped: np.ndarray | None = None

    @property
    def chunked(self) -> bool:
        return len(self.doc) != self.n_docs or not np.array_equal(self.doc, np.arange(self.n_docs))


def content_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Every token of every text, without special tokens and without truncation."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def encode(tokenizer, texts: Sequence[str], max_length: int, long_text: LongText | None = None) -> Encoded:
    """Documents -> model inputs under `long_text` (None or mode truncate: the tokenizer's own truncation)."""
    texts = list(texts)
    n = len(texts)
    if long_text is None or long_text.mode == "truncate":
        inputs = dict(tokenizer(texts, truncation=True, max_length=max_length)) if texts else {"input_ids": []}
        return Encoded(inputs, np.arange(n), n)
    prefix, suffix = special_tokens(tokenizer)
    width = max_length - len(prefix) - len(suffix)
    if width < 1:
        raise ValueError(f"max_length {max_length} leaves no room for text between the special tokens")
    ids, doc, dropped = [], [], np.zeros(n, dtype=np.int64)
    all_ids = content_ids(tokenizer, texts)
    for d, toks in enumerate(all_ids):
        if long_text.mode == "head_tail":
            head, tail = head_tail(len(toks), width)
            ids.append(prefix + toks[:head] + (toks[len(toks) - tail:] if tail else []) + suffix)
            doc.append(d)
            dropped[d] = len(toks) - head - tail
            continue
        spans, dropped[d] = windows(len(toks), width, long_text.overlap, long_text.max_chunks)
        for a, b in spans:
            ids.append(prefix + toks[a:b] + suffix)
            doc.append(d)
    names = getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"])
    inputs = {"input_ids": ids}
    if "token_type_ids" in names:
        inputs["token_type_ids"] = [[0] * len(x) for x in ids]
    if "attention_mask" in names:
        inputs["attention_mask"] = [[1] * len(x) for x in ids]
    return Encoded(inputs, np.asarray(doc, dtype=np.int64), n, np.array([len(t) for t in all_ids]), dropped)


def pool_logits(values: np.ndarray, doc: np.ndarray, n_docs: int, pooling: str = "mean") -> np.ndarray:
    """Per-input rows [m, K] -> per-document rows [n_docs, K] (POOLINGS; doc[i] = document of row i)."""
    values = np.asarray(values, dtype=np.float32)
    if len(doc) == n_docs and np.array_equal(doc, np.arange(n_docs)):
        return values
    counts = np.bincount(doc, minlength=n_docs).astype(np.float64)[:, None]
    if pooling == "mean":
        out = np.zeros((n_docs, values.shape[1]), dtype=np.float64)
        np.add.at(out, doc, values)
        return (out / np.maximum(counts, 1)).astype(np.float32)
    top = np.full((n_docs, values.shape[1]), -np.inf)
    np.maximum.at(top, doc, values)
    if pooling == "max":
        return top.astype(np.float32)
    if pooling == "logsumexp":
        s = np.zeros((n_docs, values.shape[1]), dtype=np.float64)
        np.add.at(s, doc, np.exp(values - top[doc]))
        return (top + np.log(s / np.maximum(counts, 1))).astype(np.float32)
    raise ValueError(f"unknown pooling {pooling!r}")


def choose_pooling(score) -> tuple[str, dict[str, float]]:
    """The pooling with the best validation score, `score(pooling) -> float` (higher is better), ties to the
    earlier of POOLINGS; returns (pooling, every pooling's score)."""
    scores = {p: float(score(p)) for p in POOLINGS}
    best = POOLINGS[0]
    for p in POOLINGS[1:]:
        if scores[p] > scores[best] + 1e-12:
            best = p
    return best, scores


def tokens_read(tokenizer, max_length: int, long_text: LongText | None = None) -> int:
    """The most content tokens of one document a model reads: one window under truncate and head_tail
    (head_tail skips the middle), max_chunks overlapping windows under chunks. A longer document is cut."""
    width = max(max_length - tokenizer.num_special_tokens_to_add(), 1)
    if long_text is None or long_text.mode != "chunks":
        return width
    return width + (long_text.max_chunks - 1) * (width - long_text.overlap)


def length_stats(tokenizer, texts: Iterable[Sequence[str]], max_length: int) -> dict:
    """Document lengths in content tokens (p50/p95/max) over `texts` (an iterable of lists of texts, e.g. the
    record batches of a split, so a large split is never held as one list), and the share longer than one
    window of max_length tokens (special tokens counted): what ingest reports."""
    parts = [np.array([len(x) for x in content_ids(tokenizer, list(part))], dtype=np.int64) for part in texts]
    lengths = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    width = tokens_read(tokenizer, max_length)
    if not len(lengths):
        return {"texts": 0, "p50": None, "p95": None, "max": None, "share_over_max_length": None,
                "max_length": int(max_length)}
    return {"texts": int(len(lengths)), "p50": float(np.percentile(lengths, 50)),
            "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max()),
            "share_over_max_length": float((lengths > width).mean()), "max_length": int(max_length)}


def document_report(tokenizer, texts: Sequence[str], max_length: int, long_text: LongText) -> dict:
    """How a model reads `texts`: their length in content tokens, the share it does not read whole (tokens past
    max_length, head_tail's middle, or past max_chunks windows: counted, not silently lost) and its model inputs
    per document (what evaluate records for the test split)."""
    lengths = np.array([len(x) for x in content_ids(tokenizer, list(texts))], dtype=np.int64)
    read = tokens_read(tokenizer, max_length, long_text)
    inputs = len(encode(tokenizer, texts, max_length, long_text).doc) if long_text.mode == "chunks" else len(texts)
    out = {**long_text.as_meta(), "max_length": int(max_length), "documents": int(len(lengths))}
    if len(lengths):
        out.update({"tokens_p50": float(np.percentile(lengths, 50)), "tokens_p95": float(np.percentile(lengths, 95)),
                    "tokens_max": int(lengths.max()), "not_read_whole_share": float((lengths > read).mean()),
                    "tokens_not_read": int(np.maximum(lengths - read, 0).sum()),
                    "inputs_per_document": inputs / len(lengths)})
    return out
