"""core/io.py: an output never replaces a folder domaintune did not write; the folders it writes carry the marker
that lets it replace them again."""
from __future__ import annotations

import pytest

from domaintune.core.errors import DataError
from domaintune.core.io import (
    MARKER_TEXT,
    OUTPUT_MARKER,
    atomic_output,
    check_replaceable,
    claimed_outputs,
    is_owned,
    mark_output_folder,
)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_output_carries_the_marker_and_is_replaced_on_the_next_write(tmp_path):
    out = tmp_path / "out"
    for text in ("first", "second"):
        with atomic_output(out) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text(text)
        assert snapshot(out) == {OUTPUT_MARKER: MARKER_TEXT.encode(), "a.txt": text.encode()}
    with atomic_output(tmp_path / "f.json") as tmp:  # a file output gets no marker (nothing to put it in)
        tmp.write_text("{}")
    assert (tmp_path / "f.json").read_text() == "{}"


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_folder_domaintune_did_not_write_is_never_replaced(tmp_path, kind):
    """`predict two.txt --out spark_out.csv` where spark_out.csv is a folder of part files: refused, kept."""
    out = tmp_path / "spark_out.csv"
    out.mkdir()
    (out / "part-00000.csv").write_text("id,text\n1,a\n")
    (out / "_SUCCESS").write_text("")
    before = snapshot(out)
    ran = []
    with pytest.raises(DataError, match=f"an existing folder that domaintune did not write .it has no {OUTPUT_MARKER}"):
        with atomic_output(out) as tmp:
            ran.append(1)  # refused before the block runs: no work is done for nothing
            tmp.mkdir() if kind == "folder" else tmp.write_text("x")
    assert ran == [] and snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spark_out.csv"]  # no temporaries left


def test_a_folder_that_loses_its_marker_while_the_block_runs_is_kept(tmp_path):
    out = mark_output_folder(tmp_path / "out")
    (out / "mine.txt").write_text("mine")
    with pytest.raises(DataError, match="did not write"):
        with atomic_output(out) as tmp:
            tmp.write_text("x")
            (out / OUTPUT_MARKER).unlink()  # someone else's folder now (e.g. replaced by hand meanwhile)
    assert snapshot(out) == {"mine.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_claimed_output_is_replaced_without_a_marker_and_only_while_claimed(tmp_path):
    """A stage's DVC-declared out written by an older version (no marker) stays replaceable: run_stage claims it."""
    old = tmp_path / "models" / "export"
    old.mkdir(parents=True)
    (old / "model.onnx").write_text("old")
    inner = tmp_path / "ckpt" / "key-1"  # inside a claimed folder too (a persisted checkpoints out)
    inner.mkdir(parents=True)
    assert not is_owned(old) and not is_owned(inner)
    with claimed_outputs([old, tmp_path / "ckpt"]):
        assert is_owned(old) and is_owned(inner)
        with atomic_output(old) as tmp:
            tmp.mkdir()
            (tmp / "model.onnx").write_text("new")
    assert snapshot(old) == {OUTPUT_MARKER: MARKER_TEXT.encode(), "model.onnx": b"new"}
    assert not is_owned(inner)
    with pytest.raises(DataError, match="--checkpoints: an existing folder"):
        check_replaceable(inner, "--checkpoints")


def test_files_and_links_are_replaced_and_a_link_is_never_followed(tmp_path):
    target = tmp_path / "theirs"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    check_replaceable(link)  # a link is replaced, not followed
    with atomic_output(link) as tmp:
        tmp.mkdir()
    assert link.is_dir() and not link.is_symlink() and snapshot(target) == {"keep.txt": b"keep"}
    with pytest.raises(DataError):
        mark_output_folder(target)  # an existing folder is adopted only if it is domaintune's already
    assert not (target / OUTPUT_MARKER).exists()
