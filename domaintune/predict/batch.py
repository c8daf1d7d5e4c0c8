"""Batch prediction over a file of texts, streamed in chunks: what `domaintune predict` runs.

Input: CSV, TSV, JSONL, Parquet or TXT (one text per line), read in chunks (csv/line iterators,
pyarrow record batches), so memory stays bounded whatever the file size. Row numbers follow
domaintune.sources (what ingest reports): CSV/TSV the data record after the header (blank lines
are not records), JSONL and TXT the line, Parquet the 1-based row position. Bad rows (missing,
empty or non-text text, undecodable bytes, a wrong field count, a line that is not JSON) are
found in a first pass, before anything is written: `on_bad_row="error"` stops at the first
with one line naming file, row and field; `"skip"` lists every one of them and predicts the rest.
Output: JSONL or CSV, one record per good row: id, text, label, calibrated confidence, top_k; for a
generation export (`generation=` given) id, text, the generated response, its finish_reason ("stop" or
"length") and token counts. A prompt too long for the model's context with its token budget is a bad row
too, found when its chunk is generated.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from domaintune.core.errors import DataError
from domaintune.core.progress import Progress
from domaintune.data.sources import UNDECODABLE, iter_text_lines

INPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt"}
OUTPUT_FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
CLASSIFIER_COLUMNS = ("id", "text", "label", "confidence", "top_k")
GENERATION_COLUMNS = ("id", "text", "response", "finish_reason", "prompt_tokens", "completion_tokens")


@dataclass
class Record:
    row: int                    # the row number a person uses (module doc)
    id: Optional[str]
    text: Optional[str]
    field: Optional[str] = None  # set on a bad row: which field is wrong (None = the whole row)
    problem: Optional[str] = None


@dataclass
class Scan:
    rows: int = 0
    bad: list = field(default_factory=list)   # (row, field, problem)
    blank_lines: int = 0


def input_format(path: Path) -> str:
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(path, None, None, f"unknown input format {path.suffix!r}; use one of "
                        + ", ".join(INPUT_FORMATS))
    if not path.is_file():
        raise DataError(path, None, None, "no such file")
    return fmt


def _check_text(rec: Record, text_column: str) -> Record:
    if rec.problem is None:
        if rec.text is None:
            rec.field, rec.problem = text_column, "missing"
        elif not isinstance(rec.text, str):
            rec.field, rec.problem = text_column, f"not text: {type(rec.text).__name__} {rec.text!r}"
        elif not rec.text.strip():
            rec.field, rec.problem = text_column, "empty text"
        elif UNDECODABLE.search(rec.text):
            rec.field, rec.problem = text_column, "bytes that are not UTF-8"
    return rec


def _delimited(path: Path, delimiter: str, text_column: str, id_column: str, scan: Scan) -> Iterator[Record]:
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(path, None, None, "file is empty (no header row)") from None
        except csv.Error as exc:
            raise DataError(path, None, None, f"malformed header: {exc}") from None
        if text_column not in header:
            raise DataError(path, None, text_column, f"no such column; the header has {header}")
        ti, ii = header.index(text_column), header.index(id_column) if id_column in header else None
        n = 0
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(path, n + 1, None, f"malformed row at line {reader.line_num}: {exc}") from None
            if not rec:
                scan.blank_lines += 1
                continue
            n += 1
            if len(rec) != len(header):
                yield Record(n, None, None, None, f"has {len(rec)} fields, the header has {len(header)} "
                                                  f"(line {reader.line_num})")
                continue
            yield Record(n, rec[ii] if ii is not None else str(n), rec[ti])


def _jsonl(path: Path, text_column: str, id_column: str, scan: Scan) -> Iterator[Record]:
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="\n") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                scan.blank_lines += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Record(lineno, None, None, None, f"not valid JSON: {exc.msg} at column {exc.colno}")
                continue
            if not isinstance(obj, dict):
                yield Record(lineno, None, None, None, f"not a JSON object but {type(obj).__name__}")
                continue
            rid = obj.get(id_column, lineno)
            yield Record(lineno, str(rid), obj.get(text_column))


def _txt(path: Path, scan: Scan) -> Iterator[Record]:
    for lineno, line, _ in iter_text_lines(path):  # the one line reader (undecodable bytes: _check_text's)
        if not line.strip():
            scan.blank_lines += 1
            continue
        yield Record(lineno, str(lineno), line)


def _parquet(path: Path, text_column: str, id_column: str, chunk: int) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, None, None, f"not a readable Parquet file: {exc}") from None
    names = pf.schema_arrow.names
    if text_column not in names:
        raise DataError(path, None, text_column, f"no such column; the file has {names}")
    cols = [text_column] + ([id_column] if id_column in names and id_column != text_column else [])
    n = 0
    for batch in pf.iter_batches(batch_size=chunk, columns=cols):
        texts = batch.column(text_column).to_pylist()
        ids = batch.column(id_column).to_pylist() if len(cols) > 1 else None
        for i, t in enumerate(texts):
            n += 1
            yield Record(n, str(ids[i]) if ids is not None else str(n), t)


def records(path: Path, text_column: str = "text", id_column: str = "id", chunk: int = 1024,
            scan: Scan | None = None) -> Iterator[Record]:
    """Every record of the file, checked, in file order (bad ones carry `problem`)."""
    scan = scan if scan is not None else Scan()
    fmt = input_format(path)
    if fmt in ("csv", "tsv"):
        it = _delimited(path, "," if fmt == "csv" else "\t", text_column, id_column, scan)
    elif fmt == "jsonl":
        it = _jsonl(path, text_column, id_column, scan)
    elif fmt == "txt":
        it = _txt(path, scan)
    else:
        it = _parquet(path, text_column, id_column, chunk)
    for rec in it:
        yield _check_text(rec, text_column if fmt != "txt" else "line")


def scan_file(path: Path, text_column: str, id_column: str, on_bad_row: str) -> Scan:
    """First pass: count rows and find bad ones (stops at the first with on_bad_row='error')."""
    scan = Scan()
    for rec in records(path, text_column, id_column, scan=scan):
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


def output_rows(predictor, batch: list[Record], top_k: int) -> list[dict]:
    texts = [r.text for r in batch]
    probs = predictor.predict_proba(texts)
    labels = predictor.labels_from_proba(probs)
    tops = predictor.top_k(probs, top_k)
    return [{"id": r.id, "text": r.text, "label": lab, "confidence": round(top[0][1], 6),
             "top_k": [{"label": name, "confidence": round(p, 6)} for name, p in top]}
            for r, lab, top in zip(batch, labels, tops)]


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
                 generation: dict | None = None) -> dict:
    """Scan, then predict `path` chunk by chunk into `stream`. Returns counts and the bad rows.
    `generation` (a dict of GenerationPredictor.generate options, {} for the export's defaults) writes
    generated responses instead of labels."""
    scan = scan_file(path, text_column, id_column, on_bad_row)
    good = scan.rows - len(scan.bad)
    writer = Writer(stream, fmt, CLASSIFIER_COLUMNS if generation is None else GENERATION_COLUMNS)
    bar = Progress(good, "predict", "row", stream=progress_stream or sys.stderr, interval=10.0, final=True)
    field = "line" if input_format(path) == "txt" else text_column
    late: list = []  # bad rows found only by the model (a prompt too long for its context)
    t0 = time.perf_counter()
    for batch in chunks(path, text_column, id_column, chunk):
        if generation is None:
            writer.write(output_rows(predictor, batch, top_k))
        else:
            writer.write(generated_rows(predictor, fitting(predictor, batch, generation, path, field, on_bad_row,
                                                           late), generation))
        bar.update(len(batch))
    bar.close()
    bad = sorted(scan.bad + late, key=lambda b: b[0])
    return {"rows": scan.rows, "predicted": good - len(late), "bad_rows": bad, "blank_lines": scan.blank_lines,
            "seconds": round(time.perf_counter() - t0, 2)}
