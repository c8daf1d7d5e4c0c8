"""Ingest in bounded parts: a streamed Parquet source (row-group batches) and every other source sliced
into INGEST_CHUNK-row parts give exactly what one whole read gives (rows, rejections, errors)."""
from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domaintune.core.errors import DataError
from domaintune.core.params import IngestParams
from domaintune.data import ingest as ingest_stage_lib
from domaintune.data.dataset import dataset_hashes
from domaintune.data.sources import iter_parts, read_source
from stages import ingest as ingest_stage


def _source(tmp_path):
    """30 rows in row groups of 4: integer labels with a gap only in a later group (floats there),
    a missing label, an empty text, bytes that are not UTF-8, a list cell, a duplicate text."""
    n = 30
    text = [f"ticket {i} about {'card' if i % 3 else 'refund'}".encode() for i in range(n)]
    text[9] = b"bad \xff bytes"
    text[14] = b"   "
    text[21] = text[2]
    label = pa.array([i % 3 for i in range(n)], type=pa.int64()).to_pylist()
    label[17] = None
    split = ["train" if i % 5 else ("validation" if i % 10 else "test") for i in range(n)]
    table = pa.table({"id": [f"r{i}" for i in range(n)], "text": pa.array(text, type=pa.binary()),
                      "label": pa.array(label, type=pa.int64()), "split": split})
    path = tmp_path / "src.parquet"
    pq.write_table(table, path, row_group_size=4)
    return path


def _result(path, chunk, stream, monkeypatch, **kw):
    monkeypatch.setattr(ingest_stage_lib, "INGEST_CHUNK", chunk)
    p = IngestParams(source=str(path), id_column="id", split_column="split", on_bad_row="skip", **kw)
    res = ingest_stage_lib.ingest(read_source(str(path), stream=stream), p, 7)
    return (dataset_hashes(res.tables, res.labels), res.rejected.to_dict("records"), ingest_stage_lib.metrics_of(res),
            {s: res.splits[s].to_dict("records") for s in res.tables})


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 1000])
def test_streamed_parquet_in_any_part_size_equals_one_whole_read(tmp_path, monkeypatch, chunk):
    path = _source(tmp_path)
    whole = _result(path, 10**6, False, monkeypatch)
    assert whole[2]["rejected"] == 3 and whole[2]["rows_read"] == 30
    assert _result(path, chunk, True, monkeypatch) == whole
    assert _result(path, chunk, False, monkeypatch) == whole


def test_parts_hold_at_most_the_part_size_and_number_rows_through_the_file(tmp_path):
    path = _source(tmp_path)
    (table,) = read_source(str(path), stream=True)
    assert len(table.frame) == 0 and list(table.frame.columns) == ["id", "text", "label", "split"]
    parts = list(iter_parts(table, 4))
    assert [len(t.frame) for t in parts] == [4] * 7 + [2]
    assert [r for t in parts for r in t.rows] == list(range(1, 31))
    assert parts[2].bad == {1: [("text", "undecodable_bytes", "bytes that are not UTF-8 at byte offset 4 of the cell")]}


@pytest.mark.parametrize("chunk", [2, 1000])
def test_error_mode_names_the_same_first_bad_row_in_parts(tmp_path, monkeypatch, chunk):
    path = _source(tmp_path)
    monkeypatch.setattr(ingest_stage_lib, "INGEST_CHUNK", chunk)
    p = IngestParams(source=str(path), id_column="id", split_column="split", on_bad_row="error")
    with pytest.raises(DataError) as exc:
        ingest_stage_lib.ingest(read_source(str(path), stream=True), p, 7)
    assert str(exc.value) == f"{path}: row 10: field 'text': bytes that are not UTF-8 at byte offset 4 of the cell"


def test_a_missing_column_in_a_later_file_stops_before_any_row_is_judged(tmp_path, monkeypatch):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a_train.csv").write_text("text,label\n,x\nhello,y\n")  # row 1 is bad (empty text)
    (folder / "b_test.csv").write_text("text,lab\nhi,x\n")
    monkeypatch.setattr(ingest_stage_lib, "INGEST_CHUNK", 1)
    p = dataclasses.replace(IngestParams(source=str(folder)), on_bad_row="error")
    with pytest.raises(DataError, match=r"b_test\.csv: field 'label': column missing"):
        ingest_stage_lib.ingest(read_source(str(folder), stream=True), p, 7)


def test_the_stage_streams_parquet_and_writes_what_a_whole_read_gives(tmp_path, monkeypatch):
    path = _source(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"ingest": {"id_column": "id", "split_column": "split", "on_bad_row": "skip"}}))
    monkeypatch.setattr(ingest_stage_lib, "INGEST_CHUNK", 3)
    assert ingest_stage.main(["--source", str(path), "--out", str(tmp_path / "out"), "--metrics",
                              str(tmp_path / "m.json"), "--params", str(params)]) == 0
    whole = _result(path, 10**6, False, monkeypatch)
    assert json.loads((tmp_path / "out" / "hashes.json").read_text()) == whole[0]
    metrics = json.loads((tmp_path / "m.json").read_text())
    metrics.pop("stage_seconds")
    assert metrics.pop("length_tokens")["all"]["max_length"] == 128  # the task hook's token lengths (not streamed)
    assert metrics == json.loads(json.dumps(whole[2]))
    rejected = pd.read_csv(tmp_path / "out" / "rejected.csv")
    assert rejected["row"].tolist() == [10, 15, 18]


def test_a_corrupt_row_group_is_a_data_error_naming_the_file(tmp_path, monkeypatch):
    path = _source(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 40] = b"\x00" * 40  # damage a page in the middle, footer intact
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(ingest_stage_lib, "INGEST_CHUNK", 4)
    p = IngestParams(source=str(path), id_column="id", split_column="split", on_bad_row="skip")
    with pytest.raises(DataError, match=rf"^{path}: cannot read Parquet"):
        ingest_stage_lib.ingest(read_source(str(path), stream=True), p, 7)


# ---------------------------------------------------------------- CSV/TSV read piece by piece

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from domaintune.data import sources  # noqa: E402
from domaintune.data.sources import read_delimited  # noqa: E402


def _whole_and_streamed(path, delim, block, monkeypatch):
    """(whole read, streamed read in `block`-byte pieces and 2-record parts): each a description or the error."""
    def describe(tables):
        return [(t.frame.to_dict("records"), t.rows, t.bad, t.lines) for t in tables]
    try:
        whole = read_delimited(path, delim)
        want = (describe([whole]), whole.multiline, whole.multiline_lines)
    except DataError as exc:
        want = str(exc)
    monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", block)
    try:
        table = read_delimited(path, delim, stream=True)
        parts = list(iter_parts(table, 10**9))
        got = (describe(parts), table.multiline, table.multiline_lines)
        small = list(iter_parts(read_delimited(path, delim, stream=True), 2))
        assert [r for t in small for r in t.rows] == [r for t in parts for r in t.rows]
        assert all(len(t.rows) <= 2 for t in small)
    except DataError as exc:
        got = str(exc)
    finally:
        monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", 16 << 20)
    return want, got


@pytest.mark.parametrize("block", [1, 5, 64])
def test_every_hostile_csv_and_tsv_reads_the_same_piece_by_piece(monkeypatch, block):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "hostile"
    files = sorted(folder.glob("*.csv")) + sorted(folder.glob("*.tsv"))
    assert len(files) >= 15
    for path in files:
        want, got = _whole_and_streamed(path, "," if path.suffix == ".csv" else "\t", block, monkeypatch)
        assert got == want, path.name


PIECES = st.lists(st.one_of(st.sampled_from(['"', '""', ",", "\t", "\n", "\r\n", "\r", " ", "é", "😀", "ß", "x", "\u2028",
                                             "\ufeff", "\x00"]),
                            st.binary(min_size=1, max_size=2).map(lambda b: b.decode("utf-8", "surrogateescape"))),
                  max_size=40).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=PIECES, bom=st.booleans(), block=st.integers(1, 12), delim=st.sampled_from([",", "\t"]))
def test_any_bytes_read_the_same_piece_by_piece(tmp_path, monkeypatch, body, bom, block, delim):
    path = tmp_path / "g.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("text,label\n" + body).encode("utf-8", "surrogateescape"))
    want, got = _whole_and_streamed(path, delim, block, monkeypatch)
    assert got == want
