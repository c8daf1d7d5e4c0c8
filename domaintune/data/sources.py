"""Reading a labelled source (files, a folder of them, or a Hugging Face dataset) into raw tables.

A source becomes a list of `RawTable`s: the cells exactly as the file holds
them plus, per row, the row number a person would use to find it:
- CSV/TSV: the data record number, 1 = the first record after the header
  (blank lines are not records); messages also give the physical line.
- JSONL: the line number (there is no header).
- Parquet / Hugging Face: the 1-based row position.
- .txt (batches of texts for `domaintune monitor`, not a labelled source): the line number.
Bytes that are not UTF-8 are kept as lone surrogates (surrogateescape) and
reported per cell with their byte offset in the file, so one bad byte costs
one row (in skip mode), not the whole file; raise_problems turns the first into a
DataError for callers that cannot skip rows. A JSON string holding half of a UTF-16
pair ("\\ud800", not a character: it cannot be written as UTF-8) is a problem of its
cell too (reason lone_surrogate), and so is a JSONL line nested deeper than Python's
recursion limit (malformed_row). Lines end at "\\n" or "\\r\\n" in every text format; a
file whose only line ends are lone "\\r" (old Mac) is refused as a whole.

CSV/TSV are read by this module's own reader (parse_delimited), not Python's csv or
pandas: its quoting rule (below) never lets one stray quote swallow the rows after
it, and it has no field size limit (ingest.max_chars decides). JSONL numbers are kept
as the characters written (1.0 stays "1.0"), like numbers in CSV. A folder follows the
naming rule in read_folder's section: every file is used, or the stage stops naming it.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from domaintune.core.errors import DataError

log = logging.getLogger("domaintune")

# What a labelled source may be made of; READABLE adds .txt (one text per line) for batches of texts.
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
READABLE = {**EXTENSIONS, ".txt": "txt"}
# File stems / split names a source may use for its own splits.
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                 "test": "test"}
# bytes that were not UTF-8, as surrogateescape keeps them
UNDECODABLE = re.compile("[\udc80-\udcff]")
# any lone surrogate: what UNDECODABLE finds, or half of a UTF-16 pair from a JSON "\ud800" escape
SURROGATE = re.compile("[\ud800-\udfff]")
_UNWRITABLE = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # a surrogate that is not surrogateescape's byte
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON line that may decode to one (checked after parsing)
_OLD_MAC = "lines end with a lone carriage return (old Mac style); save the file with \\n or \\r\\n line ends"
_BOM = b"\xef\xbb\xbf"


@dataclass
class RawTable:
    file: str                      # as shown in error messages
    stem: str                      # prefix of generated ids: "<stem>:<row>"
    frame: pd.DataFrame            # the file's columns, values as read (str, number or None)
    rows: list[int]                # per frame row: the row number a person uses (see module doc)
    split: str | None = None       # the source's own split for this whole table, if it has one
    # frame position -> [(field or None, reason, detail)]: problems found while reading; a malformed_row
    # problem concerns the whole row (its field, when given, is where it was found)
    bad: dict[int, list[tuple[str | None, str, str]]] = field(default_factory=dict)
    lines: list[int] | None = None  # physical line of each row (text formats), for messages
    multiline: list[int] = field(default_factory=list)  # rows whose quoted fields span several lines
    # A streamed table (read_file(stream=True): CSV/TSV, JSONL, Parquet) holds no rows: `frame` has its
    # columns only and parts(split, rows) yields it as RawTables of at most `rows` rows, read a piece of
    # the file (Parquet: a row-group batch) at a time.
    parts: object = None
    multiline_lines: list[int] = field(default_factory=list)  # physical first line of each multiline row

    def slice(self, start: int, stop: int) -> "RawTable":
        """Rows start..stop-1 as a table of their own (frame positions renumbered from 0)."""
        return RawTable(self.file, self.stem, self.frame.iloc[start:stop].reset_index(drop=True), self.rows[start:stop],
                        self.split, {i - start: v for i, v in self.bad.items() if start <= i < stop},
                        self.lines[start:stop] if self.lines else None)


def iter_parts(table: RawTable, rows: int):
    """A table as RawTables of at most `rows` rows, in order: a streamed one read part by part
    (bounded memory), any other sliced."""
    if table.parts is not None:
        yield from table.parts(table.split, rows)
        return
    for start in range(0, len(table.frame), rows):
        yield table.slice(start, start + rows)


def _bom_length(path: Path, head: bytes) -> int:
    """How many bytes a file's start `head` spends on a UTF-8 BOM (0 or 3); a UTF-16 file is refused."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(path, None, None, "file is UTF-16 (it starts with a UTF-16 byte order mark); save it as UTF-8")
    return len(_BOM) if head.startswith(_BOM) else 0


def _decode(path: Path) -> tuple[str, int]:
    raw = path.read_bytes()
    skip = _bom_length(path, raw)
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


# ---------------------------------------------------------------- delimited text (CSV/TSV)
# The quoting rule (RFC 4180 quoting only when a whole field is quoted):
# - A record ends at "\n" or "\r\n" (a lone "\r" is text, except at the very end of the file).
#   A blank line is not a record.
# - A field that does not start with '"' is literal: everything up to the next delimiter or
#   line end, quotes included ('say "hi" now' stays exactly that).
# - A field that starts with '"' is quoted when a closing '"' (one not doubled: '""' inside is
#   one '"') is followed by the delimiter, a line end or the end of the file. Its text may span
#   lines.
# - A field that starts with '"' whose first closing quote, on the same line, is followed by
#   other text ('"urgent" please help') is literal too, quotes included.
# - Anything else (a quote opened and never closed, or closed on a later line and followed
#   by text) is a malformed row named by its first line; reading resumes on the next line,
#   so one stray quote never swallows the rows after it.
_QUOTED = re.compile(r'"((?:[^"]|"")*+)"')


def _field_end(text: str, pos: int, delim: str) -> bool:
    return (pos == len(text) or text[pos] == delim or text[pos] == "\n" or text.startswith("\r\n", pos)
            or (pos == len(text) - 1 and text[pos] == "\r"))


class _Record:
    __slots__ = ("fields", "spans", "line", "last_line", "problem", "unclosed")

    def __init__(self, line: int):
        self.fields: list[str] = []
        self.spans: list[tuple[int, int]] = []  # raw character span of each field in the text
        self.line, self.last_line, self.problem = line, line, None
        self.unclosed = False  # a quote with no closing quote anywhere after it in the text


def _literal(text: str, pos: int, delim: str) -> int:
    """End of a literal field starting at pos (before the delimiter / line end; a CRLF's \r excluded)."""
    eol = text.find("\n", pos)
    eol = len(text) if eol < 0 else eol
    end = text.find(delim, pos, eol)
    if end < 0:
        end = eol - 1 if eol > pos and text[eol - 1] == "\r" else eol  # CRLF, or a CR ending the file
    return end


def _slow_record(text: str, pos: int, line: int, delim: str) -> tuple[_Record, int, int]:
    """One record with quotes in it, field by field. Returns (record, next position, next line)."""
    rec = _Record(line)
    while True:
        if text.startswith('"', pos):
            eol = text.find("\n", pos)
            eol = len(text) if eol < 0 else eol
            m = _QUOTED.match(text, pos)
            if m and _field_end(text, m.end(), delim):
                rec.fields.append(m.group(1).replace('""', '"'))
                rec.spans.append((pos, m.end()))
                line += m.group(0).count("\n")
                pos = m.end()
            elif m and m.end() <= eol:
                end = _literal(text, pos, delim)
                rec.fields.append(text[pos:end])
                rec.spans.append((pos, end))
                pos = end
            else:
                rec.problem = (len(rec.fields), f"a quote opens this field at line {line} and no quote followed by "
                                                "the delimiter or a line end closes it")
                rec.unclosed = m is None
                return rec, eol + 1, line + 1
        else:
            end = _literal(text, pos, delim)
            rec.fields.append(text[pos:end])
            rec.spans.append((pos, end))
            pos = end
        if pos < len(text) and text[pos] == delim:
            pos += 1
            continue
        rec.last_line = line
        if text.startswith("\r\n", pos):
            return rec, pos + 2, line + 1
        return rec, pos + 1, line + 1  # "\n" or the end of the text


def _records(text: str, delim: str, pos: int = 0, line: int = 1):
    """Yield (record, next position, next line) from pos on (see the quoting rule above), blank lines skipped."""
    n = len(text)
    while pos < n:
        eol = text.find("\n", pos)
        eol = n if eol < 0 else eol
        if text.find('"', pos, eol) < 0:  # fast path: no quote on this line
            stop = eol - 1 if eol > pos and text[eol - 1] == "\r" else eol
            if stop > pos:
                rec = _Record(line)
                start = pos
                for part in text[pos:stop].split(delim):
                    rec.fields.append(part)
                    rec.spans.append((start, start + len(part)))
                    start += len(part) + 1
                yield rec, eol + 1, line + 1
            pos, line = eol + 1, line + 1
            continue
        rec, pos, line = _slow_record(text, pos, line, delim)
        yield rec, pos, line


def parse_delimited(text: str, delim: str):
    """Yield the records of a delimited text (see the quoting rule above), blank lines skipped."""
    for rec, _, _ in _records(text, delim):
        yield rec


# A CSV/TSV file is decoded and parsed CSV_BLOCK_BYTES at a time, cut after a line end (a line end
# is never inside a UTF-8 sequence, so each piece decodes as it would in the whole). Every record is
# decided by the text up to its end, except one whose quote is not closed in the text read so far:
# it is parsed again with the next piece (a quoted field may span pieces; a quote never closed
# keeps the rest of the file, as a whole read would).
CSV_BLOCK_BYTES = 16 << 20


def _pieces(path: Path, size: int):
    """(bytes, file offset) pieces of a file, each ending after a line end (the last at the end of the file)."""
    with open(path, "rb") as f:
        base, pending = 0, b""
        while chunk := f.read(size):
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if cut:
                yield pending[:cut], base
                base, pending = base + cut, pending[cut:]
        if pending:
            yield pending, base


def _stream_records(path: Path, delim: str, size: int):
    """(record, text, byte offset of text in the file) for every record of a delimited file, in order."""
    text, base, line, pos = "", 0, 1, 0
    pieces = _pieces(path, size)
    eof = False
    while not eof:
        nxt = next(pieces, None)
        eof = nxt is None
        if not eof:
            raw, off = nxt
            if off == 0:
                skip = _bom_length(path, raw)
                raw, off = raw[skip:], skip
                if b"\n" not in raw and b"\r" in raw:  # the first piece is the whole file when it has no line end
                    raise DataError(path, None, None, _OLD_MAC)
            piece = raw.decode("utf-8", errors="surrogateescape")
            if not text:
                base = off
            unclosed_before = bool(text)
            text += piece
            if unclosed_before and '"' not in piece:
                continue  # nothing in the new piece can close the open quote
        pos = 0
        for rec, nxt_pos, nxt_line in _records(text, delim, 0, line):
            if rec.unclosed and not eof:
                break
            yield rec, text, base
            pos, line = nxt_pos, nxt_line
        else:  # the text after the last record holds only blank lines
            line += text.count("\n", pos)
            pos = len(text)
        base += len(text[:pos].encode("utf-8", "surrogateescape"))
        text = text[pos:]


def _bad_finder(text: str, base: int):
    bad_at = [m.start() for m in UNDECODABLE.finditer(text)]
    offsets = _byte_offsets(text, base) if bad_at else []

    def first_bad(a: int, b: int) -> int | None:
        i = bisect.bisect_left(bad_at, a)
        return offsets[i] if i < len(bad_at) and bad_at[i] < b else None
    return first_bad


def _delimited_parts(path: Path, header: list[str], records, multiline: list[int], first_line: list[int]):
    """parts(split, rows) of a streamed delimited table: RawTables of at most `rows` records."""
    width = len(header)

    def parts(split, size):
        seen_text, first_bad, n = None, None, 0
        rows, lines, bad, cells = [], [], {}, []
        for rec, text, base in records:
            if text is not seen_text:
                seen_text, first_bad = text, _bad_finder(text, base)
            pos = len(cells)
            problems = []
            if rec.problem:
                k, what = rec.problem
                problems.append((header[k] if k < width else None, "malformed_row", what))
            for col, (a, b) in zip(header + ["<extra field>"] * len(rec.spans), rec.spans):
                if (off := first_bad(a, b)) is not None:
                    problems.append((col, "undecodable_bytes",
                                     f"bytes that are not UTF-8 at byte offset {off} (line {rec.line})"))
            if not rec.problem and len(rec.fields) != width:
                problems.append((None, "malformed_row",
                                 f"has {len(rec.fields)} fields, the header has {width} (line {rec.line})"))
            if problems:
                bad[pos] = problems
            cells.append((rec.fields + [None] * width)[:width])
            n += 1
            rows.append(n)
            lines.append(rec.line)
            if rec.last_line > rec.line:
                multiline.append(n)
                first_line.append(rec.line)
            if len(cells) == size:
                yield RawTable(str(path), path.stem, pd.DataFrame(cells, columns=header, dtype=object), rows, split,
                               bad=bad, lines=lines)
                rows, lines, bad, cells = [], [], {}, []
        if cells:
            yield RawTable(str(path), path.stem, pd.DataFrame(cells, columns=header, dtype=object), rows, split,
                           bad=bad, lines=lines)
    return parts


def read_delimited(path: Path, delimiter: str, stream: bool = False, empty_ok: bool = False) -> RawTable:
    """A CSV/TSV file: whole, or (stream) a table whose rows iter_parts reads piece by piece. A header without
    data rows is an error, or (empty_ok: a file rows are appended to, e.g. ingest.feedback) a table of no rows."""
    records = _stream_records(path, delimiter, CSV_BLOCK_BYTES)
    head = next(records, None)
    if head is None:
        raise DataError(path, None, None, "file is empty (no header row)")
    rec, text, base = head
    if rec.problem:
        raise DataError(path, None, None, f"malformed header: field {rec.problem[0] + 1}: {rec.problem[1]}")
    header = rec.fields
    if (off := _bad_finder(text, base)(0, rec.spans[-1][1])) is not None:
        raise DataError(path, None, None, f"header has undecodable bytes (not UTF-8) at byte {off}")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DataError(path, None, dup[0], "column name appears more than once in the header")
    first = next(records, None)
    if first is None:
        if empty_ok:
            return RawTable(str(path), path.stem, pd.DataFrame(columns=header, dtype=object), [])
        raise DataError(path, None, None, "file has a header but no data rows")

    def all_records():
        yield first
        yield from records
    multiline, first_line = [], []
    parts = _delimited_parts(path, header, all_records(), multiline, first_line)
    table = RawTable(str(path), path.stem, pd.DataFrame(columns=header, dtype=object), [], multiline=multiline,
                     parts=parts, multiline_lines=first_line)
    if stream:
        return table
    (whole,) = parts(None, None)
    whole.multiline, whole.multiline_lines = multiline, first_line
    return whole


def _json_key_before(prefix: str) -> str | None:
    keys = re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', prefix)
    return keys[-1] if keys else None


def _json_constant(name: str):
    # NaN is JSON's (non-standard) missing number; Infinity / -Infinity stay as written, like other numbers
    return float("nan") if name == "NaN" else name


# A JSONL file is read CSV_BLOCK_BYTES at a time (_pieces: cut after a "\n", so every line is whole in
# one piece and decodes as it would in the whole file). Lines end at "\n" only: str.splitlines would
# also break on U+2028 inside strings.
def _jsonl_lines(path: Path):
    """(line number, stripped text, text, byte offset in the file) of every non-blank line."""
    lineno = 0
    for raw, off in _pieces(path, CSV_BLOCK_BYTES):
        if off == 0:
            skip = _bom_length(path, raw)
            raw, off = raw[skip:], skip
        lines = raw.split(b"\n")
        if raw.endswith(b"\n"):
            lines.pop()  # the piece's last line end closes its last line
        for b in lines:
            lineno += 1
            line = b.decode("utf-8", errors="surrogateescape")
            if stripped := line.strip():
                yield lineno, stripped, line, off
            off += len(b) + 1


# numbers stay as written (1.0 is "1.0", 01 is invalid JSON): see the label rule in ingest. One decoder
# for every line: json.loads with these arguments builds a new one per call (most of its time on short lines).
_JSON_ARGS = dict(parse_int=str, parse_float=str, parse_constant=_json_constant)
_JSON = json.JSONDecoder(**_JSON_ARGS)


def _json_record(stripped: str) -> tuple[dict, str | None]:
    """A line's record ({} when it is not one) and why it is not: json.loads(stripped, **_JSON_ARGS)."""
    try:
        # json.loads refuses a leading U+FEFF with its own message; otherwise it is _JSON.decode
        rec = json.loads(stripped, **_JSON_ARGS) if stripped.startswith("\ufeff") else _JSON.decode(stripped)
        if not isinstance(rec, dict):
            raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    except ValueError as exc:
        return {}, f"invalid JSON: {exc}"
    except RecursionError:
        return {}, f"invalid JSON: nested deeper than {sys.getrecursionlimit()} levels"
    return rec, None


def lone_surrogate(value) -> str | None:
    """Where a parsed JSON value (strings, lists, dicts, at any depth) holds a lone surrogate, as a message;
    None when it holds none. Walked without recursion (the value may be nested as deep as the parser allows)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if m := SURROGATE.search(v):
                return (f"holds a lone surrogate \\u{ord(m.group()):04x} at character {m.start()} (a JSON \\u "
                        "escape of half a UTF-16 pair: not a character, it cannot be written as UTF-8)")
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return None


def _escaped(text: str) -> str:
    """`text` with each surrogate UTF-8 cannot write (even as surrogateescape's bytes) spelled as its JSON escape."""
    return _UNWRITABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _record_surrogates(rec: dict) -> tuple[dict, list[tuple[str | None, str, str]]]:
    """lone_surrogate per cell of a JSONL record: (key, "lone_surrogate", message); a key holding one is a
    problem of the whole row (field None: the key cannot be named as it is). The record comes back with every
    such surrogate spelled as its escape ("\\ud800", what the file holds), at any depth, so no string this
    module returns is one UTF-8 cannot write: the row is reported, and writing it (rejected.csv) cannot fail."""
    found = []
    for k, v in rec.items():
        if SURROGATE.search(k):
            found.append((None, "lone_surrogate", f"a key {lone_surrogate(k)}"))
        elif problem := lone_surrogate(v):
            found.append((k, "lone_surrogate", problem))
    if not found:
        return rec, found
    rec = {_escaped(k): v for k, v in rec.items()}
    stack = [rec]
    while stack:  # in place, without recursion (the value may be nested as deep as the parser allows)
        c = stack.pop()
        if isinstance(c, dict):
            for k in [k for k in c if isinstance(k, str) and _UNWRITABLE.search(k)]:
                c[_escaped(k)] = c.pop(k)
        for k, v in (c.items() if isinstance(c, dict) else enumerate(c)):
            if isinstance(v, str):
                c[k] = _escaped(v)
            elif isinstance(v, (dict, list)):
                stack.append(v)
    return rec, found


def _jsonl_columns(path: Path) -> list[str]:
    """Every record's keys in order of first appearance (pandas.DataFrame.from_records' order),
    read line by line: only the keys are kept."""
    columns: dict[str, None] = {}
    records = 0
    for _, stripped, _, _ in _jsonl_lines(path):
        records += 1
        rec, _ = _json_record(stripped)
        if not columns.keys() >= rec.keys():
            for k in rec:
                columns.setdefault(k, None)
    if not records:
        raise DataError(path, None, None, "file has no records")
    return list(columns)


def _jsonl_table(path: Path, records: list[dict], columns: list[str] | None, rows, split, bad) -> RawTable:
    frame = pd.DataFrame.from_records(records, columns=columns)
    frame = frame.astype(object).where(frame.notna(), None)
    return RawTable(str(path), path.stem, frame, rows, split, bad=bad)


def _jsonl_parts(path: Path, columns: list[str] | None):
    """parts(split, rows) of a JSONL file: RawTables of at most `rows` records (row = line number) with
    `columns` (None: the keys of the records in the part, as from_records finds them)."""
    known = None if columns is None else set(columns)

    def parts(split, size):
        records, rows, bad = [], [], {}
        for lineno, stripped, line, off in _jsonl_lines(path):
            pos = len(records)
            if m := UNDECODABLE.search(line):
                at = off + len(line[:m.start()].encode("utf-8", "surrogateescape"))
                bad.setdefault(pos, []).append((_json_key_before(line[:m.start()]), "undecodable_bytes",
                                                f"bytes that are not UTF-8 at byte offset {at}"))
            rec, problem = _json_record(stripped)
            if problem:
                bad.setdefault(pos, []).append((None, "malformed_row", problem))
            elif _SURROGATE_ESCAPE.search(stripped):
                rec, found = _record_surrogates(rec)
                if found:
                    bad.setdefault(pos, []).extend(found)
            if known is not None and not known.issuperset(rec):  # never a cell dropped unseen
                raise DataError(path, lineno, next(k for k in rec if k not in known), "key not in the file when its "
                                "columns were read: the file changed while ingest read it")
            records.append(rec)
            rows.append(lineno)
            if len(records) == size:
                yield _jsonl_table(path, records, columns, rows, split, bad)
                records, rows, bad = [], [], {}
        if records:
            yield _jsonl_table(path, records, columns, rows, split, bad)
    return parts


def read_jsonl(path: Path, stream: bool = False) -> RawTable:
    """A JSONL file: whole, or (stream) a table whose rows iter_parts reads piece by piece; its columns
    (every record's keys) come from a first pass over the file that keeps only the keys."""
    if stream:
        columns = _jsonl_columns(path)
        return RawTable(str(path), path.stem, pd.DataFrame(columns=columns, dtype=object), [],
                        parts=_jsonl_parts(path, columns))
    parts = _jsonl_parts(path, None)(None, None)
    whole = next(parts, None)
    parts.close()
    if whole is None:
        raise DataError(path, None, None, "file has no records")
    return whole


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


def _parquet_frame(path: Path, table) -> pd.DataFrame:
    import pyarrow as pa

    try:
        return table.to_pandas()
    except Exception:  # a string column holding bytes that are not UTF-8: read it as bytes, decode per cell
        as_bytes = pa.schema([f.with_type(pa.large_binary()) if pa.types.is_string(f.type)
                              or pa.types.is_large_string(f.type) else f for f in table.schema])
        try:
            return table.cast(as_bytes).to_pandas()
        except Exception as exc:
            raise DataError(path, None, None, f"cannot read Parquet: {exc}") from None


def read_parquet(path: Path, stream: bool = False) -> RawTable:
    """The whole file, or (stream) a table read in batches of row groups by iter_parts: pyarrow's
    ParquetFile.iter_batches, so only one batch is ever Python objects."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if stream:
            # not pre-buffered: that keeps every row group read (~70 bytes a row) until the file is closed
            pf = pq.ParquetFile(path, pre_buffer=False)
            empty = pf.schema_arrow.empty_table()
        else:
            table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(path, None, None, f"cannot read Parquet: {exc}") from None
    if stream:
        if pf.metadata.num_rows == 0:
            raise DataError(path, None, None, "file has no rows")

        def parts(split, rows):
            done = 0
            try:
                batches = pf.iter_batches(batch_size=rows)
                for batch in batches:
                    frame = _parquet_frame(path, pa.Table.from_batches([batch]))
                    t = _table_of_frame(frame, str(path), path.stem, split)
                    t.rows = list(range(done + 1, done + len(t.rows) + 1))
                    done += len(t.rows)
                    yield t
            except DataError:
                raise
            except Exception as exc:  # a corrupt row group
                raise DataError(path, None, None, f"cannot read Parquet: {exc}") from None
        return RawTable(str(path), path.stem, _parquet_frame(path, empty).astype(object), [], parts=parts)
    frame = _parquet_frame(path, table)
    if frame.empty:
        raise DataError(path, None, None, "file has no rows")
    return _table_of_frame(frame, str(path), path.stem)


def iter_text_lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """The one reader of one-text-per-line files (ingest's .txt, monitor batches, predict inputs, DAPT corpora),
    streamed: (line number, text, problem). UTF-8 (a BOM is dropped; UTF-16 is refused), a line ends at "\n" or
    "\r\n" (a lone "\r" is text), the final line end opens no extra line; a file with no "\n" but a "\r" has
    old Mac line ends and is refused, as in CSV. `problem` says where a line holds bytes that are not UTF-8
    (kept as surrogates in the text, so a caller may skip the row or stop)."""
    if not path.is_file():
        raise DataError(path, None, None, "file not found" if not path.exists() else "not a regular file")
    with open(path, "rb") as fh:
        byte_pos = _bom_length(path, fh.read(len(_BOM)))
        fh.seek(byte_pos)
        for n, raw in enumerate(fh, start=1):
            if n == 1 and not raw.endswith(b"\n") and b"\r" in raw:  # the whole file, and no "\n" in it
                raise DataError(path, None, None, _OLD_MAC)
            body = raw[:-1] if raw.endswith(b"\n") else raw
            text = (body[:-1] if body.endswith(b"\r") else body).decode("utf-8", errors="surrogateescape")
            problem = None
            if m := UNDECODABLE.search(text):
                problem = (f"bytes that are not UTF-8 at byte offset "
                           f"{byte_pos + len(text[:m.start()].encode('utf-8', 'surrogateescape'))}")
            byte_pos += len(raw)
            yield n, text, problem


def text_lines(path: Path) -> tuple[list[str], dict[int, str]]:
    """iter_text_lines, whole: (lines, problems by line index)."""
    lines, bad = [], {}
    for n, text, problem in iter_text_lines(path):
        lines.append(text)
        if problem:
            bad[n - 1] = problem
    return lines, bad


def read_lines(path: str | Path, what: str = "file") -> list[str]:
    """text_lines for a caller that needs every line: the first line with bytes that are not UTF-8 is a
    DataError naming the file and row (= line number); an empty file is one too (`what` names it)."""
    path = Path(path)
    lines, bad = text_lines(path)
    if bad:
        i = min(bad)
        raise DataError(path, i + 1, None, bad[i])
    if not lines:
        raise DataError(path, None, None, f"{what} is empty")
    return lines


def read_txt(path: Path) -> RawTable:
    """One text per line (column "text"; text_lines); row = line number."""
    lines, problems = text_lines(path)
    if not lines:
        raise DataError(path, None, None, "file is empty")
    bad = {i: [("text", "undecodable_bytes", detail)] for i, detail in problems.items()}
    frame = pd.DataFrame({"text": lines}, dtype=object)
    return RawTable(str(path), path.stem, frame, list(range(1, len(lines) + 1)), bad=bad,
                    lines=list(range(1, len(lines) + 1)))


def read_file(path: Path, kinds: dict[str, str] | None = None, stream: bool = False) -> RawTable:
    """One file by its extension (`kinds`, default EXTENSIONS plus .txt). Problems found in cells
    (bytes that are not UTF-8, malformed rows) are in RawTable.bad; raise_problems turns them into
    a DataError for callers that need every row. `stream`: CSV/TSV, JSONL and Parquet are read part by
    part (iter_parts)."""
    kind = (kinds or READABLE).get(path.suffix.lower())
    if not path.is_file():
        raise DataError(path, None, None, "file not found" if not path.exists() else "not a regular file")
    if kind == "csv":
        return read_delimited(path, ",", stream)
    if kind == "tsv":
        return read_delimited(path, "\t", stream)
    if kind == "jsonl":
        return read_jsonl(path, stream)
    if kind == "parquet":
        return read_parquet(path, stream)
    if kind == "txt":
        return read_txt(path)
    raise DataError(path, None, None, f"unsupported file type {''.join(path.suffixes) or path.name!r}; "
                                      f"use one of {sorted(kinds or READABLE)}")


def _txt_parts(path: Path, rows: int) -> Iterator[RawTable]:
    lines, numbers, bad = [], [], {}
    for n, text, problem in iter_text_lines(path):
        if problem:
            bad[len(lines)] = [("text", "undecodable_bytes", problem)]
        lines.append(text)
        numbers.append(n)
        if len(lines) == rows:
            yield RawTable(str(path), path.stem, pd.DataFrame({"text": lines}, dtype=object), numbers, bad=bad,
                           lines=numbers)
            lines, numbers, bad = [], [], {}
    if lines:
        yield RawTable(str(path), path.stem, pd.DataFrame({"text": lines}, dtype=object), numbers, bad=bad,
                       lines=numbers)


def iter_tables(path: Path, rows: int) -> Iterator[RawTable]:
    """Any READABLE file (CSV, TSV, JSONL, Parquet, TXT) as RawTables of at most `rows` rows, in file order,
    read part by part whatever the file's size: read_file's rows, row numbers and problems (TXT as read_txt:
    column "text"; a JSONL part has the keys its own records have, one pass over the file). A file with no
    rows is a DataError, as in read_file."""
    kind = READABLE.get(path.suffix.lower())
    if kind in ("txt", "jsonl"):
        if not path.is_file():
            raise DataError(path, None, None, "file not found" if not path.exists() else "not a regular file")
        parts = _txt_parts(path, rows) if kind == "txt" else _jsonl_parts(path, None)(None, rows)
        first = next(parts, None)
        if first is None:
            raise DataError(path, None, None, "file is empty" if kind == "txt" else "file has no records")
        yield first
        yield from parts
        return
    yield from iter_parts(read_file(path, READABLE, stream=True), rows)


def raise_problems(table: RawTable, columns: list[str]) -> None:
    """DataError for the first problem the reader found in `columns` (or in a whole row)."""
    for i, problems in sorted(table.bad.items()):
        for fld, reason, detail in problems:
            if fld is None or fld in columns or reason == "malformed_row":
                raise DataError(table.file, table.rows[i], fld, detail)


# ---------------------------------------------------------------- folders
# Naming rule: a file's split is the split word (train, validation, valid, dev, test) that is a
# token of its name, tokens being split at "-", "_", ".", " " (tickets_train.csv, dev.jsonl,
# train-00001-of-00002.parquet). Either every file names exactly one split, or none does (then
# all rows are pooled and split by ingest.split). Names starting with "." are ignored (hidden
# files and atomic_output's temporaries); anything else the rule cannot place (another type,
# a sub-folder, a broken or looping link, a file naming no split or two) is an error naming it.

def splits_in_name(name: str) -> list[str]:
    """'tickets_train.csv' -> ['train']; 'trained.csv' -> []; 'train_test.csv' -> ['train', 'test']."""
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    found = []
    for tok in re.split(r"[-_. ]+", stem.lower()):
        split = SPLIT_ALIASES.get(tok)
        if split and split not in found:
            found.append(split)
    return found


def _folder_entry_error(p: Path) -> str | None:
    if p.is_symlink():
        try:
            p.stat()
        except FileNotFoundError:
            return f"broken symbolic link (to {os.readlink(p)!r})"
        except OSError as exc:
            return f"symbolic link cannot be followed ({exc.strerror}: a loop?)"
    if p.is_dir():
        return "a folder inside the source folder; ingest reads one level only (move it out or use it as the source)"
    if not p.is_file():
        return "not a regular file"
    if p.suffix.lower() not in EXTENSIONS:
        return (f"unsupported file type {''.join(p.suffixes) or p.name!r} (compressed files too); a source folder "
                f"may hold only {'/'.join(sorted(EXTENSIONS))} files (names starting with '.' are ignored)")
    return None


def read_folder(folder: Path, stream: bool = False) -> list[RawTable]:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for p in entries:
        if problem := _folder_entry_error(p):
            raise DataError(p, None, None, problem)
    if not entries:
        raise DataError(folder, None, None, f"folder holds no {'/'.join(sorted(EXTENSIONS))} files")
    named = {p: splits_in_name(p.name) for p in entries}
    for p, found in named.items():
        if len(found) > 1:
            raise DataError(p, None, None, f"file name names more than one split {found}; name exactly one")
    with_split = [p.name for p, f in named.items() if f]
    if with_split:
        for p, f in named.items():
            if not f:
                raise DataError(p, None, None, f"file name names no split while {with_split} do; put one of "
                                f"{sorted(SPLIT_ALIASES)} in every file name (e.g. tickets_train.csv), or in none")
    tables = [read_file(p, EXTENSIONS, stream) for p in entries]
    for t, p in zip(tables, entries):
        t.split = named[p][0] if named[p] else None
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


def read_source(source: str, stream: bool = False) -> list[RawTable]:
    """The source's tables; `stream`: its CSV/TSV, JSONL and Parquet files are read part by part (see iter_parts)."""
    if source.startswith("hf:"):
        return read_hf(source)
    path = Path(source)
    if not path.exists():
        raise DataError(path, None, None, "source not found")
    if path.is_dir():
        return read_folder(path, stream)
    return [read_file(path, EXTENSIONS, stream)]
