"""The dataset version hash: its definition is a contract (old versions must keep their hashes)."""
from __future__ import annotations

import hashlib
import json

import pandas as pd

from domaintune.data.dataset import split_hash

TRICKY = ["plain", 'quote " and \\ backslash', "tab\tnew\nline", "émoji 😀 ünïcode", "\x00ctrl\x1f", "\u2028sep", ""]


def reference_hash(df: pd.DataFrame) -> str:
    """The documented definition: JSON lines of [id, text, label], ensure_ascii=False, sorted by id."""
    h = hashlib.sha256()
    for rec in df[["id", "text", "label"]].astype(str).sort_values("id", kind="stable").itertuples(index=False):
        h.update(json.dumps(list(rec), ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def test_split_hash_equals_its_definition_on_tricky_text():
    df = pd.DataFrame({"id": [f"r{i}" for i in range(len(TRICKY))], "text": TRICKY,
                       "label": ["a", "b", "ü", "d", 'e"', "f", "g"]})
    assert split_hash(df) == reference_hash(df)
    assert split_hash(df.iloc[::-1]) == split_hash(df)  # row order does not matter
    edited = df.copy()
    edited.loc[2, "label"] = "a"
    assert split_hash(edited) != split_hash(df)


def test_split_hash_is_pinned():
    # A change here changes every dataset version users have recorded.
    df = pd.DataFrame({"id": ["b", "a"], "text": ["Wo ist mein Paket?", "refund \"now\""], "label": ["x", "y"]})
    assert split_hash(df) == reference_hash(df)
    assert split_hash(df) == hashlib.sha256(
        '["a", "refund \\"now\\"", "y"]\n["b", "Wo ist mein Paket?", "x"]\n'.encode()).hexdigest()


def test_a_table_in_many_chunks_hashes_as_one_chunk_and_take_rows_equals_arrow_take(monkeypatch):
    """_table_hash takes the id-sorted rows batch by batch (take_rows); any chunking and hash chunk size
    gives the frame's hash, and take_rows gives what Arrow's take gives, in any order with repeats."""
    import numpy as np
    import pyarrow as pa

    from domaintune.data import dataset as data

    rng = np.random.default_rng(3)
    n = 500
    df = pd.DataFrame({"id": [f"r{rng.integers(10**6)}-{i}" for i in range(n)],
                       "text": [TRICKY[i % len(TRICKY)] + str(i) for i in range(n)], "label": ["a", "b"] * (n // 2)})
    whole = pa.Table.from_pandas(df, preserve_index=False)
    cuts = np.sort(rng.choice(np.arange(1, n), size=17, replace=False))
    chunked = pa.concat_tables([whole.slice(a, b - a) for a, b in zip(np.r_[0, cuts], np.r_[cuts, n])])
    assert chunked.column("text").num_chunks == 18
    for rows in (7, 64, 10**6):
        monkeypatch.setattr(data, "HASH_CHUNK_ROWS", rows)
        assert data.split_hash(chunked) == data.split_hash(whole) == reference_hash(df)
    batches = chunked.to_batches()
    bounds = np.cumsum([0] + [b.num_rows for b in batches])
    for positions in (rng.integers(0, n, size=300), np.arange(n)[::-1], np.array([4, 4, 499, 0])):
        assert data.take_rows(batches, bounds, positions).equals(whole.take(pa.array(positions)))


def test_atomic_output_swaps_folders_and_files_whole(tmp_path):
    import pytest

    from domaintune.core.io import OUTPUT_MARKER, atomic_output, mark_output_folder

    out = mark_output_folder(tmp_path / "out")  # a previous output of domaintune's (it holds the marker)
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            tmp.mkdir()
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "old.txt"]  # the previous output is untouched
    with atomic_output(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "new.txt"]
    metrics = tmp_path / "m.json"
    metrics.write_text("{}")
    with atomic_output(metrics) as tmp:
        tmp.write_text('{"a": 1}')
    assert metrics.read_text() == '{"a": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "out"]  # no temporaries left behind
