"""Batch prediction over a file of texts, streamed in chunks: what `domaintune predict` runs.

Input: CSV, TSV, JSONL, Parquet or TXT (one text per line), read by the project's one reader per kind
(domaintune.data.sources.iter_tables: the rules, row numbers and messages of ingest and monitor) in chunks,
so memory stays bounded whatever the file size. Row numbers: CSV/TSV the data record after the header
(blank lines are not records), JSONL and TXT the line, Parquet the 1-based row position. Blank lines of a
TXT file are ignored (and counted). Bad rows (missing, empty or non-text text, bytes that are not UTF-8, a
lone surrogate such as a JSON "\\ud800" escape, a wrong field count, a line that is not JSON, an id that is
not a string or number) are found in a first pass, before anything is written: `on_bad_row="error"` stops at
the first with one line naming file, row and field; `"skip"` lists every one of them and predicts the rest.
A bad file (not found, UTF-16, empty, old Mac line ends, no such column) stops before anything is written.
Ids: the id column's value as text (JSON numbers as written); a missing, null or empty id is the row number,
as for a file without the id column. A CSV field has no size limit here (ingest.max_chars bounds training
data, not what is predicted).
Output: JSONL or CSV, one record per good row: id, text, label, calibrated confidence, top_k (and `abstained`,
true where the label is evaluate.abstain.label, for an export that abstains); for a
generation export (`generation=` given) id, text, the generated response, its finish_reason ("stop" or
"length") and token counts; for a token_classification export id, text and its entities (start, end, text,
label, calibrated score). A prompt too long for the model's context with its token budget is a bad row
too, found when its chunk is generated: with on_bad_row="error" the run stops there, after the rows before it
were written to the stream (the CLI writes --out through atomic_output, so a file output is then not written
at all; on stdout the rows before it have been printed).
Prediction log: given a `PredictionLog` (domaintune/predict/log.py), every classifier prediction is logged as it
is made, a chunk per write, under the row's id, or `<input sha256[:12]>:<row>` for a row whose id is its row
number (the monitor review queue's ids for such rows), so row numbers of different files never collide there.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from domaintune.core.errors import DataError, missing_column
from domaintune.core.progress import Progress
from domaintune.data.sources import READABLE, SURROGATE, RawTable, iter_tables
from domaintune.predict import log as predlog

INPUT_FORMATS = READABLE  # .csv .tsv .jsonl .parquet .txt: what the sources readers read
OUTPUT_FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
CLASSIFIER_COLUMNS = ("id", "text", "label", "confidence", "top_k")
GENERATION_COLUMNS = ("id", "text", "response", "finish_reason", "prompt_tokens", "completion_tokens")
ENTITY_COLUMNS = ("id", "text", "entities")  # a token_classification export: [{start, end, text, label, score}]
SCAN_ROWS = 16_384  # rows per part in the first pass (it keeps no rows)


@dataclass
class Record:
    row: int                    # the row number a person uses (module doc)
    id: Optional[str]
    text: Optional[str]
    field: Optional[str] = None  # set on a bad row: which field is wrong (None = the whole row)
    problem: Optional[str] = None
    numbered: bool = False      # the id is the row number (no id column, or an empty id cell)


@dataclass
class Scan:
    rows: int = 0
    bad: list = field(default_factory=list)   # (row, field, problem)
    blank_lines: int = 0
    id_column_found: bool = False  # some part of the file has the id column (else every id is the row number)


def input_format(path: Path) -> str:
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(path, None, None, f"unknown input format {path.suffix!r}; use one of "
                        + ", ".join(INPUT_FORMATS))
    if not path.is_file():
        raise DataError(path, None, None, "no such file" if not path.exists() else "not a regular file")
    return fmt


def _check_text(rec: Record, text_column: str) -> Record:
    if rec.problem is None:
        if rec.text is None:
            rec.field, rec.problem = text_column, "missing"
        elif not isinstance(rec.text, str):
            rec.field, rec.problem = text_column, f"not text: {type(rec.text).__name__} {rec.text!r}"
        elif not rec.text.strip():
            rec.field, rec.problem = text_column, "empty text"
        elif m := SURROGATE.search(rec.text):  # the readers name these first; a last guard before the model
            rec.field, rec.problem = text_column, (f"bytes that are not UTF-8 or a lone surrogate at character "
                                                   f"{m.start()}")
    return rec


def _row_id(value, row: int) -> tuple[Optional[str], Optional[str]]:
    """(id, problem) of an id cell: text as it is, a number as written, missing/null/empty -> the row number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return str(row), None
    if isinstance(value, str):
        if m := SURROGATE.search(value):
            return None, f"bytes that are not UTF-8 or a lone surrogate at character {m.start()}"
        return value, None
    if isinstance(value, (bool, list, tuple, dict)) or not hasattr(value, "__int__"):
        return None, f"not a string or number: {type(value).__name__} {value!r}"
    f = float(value)
    if f != f:  # NaN
        return str(row), None
    return (str(int(f)) if f.is_integer() and abs(f) < 2**63 else repr(f)), None


def _missing(value) -> bool:
    """Whether an id cell is missing (None, blank or NaN): its id is the row number."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and value != value)


def _part_records(t: RawTable, text_column: str, id_column: str, txt: bool) -> Iterator[Record]:
    cols = set(t.frame.columns)
    texts = t.frame["text" if txt else text_column].tolist() if (txt or text_column in cols) else [None] * len(t.rows)
    ids = t.frame[id_column].tolist() if not txt and id_column in cols else [None] * len(t.rows)
    used = {text_column, id_column}
    for i, row in enumerate(t.rows):
        hits = [pr for pr in t.bad.get(i, ()) if pr[0] is None or pr[0] in used or pr[1] == "malformed_row"]
        if hits:
            fld, _, detail = hits[0]
            yield Record(row, None, None, "line" if txt and fld == "text" else fld, detail)
            continue
        rid, problem = _row_id(ids[i], row)
        if problem:
            yield Record(row, None, None, id_column, problem)
            continue
        yield Record(row, rid, texts[i], numbered=_missing(ids[i]))


def records(path: Path, text_column: str = "text", id_column: str = "id", chunk: int = 1024,
            scan: Scan | None = None) -> Iterator[Record]:
    """Every record of the file, checked, in file order (bad ones carry `problem`); a TXT file's blank lines
    are counted in `scan`, not yielded."""
    scan = scan if scan is not None else Scan()
    txt = input_format(path) == "txt"
    first = True
    for part in iter_tables(path, chunk):
        # a header (CSV/TSV) or schema (Parquet) without the column; a JSONL record without it is a bad row
        if first and not txt and path.suffix.lower() != ".jsonl" and text_column not in part.frame.columns:
            raise missing_column(path, text_column, part.frame.columns)
        first = False
        scan.id_column_found = scan.id_column_found or (not txt and id_column in part.frame.columns)
        for rec in _part_records(part, text_column, id_column, txt):
            if txt and rec.problem is None and not rec.text.strip():
                scan.blank_lines += 1
                continue
            yield _check_text(rec, "line" if txt else text_column)


def scan_file(path: Path, text_column: str, id_column: str, on_bad_row: str) -> Scan:
    """First pass: count rows and find bad ones (stops at the first with on_bad_row='error')."""
    scan = Scan()
    for rec in records(path, text_column, id_column, chunk=SCAN_ROWS, scan=scan):
        scan.rows += 1
        if rec.problem is not None:
            if on_bad_row == "error":
                raise DataError(path, rec.row, rec.field, rec.problem)
            scan.bad.append((rec.row, rec.field, rec.problem))
    return scan


def chunks(path: Path, text_column: str, id_column: str, size: int) -> Iterator[list[Record]]:
    """Good records in lists of `size`."""
    buf: list[Record] = []
    for rec in records(path, text_column, id_column, chunk=size):
        if rec.problem is None:
            buf.append(rec)
            if len(buf) == size:
                yield buf
                buf = []
    if buf:
        yield buf


def abstains(predictor) -> bool:
    """Whether the export abstains (evaluate.abstain): its rows get an `abstained` column."""
    return getattr(predictor, "abstainer", None) is not None


def output_rows(predictor, batch: list[Record], top_k: int, log: PredictionLogger | None = None) -> list[dict]:
    texts = [r.text for r in batch]
    if not abstains(predictor):
        probs = predictor.predict_proba(texts)
        labels = predictor.labels_from_proba(probs)
        abstained = None
    else:  # the label is evaluate.abstain.label where the model abstains; top_k still lists the trained labels
        probs, abstained = predictor.predict_with_abstention(texts)
        labels = predictor.labels_from_proba(probs)
    tops = predictor.top_k(probs, top_k)
    if log is not None:
        log(predictor, batch, probs, labels)  # the log keeps the model's own label (feedback scores the model)
    rows = [{"id": r.id, "text": r.text, "label": lab, "confidence": round(top[0][1], 6),
             "top_k": [{"label": name, "confidence": round(p, 6)} for name, p in top]}
            for r, lab, top in zip(batch, labels, tops)]
    if abstained is not None:
        for row, a in zip(rows, abstained):
            row["abstained"] = bool(a)
            if a:
                row["label"] = predictor.abstainer.label
    return rows


@dataclass
class PredictionLogger:
    """Logs `predict`'s predictions of one input file by one model version (module doc)."""
    log: predlog.PredictionLog
    version: str
    input_sha256: str

    def __call__(self, predictor, batch: list[Record], probs, labels: list[str]) -> None:
        ids = [f"{self.input_sha256[:12]}:{r.row}" if r.numbered else r.id for r in batch]
        extra = {"problem_type": "multi_label"} \
            if getattr(predictor, "problem_type", "single_label") == "multi_label" else {}
        if getattr(predictor, "variant", None):  # the variant that answered (--variant auto resolved)
            extra["variant"] = predictor.variant
        self.log.write(predlog.records(ids, [r.text for r in batch], self.version, list(predictor.labels), probs,
                                       labels, role="predict", source="predict", text=self.log.text,
                                       input_sha256=self.input_sha256, **extra))


def entity_rows(predictor, batch: list[Record]) -> list[dict]:
    """One row per record with its entities (predictor: an EntityPredictor)."""
    return [{"id": r.id, "text": r.text, "entities": ents}
            for r, ents in zip(batch, predictor.entities([r.text for r in batch]))]


def generated_rows(predictor, batch: list[Record], generation: dict) -> list[dict]:
    """One generated response per record (predictor: a GenerationPredictor; generation: its generate() options)."""
    done = predictor.generate([r.text for r in batch], **generation)
    return [{"id": r.id, "text": r.text, "response": g.text, "finish_reason": g.finish_reason,
             "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens} for r, g in zip(batch, done)]


def fitting(predictor, batch: list[Record], generation: dict, path: Path, field: str, on_bad_row: str,
            bad: list) -> list[Record]:
    """The records whose rendered prompt and token budget fit the model's context; the others stop the run
    (on_bad_row="error") or are added to `bad` as (row, field, problem)."""
    limit = generation.get("max_new_tokens") or predictor.defaults["max_new_tokens"]
    keep = []
    for rec, ids in zip(batch, predictor.encode([r.text for r in batch])):
        if predictor.context is None or len(ids) + limit <= predictor.context:
            keep.append(rec)
            continue
        problem = (f"the prompt has {len(ids)} tokens; with max_new_tokens {limit} that is over the model's "
                   f"context of {predictor.context} tokens")
        if on_bad_row == "error":
            raise DataError(path, rec.row, field, problem)
        bad.append((rec.row, field, problem))
    return keep


class Writer:
    """JSONL or CSV records to an open text stream (CSV: lists and dicts as JSON in their cell)."""

    def __init__(self, stream, fmt: str, columns: tuple[str, ...] = CLASSIFIER_COLUMNS):
        self.stream, self.fmt, self.columns = stream, fmt, columns
        self.csv = None
        if fmt == "csv":
            self.csv = csv.writer(stream)
            self.csv.writerow(columns)

    def write(self, rows: list[dict]) -> None:
        for r in rows:
            if self.csv is not None:
                self.csv.writerow([json.dumps(r[c], ensure_ascii=False) if isinstance(r[c], (list, dict)) else r[c]
                                   for c in self.columns])
            else:
                self.stream.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.stream.flush()


def output_format(out: Optional[Path]) -> str:
    if out is None:
        return "jsonl"
    fmt = OUTPUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise DataError(out, None, None, f"unknown output format {out.suffix!r}; use .jsonl or .csv")
    return fmt


def predict_file(predictor, path: Path, stream, fmt: str, *, text_column: str = "text", id_column: str = "id",
                 top_k: int = 3, chunk: int = 1024, on_bad_row: str = "error", progress_stream=None,
                 generation: dict | None = None, log: PredictionLogger | None = None) -> dict:
    """Scan, then predict `path` chunk by chunk into `stream`. Returns counts and the bad rows.
    `generation` (a dict of GenerationPredictor.generate options, {} for the export's defaults) writes
    generated responses instead of labels; `log` logs each classifier prediction (module doc)."""
    scan = scan_file(path, text_column, id_column, on_bad_row)
    good = scan.rows - len(scan.bad)
    tagger = getattr(predictor, "task", None) == "token_classification"
    columns = ENTITY_COLUMNS if tagger else GENERATION_COLUMNS if generation is not None else \
        CLASSIFIER_COLUMNS + (("abstained",) if abstains(predictor) else ())
    writer = Writer(stream, fmt, columns)
    bar = Progress(good, "predict", "row", stream=progress_stream or sys.stderr, interval=10.0, final=True)
    field = "line" if input_format(path) == "txt" else text_column
    late: list = []  # bad rows found only by the model (a prompt too long for its context)
    t0 = time.perf_counter()
    for batch in chunks(path, text_column, id_column, chunk):
        if tagger:
            writer.write(entity_rows(predictor, batch))
        elif generation is None:
            writer.write(output_rows(predictor, batch, top_k, log))
        else:
            writer.write(generated_rows(predictor, fitting(predictor, batch, generation, path, field, on_bad_row,
                                                           late), generation))
        bar.update(len(batch))
    bar.close()
    bad = sorted(scan.bad + late, key=lambda b: b[0])
    return {"rows": scan.rows, "predicted": good - len(late), "bad_rows": bad, "blank_lines": scan.blank_lines,
            "ids": "column" if scan.id_column_found else "row numbers", "seconds": round(time.perf_counter() - t0, 2)}
