"""Tagged sentences (base.task token_classification): the row format, the BIO checks, sub-word alignment and
entity scores. The three readers and the ingest stage's work are in domaintune/data/tagged.py.

A sentence is stored in the dataset schema (domaintune/data/dataset.py) as
- text: the sentence (word-level and CoNLL sources: the words joined by single spaces; span sources: the
  text as written), so dedupe, DAPT and drift read it like any text;
- label: its words as JSON `[[start, end, tag], ...]`, character offsets into text and one IOB2 tag each.
labels.json holds the tag set (O plus B-/I- of every entity type); readers, tag schemes and bad rows: data/tagged.py.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger("domaintune")

TAG_RE = re.compile(r"^(O|[BI]-\S.*)$")
WORD_RE = re.compile(r"\w+|[^\w\s]")  # words of a span source's text (then cut at every span edge)
IGNORE = -100  # the label of every sub-word but a word's first (torch's cross-entropy skips it)


# ---------------------------------------------------------------- the row format

def encode_row(words: Sequence[str], tags: Sequence[str]) -> tuple[str, str]:
    """Words and tags -> (text, label): the words joined by one space, each word's offsets and tag."""
    spans, pos = [], 0
    for w, t in zip(words, tags):
        spans.append([pos, pos + len(w), t])
        pos += len(w) + 1
    return " ".join(words), json.dumps(spans, ensure_ascii=False, separators=(",", ":"))


def decode_label(label: str) -> tuple[list[tuple[int, int]], list[str]]:
    """A stored label -> (word offsets, tags)."""
    rows = json.loads(label)
    return [(int(s), int(e)) for s, e, _ in rows], [str(t) for _, _, t in rows]


def decode_rows(df: pd.DataFrame) -> tuple[list[list[str]], list[list[tuple[int, int]]], list[list[str]]]:
    """A split's (words, offsets, tags) per row."""
    words, offsets, tags = [], [], []
    for text, label in zip(df["text"].astype(str), df["label"].astype(str)):
        off, tg = decode_label(label)
        words.append([text[s:e] for s, e in off])
        offsets.append(off)
        tags.append(tg)
    return words, offsets, tags


def entity_type(tag: str) -> str | None:
    return None if tag == "O" else tag[2:]


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of every entity in strict IOB2: B-X opens one, I-X continues an open X;
    an I- that opens nothing starts no entity (strict: seqeval mode="strict")."""
    out, cur = [], None
    for i, t in enumerate(list(tags) + ["O"]):
        if cur is not None and not (t.startswith("I-") and t[2:] == cur[0]):
            out.append((cur[0], cur[1], i))
            cur = None
        if t.startswith("B-"):
            cur = (t[2:], i)
    return out


def lenient_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities as transformers' token-classification pipeline groups them (what `domaintune predict` reports):
    B-X opens one, I-X continues an X or opens one after anything else."""
    out, cur = [], None
    for i, t in enumerate(list(tags) + ["O"]):
        typ = entity_type(t)
        if cur is not None and (typ != cur[0] or t.startswith("B-")):
            out.append((cur[0], cur[1], i))
            cur = None
        if typ is not None and cur is None:
            cur = (typ, i)
    return out


def bio_problem(tags: Sequence[str], words: Sequence[str]) -> str | None:
    """Why a tag sequence is not IOB2 (the first problem), or None."""
    prev = "O"
    for i, t in enumerate(tags):
        if not isinstance(t, str) or not TAG_RE.match(t):
            return f"word {i + 1} ({words[i]!r}) has tag {t!r}; tags are O, B-TYPE or I-TYPE (BIO/IOB2)"
        if t.startswith("I-") and entity_type(prev) != t[2:]:
            return (f"word {i + 1} ({words[i]!r}) has tag {t} with no opening B-{t[2:]} (previous tag {prev}); "
                    "IOB2 opens every entity with B-")
        prev = t
    return None


def is_iob1(sequences: Sequence[Sequence[str]]) -> bool:
    """Whether tag sequences read as IOB1: some entity opens with I-, and no B-X follows anything but an X."""
    opens_with_i = False
    for tags in sequences:
        prev = "O"
        for t in tags:
            if not isinstance(t, str) or not TAG_RE.match(t):
                return False
            if t.startswith("B-") and entity_type(prev) != t[2:]:
                return False
            if t.startswith("I-") and entity_type(prev) != t[2:]:
                opens_with_i = True
            prev = t
    return opens_with_i


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    out, prev = [], "O"
    for t in tags:
        out.append("B-" + t[2:] if t.startswith("I-") and entity_type(prev) != t[2:] else t)
        prev = t
    return out


def split_words(text: str, cuts: Sequence[int] = ()) -> list[tuple[int, int]]:
    """The word offsets of `text` by WORD_RE, each word also cut at the positions in `cuts`."""
    cuts = sorted(set(cuts))
    out = []
    for m in WORD_RE.finditer(text):
        s, e = m.span()
        inner = [c for c in cuts if s < c < e]
        for a, b in zip([s, *inner], [*inner, e]):
            out.append((a, b))
    return out


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """seqeval strict IOB2 entity P/R/F1 (micro and per type) and token accuracy."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    gold, pred = [list(g) for g in gold], [list(p) for p in pred]
    words = sum(len(g) for g in gold)
    same = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
    report = classification_report(gold, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0})
    per_type = {k: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
                    "support": int(v["support"])}
                for k, v in report.items() if not k.endswith(" avg")}
    return {"precision": float(micro["precision"]), "recall": float(micro["recall"]), "f1": float(micro["f1-score"]),
            "support": int(micro["support"]), "per_type": per_type,
            "macro_f1": float(np.mean([v["f1"] for v in per_type.values()])) if per_type else 0.0,
            "token_accuracy": same / words if words else 0.0}



# ---------------------------------------------------------------- first sub-word alignment

def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Per token: the label of its word on the word's first sub-word, IGNORE on every other sub-word (later
    pre-tokenizer pieces of a word included: "INV-12345", "@user_1", "don't", URLs) and on special tokens;
    transformers' run_ner recipe. Labelling later pieces too (with the word's inside tag) was tried and cost
    8 points of WNUT-17 entity F1: on social-media text most pieces belong to O words (URLs, @mentions,
    hashtags: 18.5k extra O labels on 3,394 train sentences, 2,171 of them alphabetic pieces
    of @mentions, user names such as 'justin')."""
    out, prev = [], None
    for w in word_ids:
        out.append(int(word_labels[w]) if w is not None and w != prev else IGNORE)
        prev = w
    return out


def first_subwords(word_ids: Sequence[int | None], n_words: int) -> np.ndarray:
    """Per word: the position of its first sub-word, or -1 when it was cut off (truncation) or has none."""
    pos = np.full(n_words, -1, dtype=np.int64)
    for i, w in enumerate(word_ids):
        if w is not None and w < n_words and pos[w] < 0:
            pos[w] = i
    return pos
