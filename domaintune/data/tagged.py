"""Reading tagged sentences (base.task token_classification) and the ingest stage's work for them.

Readers, chosen per file (a file, or a folder whose file names name their splits as for a classifier; a
README/LICENSE or .md file in the folder is skipped):
- JSONL / Parquet with `ingest.tokens_column` (a list of words) and `ingest.tags_column` (their tags);
- JSONL / Parquet with `ingest.text_column` and `ingest.spans_column` (a list of {start, end, label} character
  spans; the text is cut into words by data/tokens.WORD_RE and at every span edge, so a span covers whole words);
- CoNLL text (.conll, .iob, .bio, .txt): one token per line, the tag in the last whitespace-separated column,
  a blank line between sentences, -DOCSTART- lines skipped.
Tags: O, B-TYPE, I-TYPE. A source written in IOB1 (an entity opens with I-; B- only where an entity follows
another of its type) is converted to IOB2 as a whole, with a warning and `tag_scheme` in the metrics. Otherwise
an I- tag that opens an entity is a bad row, as is a list-length mismatch, a tag outside the scheme, an empty
word, and a span off the text, empty, or overlapping another: one line naming file, row and field
(`on_bad_row: error`) or a row of rejected.csv (`skip`). Nothing is silently fixed. Splits, ids, hashing and
accounting (records read = kept + rejected per file) are the classifier's (data/ingest.hash_split).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from domaintune.core.errors import DataError, missing_column
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import IngestParams
from domaintune.core.stage import StageIO
from domaintune.data.dataset import SPLITS, write_dataset
from domaintune.data.ingest import REJECTED_COLUMNS, _rejected_csv, hash_split
from domaintune.data.sources import EXTENSIONS, SPLIT_ALIASES, RawTable, read_file, read_hf, splits_in_name
from domaintune.data.tokens import (
    bio_problem,
    decode_label,
    encode_row,
    entities,
    iob1_to_iob2,
    is_iob1,
    split_words,
)

log = logging.getLogger("domaintune")

CONLL_SUFFIXES = (".conll", ".iob", ".bio", ".txt")
DOC_SUFFIXES = (".md", ".rst", ".pdf", ".html")  # a dataset folder's README / LICENSE: skipped, not data


# ---------------------------------------------------------------- readers

@dataclass
class Sentence:
    file: str
    row: int
    text: str | None
    label: str | None = None
    tags: list = field(default_factory=list)  # before the scheme check
    words: list = field(default_factory=list)
    id: str | None = None
    split: str | None = None
    problem: tuple | None = None  # (field, reason, detail)


def _as_list(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v if isinstance(v, (list, tuple)) else None


def _int(v):
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
        return int(v)
    return None


def _word_row(t: RawTable, i: int, p: IngestParams) -> Sentence:
    s = Sentence(t.file, t.rows[i], None)
    words, tags = _as_list(t.frame.at[i, p.tokens_column]), _as_list(t.frame.at[i, p.tags_column])
    if words is None:
        s.problem = (p.tokens_column, "bad_tokens", "is not a list of words")
    elif tags is None:
        s.problem = (p.tags_column, "bad_tags", "is not a list of tags")
    elif len(words) != len(tags):
        s.problem = (p.tags_column, "length_mismatch", f"{len(tags)} tags for {len(words)} words")
    elif not words:
        s.problem = (p.tokens_column, "empty_sentence", "no words")
    else:
        bad = next((k for k, w in enumerate(words) if not isinstance(w, str) or not w.strip()), None)
        if bad is not None:
            s.problem = (p.tokens_column, "bad_word", f"word {bad + 1} is {words[bad]!r}: empty or not a string")
        else:
            s.words, s.tags = [w.strip() for w in words], [str(t).strip() if t is not None else t for t in tags]
    return s


def _span_row(t: RawTable, i: int, p: IngestParams) -> Sentence:
    text, raw = t.frame.at[i, p.text_column], _as_list(t.frame.at[i, p.spans_column])
    s = Sentence(t.file, t.rows[i], text if isinstance(text, str) else None)
    if not isinstance(text, str) or not text.strip():
        s.problem = (p.text_column, "empty_text", "text is empty or not a string")
        return s
    if raw is None:
        s.problem = (p.spans_column, "bad_spans", "is not a list of {start, end, label} spans")
        return s
    spans = []
    for k, sp in enumerate(raw):
        start, end = (_int(sp.get("start")), _int(sp.get("end"))) if isinstance(sp, dict) else (None, None)
        label = sp.get("label") if isinstance(sp, dict) else None
        if start is None or end is None or not isinstance(label, str) or not label.strip():
            s.problem = (p.spans_column, "bad_span", f"span {k + 1} ({sp!r}) is not {{start, end, label}} with "
                         "integer offsets and a label")
            return s
        if not 0 <= start < end <= len(text):
            s.problem = (p.spans_column, "span_off_text", f"span {k + 1} [{start}, {end}) {label!r} is off the "
                         f"text ({len(text)} characters) or empty")
            return s
        spans.append((start, end, label.strip(), k + 1))
    spans.sort()
    for a, b in zip(spans, spans[1:]):
        if b[0] < a[1]:
            s.problem = (p.spans_column, "overlapping_spans", f"span {b[3]} [{b[0]}, {b[1]}) {b[2]!r} overlaps span "
                         f"{a[3]} [{a[0]}, {a[1]}) {a[2]!r}")
            return s
    offsets = split_words(text, [c for a in spans for c in a[:2]])
    tags = ["O"] * len(offsets)
    for start, end, label, k in spans:
        inside = [j for j, (a, b) in enumerate(offsets) if a >= start and b <= end]
        if not inside:
            s.problem = (p.spans_column, "span_without_words", f"span {k} [{start}, {end}) {label!r} covers no word")
            return s
        for n, j in enumerate(inside):
            tags[j] = ("B-" if n == 0 else "I-") + label
    if not offsets:
        s.problem = (p.text_column, "empty_text", "text has no words")
        return s
    s.words, s.tags = [text[a:b] for a, b in offsets], tags
    s.label = json.dumps([[a, b, tg] for (a, b), tg in zip(offsets, tags)], ensure_ascii=False,
                         separators=(",", ":"))
    return s


def read_table_sentences(t: RawTable, p: IngestParams) -> list[Sentence]:
    """The sentences of a JSONL / Parquet table (word-level, or spans with ingest.spans_column)."""
    spans = bool(p.spans_column) and p.spans_column in t.frame.columns
    need = [p.text_column, p.spans_column] if spans else [p.tokens_column, p.tags_column]
    need += [c for c in (p.id_column,) if c]
    if p.split_column and t.split is None:
        need.append(p.split_column)
    for c in need:
        if c not in t.frame.columns:
            raise missing_column(t.file, c, list(t.frame.columns),
                                 "" if spans or p.spans_column else " (span data: set ingest.spans_column)")
    out = []
    for i in range(len(t.frame)):
        s = _span_row(t, i, p) if spans else _word_row(t, i, p)
        if i in t.bad and s.problem is None:
            hits = [pr for pr in t.bad[i] if pr[0] is None or pr[0] in need or pr[1] == "malformed_row"]
            if hits:
                s.problem = hits[0]
        if p.id_column:
            v = t.frame.at[i, p.id_column]
            s.id = None if v is None else str(v).strip()
            if not s.id and s.problem is None:
                s.problem = (p.id_column, "missing_id", "id is empty")
        s.split = t.split
        if p.split_column and t.split is None:
            v = t.frame.at[i, p.split_column]
            s.split = SPLIT_ALIASES.get(str(v).strip().lower()) if v is not None else None
            if s.split is None and s.problem is None:
                s.problem = (p.split_column, "bad_split", f"split {v!r} is not one of {sorted(SPLIT_ALIASES)}")
        out.append(s)
    return out


def read_conll(path: Path, split: str | None = None) -> list[Sentence]:
    """CoNLL-style text: token per line, tag in the last column, blank line (or a line of only whitespace)
    between sentences, -DOCSTART- lines skipped. A sentence's row is its number in the file; its line is in
    the messages."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, None, None, f"not UTF-8 (byte {exc.start})") from None
    out, words, tags, first, bad = [], [], [], 0, None

    def close():
        nonlocal words, tags, bad
        if words or bad:
            s = Sentence(str(path), len(out) + 1, None, split=split)
            if bad:
                s.problem = bad
            else:
                s.words, s.tags = words, tags
            s.text = " ".join(words)
            out.append(s)
        words, tags, bad = [], [], None

    for n, line in enumerate(text.splitlines(), 1):
        cols = line.split()
        if not cols:
            close()
            continue
        if cols[0] == "-DOCSTART-":
            close()
            continue
        if not words and bad is None:
            first = n
        if len(cols) < 2:
            bad = bad or ("tags", "missing_tag", f"line {n} has a token and no tag (sentence from line {first})")
            continue
        words.append(cols[0])
        tags.append(cols[-1])
    close()
    if not out:
        raise DataError(path, None, None, "no sentences (token<TAB>tag lines, a blank line between sentences)")
    return out


def source_files(source: str) -> list[tuple[Path, str | None]]:
    """The files of a source and the split each names (None when none does), by data.sources' naming rule."""
    path = Path(source)
    if not path.exists():
        raise DataError(path, None, None, "source not found")
    if path.is_file():
        return [(path, None)]
    entries = sorted(q for q in path.iterdir() if not q.name.startswith("."))
    docs = [q for q in entries if q.suffix.lower() in DOC_SUFFIXES or q.stem.upper() in ("README", "LICENSE")]
    if docs:
        log.info("%s: not data, skipped: %s", path, ", ".join(q.name for q in docs))
    entries = [q for q in entries if q not in docs]
    if not entries:
        raise DataError(path, None, None, "folder holds no files")
    kinds = set(EXTENSIONS) | set(CONLL_SUFFIXES)
    named = []
    for q in entries:
        if not q.is_file() or q.suffix.lower() not in kinds:
            raise DataError(q, None, None, f"not a file ingest reads for token_classification ({sorted(kinds)})")
        found = splits_in_name(q.name)
        if len(found) > 1:
            raise DataError(q, None, None, f"file name names more than one split {found}; name exactly one")
        named.append((q, found[0] if found else None))
    if any(s for _, s in named) and not all(s for _, s in named):
        q = next(q for q, s in named if not s)
        raise DataError(q, None, None, "file name names no split while others do; name one in every file, or none")
    return named


def read_sentences(source: str, p: IngestParams) -> list[Sentence]:
    """Every sentence of the source, in file order (problems marked, not raised)."""
    out = []
    if source.startswith("hf:"):
        for t in read_hf(source):
            out += read_table_sentences(t, p)
        return out
    for path, split in source_files(source):
        if path.suffix.lower() in CONLL_SUFFIXES:
            out += read_conll(path, split)
        else:
            t = read_file(path, EXTENSIONS)
            t.split = split
            out += read_table_sentences(t, p)
    return out


# ---------------------------------------------------------------- ingest

@dataclass
class TokenIngest:
    tables: dict        # split -> DataFrame (id, text, label, split)
    tags: list[str]
    rejected: pd.DataFrame
    metrics: dict


def _check_scheme(sentences: list[Sentence], p: IngestParams) -> str:
    """IOB2 as is, or IOB1 converted for the whole source; marks rows whose tags are not IOB2."""
    good = [s for s in sentences if s.problem is None]
    scheme = "IOB2"
    if is_iob1([s.tags for s in good]):
        scheme = "IOB1 (converted to IOB2)"
        log.warning("the source's tags are IOB1 (entities open with I-): converted to IOB2 (B- opens every entity)")
        for s in good:
            s.tags = iob1_to_iob2(s.tags)
    for s in good:
        why = bio_problem(s.tags, s.words)
        if why:
            s.problem = (p.tags_column if s.label is None else p.spans_column, "bad_tags", why)
    return scheme


def _entity_counts(df: pd.DataFrame) -> dict[str, int]:
    counts: dict[str, int] = {}
    for label in df["label"]:
        for typ, _, _ in entities(decode_label(label)[1]):
            counts[typ] = counts.get(typ, 0) + 1
    return dict(sorted(counts.items()))


def ingest_tokens(source: str, p: IngestParams, seed: int) -> TokenIngest:
    """A tagged source -> split dataset (pure but for reading the source)."""
    sentences = read_sentences(source, p)
    scheme = _check_scheme(sentences, p)
    rows, rejected, read = [], [], {}
    for s in sentences:
        read[s.file] = read.get(s.file, 0) + 1
        if s.problem is not None:
            fld, reason, detail = s.problem
            if p.on_bad_row == "error":
                raise DataError(s.file, s.row, fld, detail)
            rejected.append({"file": s.file, "row": s.row, "field": fld, "reason": reason, "detail": detail,
                             "text": s.text if s.text is not None else " ".join(map(str, s.words))})
            continue
        if s.label is None:
            s.text, s.label = encode_row(s.words, s.tags)
        else:  # a span source keeps its text; its label was written from the spans
            s.label = json.dumps([[a, b, t] for (a, b, _), t in zip(json.loads(s.label), s.tags)],
                                 ensure_ascii=False, separators=(",", ":"))
        rows.append({"file": s.file, "row": s.row, "id": s.id or f"{Path(s.file).stem}:{s.row}", "text": s.text,
                     "label": s.label, "split": s.split})
    if not rows:
        raise DataError(source, None, None, f"no usable sentences ({len(rejected)} rejected)")
    df = pd.DataFrame(rows)
    dup = df["id"].duplicated()
    if dup.any():
        r = df[dup].iloc[0]
        first = df[df["id"] == r["id"]].iloc[0]
        raise DataError(r["file"], int(r["row"]), p.id_column or "id",
                        f"id {r['id']!r} already used by {first['file']} row {int(first['row'])}")
    split_source, carved = "hash", []
    if df["split"].notna().any():
        split_source = "files" if sentences[0].split is not None and not p.split_column else "column"
        present = set(df["split"].dropna())
        if "train" not in present:
            raise DataError(source, None, p.split_column, f"the source names splits {sorted(present)} but no train")
        carved = [s for s in ("validation", "test") if s not in present and p.split[s] > 0]
        if carved and p.missing_split == "error":
            raise DataError(source, None, p.split_column, f"the source has no {'/'.join(carved)} split; add it, or "
                            "set ingest.missing_split: carve")
        if carved:
            pool = df["split"].eq("train")
            total = p.split["train"] + sum(p.split[s] for s in carved)
            part = df[pool].assign(label="")
            df.loc[pool, "split"] = hash_split(part, {s: p.split[s] / total for s in carved}, seed).to_numpy()
            log.warning("source has no %s split: carved from its train rows by ingest.split", "/".join(carved))
    else:
        df["split"] = hash_split(df.assign(label=""), p.split, seed).to_numpy()
    tables = {s: df[df["split"] == s].loc[:, ["id", "text", "label", "split"]].reset_index(drop=True) for s in SPLITS}
    if not len(tables["train"]):
        raise DataError(source, None, None, "no usable sentences in train")
    for s in ("validation", "test"):
        if not len(tables[s]) and (p.split[s] > 0 or split_source != "hash"):
            sizes = {k: len(v) for k, v in tables.items()}
            raise DataError(source, None, None, f"the {s} split would be empty ({sizes}"
                            " sentences); add sentences, or set ingest.split." + s + ": 0")
    tags = sorted({t for lab in df["label"] for t in decode_label(lab)[1]} | {"O"})
    train_tags = {t for lab in tables["train"]["label"] for t in decode_label(lab)[1]}
    if not any(t != "O" for t in train_tags):
        raise DataError(source, None, p.tags_column, "no entity in train: every tag is O")
    rej = pd.DataFrame(rejected, columns=REJECTED_COLUMNS)
    by_file = {}
    for f, n in read.items():
        kept = int((df["file"] == f).sum())
        by_file[f] = {"records": n, "kept": kept, "rejected": n - kept}
    metrics = {
        "task": "token_classification",
        "rows_read": len(sentences),
        "rows": {s: len(t) for s, t in tables.items()},
        "rejected": len(rej),
        "rejected_by_reason": {str(k): int(v) for k, v in rej["reason"].value_counts().sort_index().items()},
        "labels": len(tags),
        "tags": tags,
        "tags_not_in_train": sorted(set(tags) - train_tags - {"O"}),
        "tag_scheme": scheme,
        "words": {s: int(sum(len(decode_label(x)[1]) for x in t["label"])) for s, t in tables.items()},
        "entities": {s: _entity_counts(t) for s, t in tables.items()},
        "split_source": split_source,
        "split_method": "hash",
        "carved_splits": carved,
        "files": by_file,
    }
    return TokenIngest(tables, tags, rej, metrics)


def ingest_stage(io: StageIO, p: IngestParams, seed: int) -> dict:
    """The ingest stage for token_classification: the dataset, rejected.csv and the metrics, together or not at all."""
    result = ingest_tokens(str(io.source), p, seed)
    with atomic_output(io.out) as tmp, atomic_output(io.metrics) as tmp_metrics:
        hashes = write_dataset(tmp, result.tables, result.tags)
        _rejected_csv(result.rejected).to_csv(tmp / "rejected.csv", index=False)
        write_json(tmp_metrics, result.metrics)
    m = result.metrics
    log.info("read %d sentences -> train %d / validation %d / test %d, %d rejected, %d tags (%s); dataset %s",
             m["rows_read"], *m["rows"].values(), m["rejected"], m["labels"], m["tag_scheme"], hashes["dataset"][:12])
    return m
