"""JSONL read piece by piece (read_jsonl(stream=True)): the same columns up front, the same cells, row
numbers and problems, and the same ingest result in any piece and part size as one whole read; the
whole read is what it was before streaming (checked against that reader, kept here as `_whole_read`)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from domaintune.core.errors import DataError
from domaintune.core.params import IngestParams
from domaintune.data import ingest as ingest_stage_lib
from domaintune.data import sources
from domaintune.data.dataset import dataset_hashes
from domaintune.data.sources import iter_parts, read_jsonl, read_source
from stages import ingest as ingest_stage


def _whole_read(path):
    """read_jsonl as it was before it streamed: the whole file decoded, every line parsed into one list."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(path, None, None, "file is UTF-16 (it starts with a UTF-16 byte order mark); save it as UTF-8")
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    text = raw[bom:].decode("utf-8", errors="surrogateescape")
    records, rows, bad, byte_pos = [], [], {}, bom
    for lineno, line in enumerate(text.split("\n"), start=1):
        line_bytes = len(line.encode("utf-8", "surrogateescape")) + 1
        if stripped := line.strip():
            pos = len(records)
            if m := sources.UNDECODABLE.search(line):
                off = byte_pos + len(line[:m.start()].encode("utf-8", "surrogateescape"))
                bad.setdefault(pos, []).append((sources._json_key_before(line[:m.start()]), "undecodable_bytes",
                                                f"bytes that are not UTF-8 at byte offset {off}"))
            try:
                rec = json.loads(stripped, parse_int=str, parse_float=str, parse_constant=sources._json_constant)
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
    return frame.astype(object).where(frame.notna(), None), rows, bad


def _rec(**kw) -> bytes:
    return json.dumps(kw, ensure_ascii=False).encode()


NORMAL = b"\n".join(_rec(id=f"n{i}", text=f"ticket {i} about {'card' if i % 3 else 'refund'}", label=f"l{i % 2}")
                    for i in range(40)) + b"\n"
FILES = {
    "normal.jsonl": NORMAL,
    # a key first seen in a late record; keys in another order; a key missing here and there
    "late_key.jsonl": b"\n".join([_rec(text="a b", id="k1", label="x"), _rec(label="y", id="k2", text="c d"),
                                  _rec(id="k3", text="e f"), _rec(id="k4", label="x"),
                                  _rec(id="k5", text="g h", label="y", note="only here", extra=["a", 1]),
                                  _rec(id="k6", text="i j", label="x")]),
    # invalid JSON in the middle, lines that are not objects, an empty object
    "malformed.jsonl": b"\n".join([_rec(id="m1", text="one", label="x"), b'{"id": "m2", text: "two"}',
                                   _rec(id="m3", text="three", label="y"), b"[1, 2]", b'"just a string"', b"3",
                                   b"{}", b"null", "\ufeff".encode() + _rec(id="m5", text="bom", label="y"),
                                   _rec(id="m4", text="four", label="x")]) + b"\n",
    # bytes that are not UTF-8 (in a text, in a key, in an invalid line), a BOM, blank lines, CRLF
    "bad_bytes.jsonl": b"\xef\xbb\xbf\n  \n" + b"\r\n".join([
        _rec(id="b1", text="caf\u00e9 fine", label="x"), b'{"id": "b2", "text": "bad \xff here", "label": "y"}',
        b'{"id": "b3", "te\xc3xt": "key", "text": "ok", "label": "y"}', b'{"id": "b4", "text": "\xe2\x82', b"\t",
        b'{"id": "b5", "text": "fine \xf0\x9f\x98\x80", "label": "\xfe"}', b"\x1c", _rec(id="b6", text="ok", label="y"),
        b""]) + b"\n\n",
    # numbers and constants as written; U+2028 / U+2029 inside strings and as a blank line; no final line end
    "numbers.jsonl": b"\n".join([_rec(id="u1", text="one", label=1), b'{"id": "u2", "text": "one point", "label": 1.0}',
                                 b'{"id": "u3", "text": "oh one", "label": 01}',
                                 b'{"id": "u4", "text": "nan", "label": NaN}',
                                 b'{"id": "u5", "text": "inf", "label": Infinity}', b'{"id": "u6", "text": "neg", '
                                 b'"label": -Infinity, "w": 1e5, "b": true, "n": null}',
                                 _rec(id="u7", text="line\u2028separator\u2029para", label="x"), "\u2028".encode(),
                                 _rec(id="u8", text="long " + "w\u00e9rd " * 60, label=12345678901234567890)]),
}


def _write(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(FILES[name])
    return path


def _describe(tables):
    return [(t.frame.to_dict("records"), list(t.frame.columns), t.rows, t.bad, t.lines) for t in tables]


@pytest.mark.parametrize("name", sorted(FILES))
def test_the_whole_read_is_what_it_was_before_streaming(tmp_path, name):
    path = _write(tmp_path, name)
    frame, rows, bad = _whole_read(path)
    t = read_jsonl(path)
    assert t.parts is None and t.lines is None and t.split is None
    assert list(t.frame.columns) == list(frame.columns)
    assert t.frame.to_dict("records") == frame.to_dict("records")
    assert [[type(v) for v in r] for r in t.frame.itertuples(index=False)] == \
        [[type(v) for v in r] for r in frame.itertuples(index=False)]
    assert (t.rows, t.bad) == (rows, bad)


@pytest.mark.parametrize("block", [1, 5, 64])
@pytest.mark.parametrize("name", sorted(FILES))
def test_streamed_parts_in_any_piece_size_are_the_whole_read_sliced(tmp_path, monkeypatch, name, block):
    path = _write(tmp_path, name)
    whole = read_jsonl(path)
    monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", block)
    table = read_jsonl(path, stream=True)
    assert len(table.frame) == 0 and list(table.frame.columns) == list(whole.frame.columns)
    for size in (1, 2, 3, 10**6):
        parts = list(iter_parts(table, size))
        assert all(0 < len(t.rows) <= size for t in parts)
        assert _describe(parts) == _describe(iter_parts(whole, size))


def _result(path, chunk, stream, monkeypatch, on_bad_row="skip"):
    monkeypatch.setattr(ingest_stage_lib, "INGEST_CHUNK", chunk)
    # the small files keep every row in train (a stratified split of a few rows would be refused)
    split = {} if path.name == "normal.jsonl" else {"split": {"train": 1.0, "validation": 0.0, "test": 0.0}}
    p = IngestParams(source=str(path), id_column="id", on_bad_row=on_bad_row, **split)
    try:
        res = ingest_stage_lib.ingest(read_source(str(path), stream=stream), p, 7)
    except DataError as exc:
        return str(exc)
    return (dataset_hashes(res.tables, res.labels), res.rejected.to_dict("records"), ingest_stage_lib.metrics_of(res),
            {s: res.splits[s].to_dict("records") for s in res.tables})


@pytest.mark.parametrize("block", [1, 5, 64])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_streamed_jsonl_in_any_part_size_equals_one_whole_read(tmp_path, monkeypatch, block, chunk):
    for name in sorted(FILES):
        path = _write(tmp_path, name)
        whole = _result(path, 10**6, False, monkeypatch)
        assert isinstance(whole, tuple), whole  # ingested, not refused
        assert whole[2]["rows_read"] == len(read_jsonl(path).rows)
        first_bad = _result(path, 10**6, False, monkeypatch, "error")
        monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", block)
        assert _result(path, chunk, True, monkeypatch) == whole, name
        assert _result(path, chunk, True, monkeypatch, "error") == first_bad, name
        monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", 16 << 20)


def test_the_files_hold_what_the_tests_claim(tmp_path):
    t = read_jsonl(_write(tmp_path, "late_key.jsonl"))
    assert list(t.frame.columns) == ["text", "id", "label", "note", "extra"]
    assert t.frame["note"].tolist() == [None] * 4 + ["only here", None]
    t = read_jsonl(_write(tmp_path, "bad_bytes.jsonl"))
    assert t.rows == [3, 4, 5, 6, 8, 10]
    raw = FILES["bad_bytes.jsonl"]
    at, in_key = raw.index(b"\xff"), raw.index(b"te\xc3xt") + 2  # counted from the file start, BOM included
    assert t.bad[1] == [("text", "undecodable_bytes", f"bytes that are not UTF-8 at byte offset {at}")]
    assert t.bad[2] == [("id", "undecodable_bytes", f"bytes that are not UTF-8 at byte offset {in_key}")]
    assert t.bad[3][0][0] == "text" and t.bad[3][1][1] == "malformed_row"
    t = read_jsonl(_write(tmp_path, "numbers.jsonl"))
    assert t.frame["label"].tolist()[:6] == ["1", "1.0", None, None, "Infinity", "-Infinity"]
    assert t.bad[2][0][1] == "malformed_row" and t.rows[-1] == 9
    t = read_jsonl(_write(tmp_path, "malformed.jsonl"))
    assert t.bad[8] == [(None, "malformed_row", "invalid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig): "
                                                "line 1 column 1 (char 0)")]


@pytest.mark.parametrize("body", [b"", b"\n \n\t\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n\n"])
def test_a_file_with_no_records_is_refused_before_any_part(tmp_path, monkeypatch, body):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(body)
    monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", 1)
    for stream in (True, False):
        with pytest.raises(DataError, match=r"empty\.jsonl: file has no records$"):
            read_jsonl(path, stream=stream)


def test_a_key_added_after_the_columns_were_read_stops_the_read(tmp_path):
    path = _write(tmp_path, "normal.jsonl")
    table = read_jsonl(path, stream=True)
    path.write_bytes(NORMAL + _rec(id="x", text="new", label="l0", late="cell") + b"\n")
    with pytest.raises(DataError, match=r"normal\.jsonl: row 41: field 'late': key not in the file when its columns "
                                        r"were read: the file changed while ingest read it$"):
        list(iter_parts(table, 1000))


def test_a_utf16_file_is_refused_streamed_or_whole(tmp_path):
    path = tmp_path / "u16.jsonl"
    path.write_bytes('{"text": "a", "label": "b"}\n'.encode("utf-16"))
    for stream in (True, False):
        with pytest.raises(DataError, match="file is UTF-16"):
            read_jsonl(path, stream=stream)


def test_the_stage_streams_jsonl_and_writes_what_a_whole_read_gives(tmp_path, monkeypatch):
    path = _write(tmp_path, "malformed.jsonl")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"ingest": {"id_column": "id", "on_bad_row": "skip",
                                             "split": {"train": 1.0, "validation": 0.0, "test": 0.0}}}))
    seen = []
    real = sources.read_jsonl
    monkeypatch.setattr(sources, "read_jsonl", lambda p, stream=False: seen.append(stream) or real(p, stream))
    monkeypatch.setattr(ingest_stage_lib, "INGEST_CHUNK", 2)
    assert ingest_stage.main(["--source", str(path), "--out", str(tmp_path / "out"), "--metrics",
                              str(tmp_path / "m.json"), "--params", str(params)]) == 0
    assert seen == [True]
    monkeypatch.setattr(sources, "read_jsonl", real)
    whole = _result(path, 10**6, False, monkeypatch)
    assert json.loads((tmp_path / "out" / "hashes.json").read_text()) == whole[0]
    metrics = json.loads((tmp_path / "m.json").read_text())
    metrics.pop("stage_seconds")
    assert metrics.pop("length_tokens")["all"]["max_length"] == 128  # the task hook's token lengths (not streamed)
    assert metrics == json.loads(json.dumps(whole[2]))
    assert pd.read_csv(tmp_path / "out" / "rejected.csv")["row"].tolist() == [2, 4, 5, 6, 7, 8, 9]


# ---------------------------------------------------------------- any bytes

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VALUES = st.one_of(st.text(max_size=4), st.integers(), st.floats(), st.none(), st.booleans(),
                   st.lists(st.integers(), max_size=2))
RECORD = st.dictionaries(st.sampled_from(["a", "b", "text", "label", "é", ""]), VALUES, max_size=4).map(
    lambda d: json.dumps(d, ensure_ascii=False))
JUNK = st.lists(st.one_of(st.sampled_from(['{', '}', '[', ']', ':', ',', '"a"', '"b"', '"', '\\', '1', '01', '1.0',
                                           'NaN', 'null', 'true', ' ', '\t', '\r', 'é', '😀', '\u2028', '\ufeff', '\x1c',
                                           '\x00', '{"a": "x"}']),
                          st.binary(min_size=1, max_size=2).map(lambda b: b.decode("utf-8", "surrogateescape"))),
                max_size=8).map("".join)
# lines: records (numbers, NaN, nested values, keys in any order) and junk (bytes that are not UTF-8 too)
JSONISH = st.lists(st.tuples(st.one_of(RECORD, JUNK, st.tuples(RECORD, JUNK).map("".join)),
                             st.sampled_from(["\n", "\r\n", "", " \n", "\n\n"])), max_size=10).map(
    lambda lines: "".join(a + b for a, b in lines))


def _described(read):
    try:
        frame, rows, bad = read()
        return frame.to_dict("records"), list(frame.columns), len(frame), rows, bad
    except DataError as exc:
        return str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=JSONISH, bom=st.booleans(), block=st.integers(1, 12), size=st.integers(1, 3))
def test_any_bytes_read_the_same_whole_and_piece_by_piece(tmp_path, monkeypatch, body, bom, block, size):
    path = tmp_path / "g.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8", "surrogateescape"))
    want = _described(lambda: _whole_read(path))

    def whole():
        t = read_jsonl(path)
        return t.frame, t.rows, t.bad
    assert _described(whole) == want

    def streamed():
        table = read_jsonl(path, stream=True)
        parts = list(iter_parts(table, size))
        assert all(0 < len(t.rows) <= size and list(t.frame.columns) == list(table.frame.columns) for t in parts)
        bad = {i + k * size: v for k, t in enumerate(parts) for i, v in t.bad.items()}
        frame = pd.concat([t.frame for t in parts], ignore_index=True) if parts else table.frame
        return frame, [r for t in parts for r in t.rows], bad
    monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", block)
    try:
        assert _described(streamed) == want
    finally:
        monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", 16 << 20)
