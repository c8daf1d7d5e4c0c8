"""The dataset version hash: its definition is a contract (old versions must keep their hashes)."""
from __future__ import annotations

import hashlib
import json

import pandas as pd

from domaintune.data import split_hash

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


def test_atomic_output_swaps_folders_and_files_whole(tmp_path):
    import pytest

    from domaintune.data import atomic_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            tmp.mkdir()
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the previous output is untouched
    with atomic_output(out) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    metrics = tmp_path / "m.json"
    metrics.write_text("{}")
    with atomic_output(metrics) as tmp:
        tmp.write_text('{"a": 1}')
    assert metrics.read_text() == '{"a": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "out"]  # no temporaries left behind
