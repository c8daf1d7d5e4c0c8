"""Reading a labelled source (files, a folder of them, or a Hugging Face dataset) into raw tables.

A source becomes a list of `RawTable`s: the cells exactly as the file holds
them plus, per row, the row number a person would use to find it:
- CSV/TSV: the data record number, 1 = the first record after the header
  (blank lines are not records); messages also give the physical line.
- JSONL: the line number (there is no header).
- Parquet / Hugging Face: the 1-based row position.
Bytes that are not UTF-8 are kept as lone surrogates (surrogateescape) and
reported per cell with their byte offset in the file, so one bad byte costs
one row (in skip mode), not the whole file.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from domaintune.data import DataError

log = logging.getLogger("domaintune")

EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
# File stems / split names a source may use for its own splits.
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                 "test": "test"}
# bytes that were not UTF-8, as surrogateescape keeps them
UNDECODABLE = re.compile("[\udc80-\udcff]")
_BOM = b"\xef\xbb\xbf"


@dataclass
class RawTable:
    file: str                      # as shown in error messages
    stem: str                      # prefix of generated ids: "<stem>:<row>"
    frame: pd.DataFrame            # the file's columns, values as read (str, number or None)
    rows: list[int]                # per frame row: the row number a person uses (see module doc)
    split: str | None = None       # the source's own split for this whole table, if it has one
    # frame position -> [(field or None for the whole row, reason, detail)]: problems found while reading
    bad: dict[int, list[tuple[str | None, str, str]]] = field(default_factory=dict)
    lines: list[int] | None = None  # physical line of each row (text formats), for messages


def _decode(path: Path) -> tuple[str, int]:
    raw = path.read_bytes()
    skip = len(_BOM) if raw.startswith(_BOM) else 0
    return raw[skip:].decode("utf-8", errors="surrogateescape"), skip


def _byte_offsets(text: str, base: int) -> list[int]:
    """Byte offset in the file of every undecodable byte, in text order."""
    out, prev_char, prev_byte = [], 0, base
    for m in UNDECODABLE.finditer(text):
        prev_byte += len(text[prev_char:m.start()].encode("utf-8", "surrogateescape"))
        out.append(prev_byte)
        prev_byte += 1
        prev_char = m.end()
    return out


def read_delimited(path: Path, delimiter: str) -> RawTable:
    text, bom = _decode(path)
    offsets = iter(_byte_offsets(text, bom)) if UNDECODABLE.search(text) else None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(path, None, None, "file is empty (no header row)") from None
    except csv.Error as exc:
        raise DataError(path, None, None, f"malformed header: {exc}") from None
    if offsets is not None and any(UNDECODABLE.search(h) for h in header):
        raise DataError(path, None, None, f"header has undecodable bytes (not UTF-8) at byte {next(offsets)}")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DataError(path, None, dup[0], "column name appears more than once in the header")
    records, rows, lines, bad = [], [], [], {}
    width = len(header)
    while True:
        start_line = reader.line_num + 1
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(path, len(records) + 1, None, f"malformed row at line {start_line}: {exc}") from None
        if not rec:  # blank line: not a record
            continue
        pos = len(records)
        if offsets is not None:
            for col, cell in zip(header + ["<extra field>"] * len(rec), rec):
                n = len(UNDECODABLE.findall(cell))
                if n:
                    first = next(offsets)
                    for _ in range(n - 1):
                        next(offsets)
                    bad.setdefault(pos, []).append(
                        (col, "undecodable_bytes", f"bytes that are not UTF-8 at byte offset {first} (line {start_line})"))
        if len(rec) != width:
            bad.setdefault(pos, []).append(
                (None, "malformed_row", f"has {len(rec)} fields, the header has {width} (line {start_line})"))
        rec = (rec + [None] * width)[:width]
        records.append(rec)
        rows.append(pos + 1)
        lines.append(start_line)
    frame = pd.DataFrame(records, columns=header, dtype=object)
    return RawTable(str(path), path.stem, frame, rows, bad=bad, lines=lines)


def _json_key_before(prefix: str) -> str | None:
    keys = re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', prefix)
    return keys[-1] if keys else None


def read_jsonl(path: Path) -> RawTable:
    text, bom = _decode(path)
    records, rows, bad = [], [], {}
    byte_pos = bom
    # split on "\n" only: str.splitlines would also break on U+2028 inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line_bytes = len(line.encode("utf-8", "surrogateescape")) + 1
        stripped = line.strip()
        if stripped:
            pos = len(records)
            m = UNDECODABLE.search(line)
            rec: dict = {}
            if m:
                off = byte_pos + len(line[:m.start()].encode("utf-8", "surrogateescape"))
                bad.setdefault(pos, []).append((_json_key_before(line[:m.start()]), "undecodable_bytes",
                                                f"bytes that are not UTF-8 at byte offset {off}"))
            try:
                rec = json.loads(stripped)
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            except ValueError as exc:
                rec = {}
                bad.setdefault(pos, []).append((None, "malformed_row", f"invalid JSON: {exc}"))
            records.append(rec)
            rows.append(lineno)
        byte_pos += line_bytes
    if not records:
        raise DataError(path, None, None, "file has no records")
    frame = pd.DataFrame.from_records(records)
    frame = frame.astype(object).where(frame.notna(), None)
    return RawTable(str(path), path.stem, frame, rows, bad=bad)


def _decode_binary_cells(frame: pd.DataFrame) -> dict[int, list[tuple[str | None, str, str]]]:
    """Binary cells (Parquet / datasets bytes columns) -> str in place, as the text readers decode:
    bytes that are not UTF-8 stay as surrogates and are reported with their offset in the cell."""
    bad: dict[int, list[tuple[str | None, str, str]]] = {}
    for col in frame.columns:
        is_bytes = frame[col].map(lambda v: isinstance(v, bytes)).to_numpy(dtype=bool)
        if not is_bytes.any():
            continue
        values = frame[col].to_numpy(copy=True)
        for i in np.flatnonzero(is_bytes):
            text = values[i].decode("utf-8", errors="surrogateescape")
            if m := UNDECODABLE.search(text):
                offset = len(text[:m.start()].encode("utf-8", "surrogateescape"))
                bad.setdefault(int(i), []).append(
                    (col, "undecodable_bytes", f"bytes that are not UTF-8 at byte offset {offset} of the cell"))
            values[i] = text
        frame[col] = values
    return bad


def _table_of_frame(frame: pd.DataFrame, file: str, stem: str, split: str | None = None) -> RawTable:
    frame = frame.astype(object).where(frame.notna(), None)
    bad = _decode_binary_cells(frame)
    return RawTable(file, stem, frame, list(range(1, len(frame) + 1)), split=split, bad=bad)


def read_parquet(path: Path) -> RawTable:
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(path, None, None, f"cannot read Parquet: {exc}") from None
    return _table_of_frame(frame, str(path), path.stem)


def read_file(path: Path) -> RawTable:
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind == "csv":
        return read_delimited(path, ",")
    if kind == "tsv":
        return read_delimited(path, "\t")
    if kind == "jsonl":
        return read_jsonl(path)
    if kind == "parquet":
        return read_parquet(path)
    raise DataError(path, None, None, f"unsupported file type {path.suffix!r}; use one of {sorted(EXTENSIONS)}")


def split_of_stem(stem: str) -> str | None:
    """'train', 'dev', 'valid-00001', 'test_part2' -> the split they name; anything else -> None."""
    head = re.split(r"[-_.]", stem.lower(), maxsplit=1)[0]
    return SPLIT_ALIASES.get(head)


def read_folder(folder: Path) -> list[RawTable]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise DataError(folder, None, None, f"folder holds no {'/'.join(sorted(EXTENSIONS))} files")
    named = {p: split_of_stem(p.stem) for p in files}
    with_split = [p.name for p, s in named.items() if s]
    without = [p.name for p, s in named.items() if not s]
    if with_split and without:
        raise DataError(folder, None, None,
                        f"some files name a split ({with_split}) and some do not ({without}); "
                        "name every file train/validation/test.* or none of them")
    tables = [read_file(p) for p in files]
    for t, p in zip(tables, files):
        t.split = named[p]
    return tables


def read_hf(spec: str) -> list[RawTable]:
    """`hf:<name>` or `hf:<name>:<config>`, loaded with `datasets` (needs the network or its cache)."""
    import datasets  # heavy, and only when the user names a hub dataset

    name, _, config = spec[len("hf:"):].partition(":")
    if not name:
        raise DataError(spec, None, None, "expected hf:<dataset name>[:<config>]")
    loaded = datasets.load_dataset(name, config or None)
    return tables_from_hf(loaded, spec)


def tables_from_hf(loaded, spec: str) -> list[RawTable]:
    """One table per split of a datasets.Dataset/DatasetDict; ClassLabel ints become their names."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    tables = []
    for split_name, ds in loaded.items():
        split = SPLIT_ALIASES.get(split_name.lower())
        if split is None:
            log.warning("%s: ignoring split %r (not train/validation/test)", spec, split_name)
            continue
        frame = ds.to_pandas()
        for col, feat in ds.features.items():
            if isinstance(feat, datasets.ClassLabel):
                # -1 is the datasets convention for "no label" (e.g. hidden test labels)
                frame[col] = [feat.int2str(int(v)) if v is not None and int(v) >= 0 else None for v in frame[col]]
        tables.append(_table_of_frame(frame, f"{spec}[{split_name}]", split_name, split))
    if not tables:
        raise DataError(spec, None, None, f"no train/validation/test split; found {list(loaded)}")
    return tables


def read_source(source: str) -> list[RawTable]:
    if source.startswith("hf:"):
        return read_hf(source)
    path = Path(source)
    if not path.exists():
        raise DataError(path, None, None, "source not found")
    if path.is_dir():
        return read_folder(path)
    return [read_file(path)]
