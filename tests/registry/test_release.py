"""release.materialise on a real git + DVC + GTO project: a version's export outside the workspace, verified."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _fake_pipeline import BIN, add_rows, make_fake_repo, sh, workspace

from domaintune.registry import cache, plumbing, release, versions


def _export_files(snapshot: dict[str, bytes]) -> dict[str, bytes]:
    return {k.removeprefix("models/export/"): v for k, v in snapshot.items() if k.startswith("models/export/")}


def _folder(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """v1.0.0 -> v2.0.0 (served), with each version's models/export files."""
    root = make_fake_repo(tmp_path_factory.mktemp("rel") / "proj")
    snaps = {}
    sh(root, str(BIN / "dvc"), "repro", "-q")
    v1, _ = versions.publish(root, "first")
    snaps[v1.version] = _export_files(workspace(root))
    add_rows(root, 5)
    sh(root, str(BIN / "dvc"), "repro", "-q")
    v2, _ = versions.publish(root, "more data")
    snaps[v2.version] = _export_files(workspace(root))
    assert snaps["v1.0.0"] != snaps["v2.0.0"]
    return root, snaps


def _cache_obj(root: Path, version: str, relpath: str) -> Path:
    v = versions.get_version(root, version)
    folder = cache.cache_dir(root)
    out = next(o for o in plumbing.lock_outs(root, v.commit) if o.path == "models/export")
    entries = json.loads(cache.cache_path(folder, out.md5).read_text())
    return cache.cache_path(folder, next(e["md5"] for e in entries if e["relpath"] == relpath))


def test_served_and_named_versions_outside_the_workspace(history):
    root, snaps = history
    before, head = workspace(root), sh(root, "git", "rev-parse", "HEAD")
    served = release.materialise(root)
    assert served.version.version == "v2.0.0" and served.tag == "domaintune@v2.0.0"
    assert served.path == root / ".domaintune/releases/domaintune@v2.0.0/models/export"
    assert _folder(served.path) == snaps["v2.0.0"] and served.files == len(snaps["v2.0.0"])
    old = release.materialise(root, "v1")
    assert _folder(old.path) == snaps["v1.0.0"]
    assert old.dataset_hash == versions.get_version(root, "v1.0.0").record["dataset_hash"]
    assert old.metrics["evaluate"]["after"]["ece"] == 0.1
    info = json.loads((old.path.parents[1] / "release.json").read_text())
    assert info["commit"] == old.version.commit and info["out"] == "models/export"
    # The workspace still holds v2 and git sees nothing new (.domaintune/ ignores itself).
    assert workspace(root) == before
    assert sh(root, "git", "rev-parse", "HEAD") == head
    assert sh(root, "git", "status", "--porcelain").strip() == ""
    # Second call: re-verified, same folder.
    assert release.materialise(root, "v1.0.0").path == old.path


def test_tampered_materialised_file_is_rebuilt(history):
    root, snaps = history
    rel = release.materialise(root, "v1.0.0")
    (rel.path / "weights.bin").write_bytes(b"tampered")
    (rel.path / "extra.txt").write_text("not part of the version")
    again = release.materialise(root, "v1.0.0")
    assert _folder(again.path) == snaps["v1.0.0"]


def test_missing_object_is_fetched_from_the_remote(history, tmp_path):
    root, snaps = history
    _cache_obj(root, "v1.0.0", "weights.bin").unlink()
    rel = release.materialise(root, "v1.0.0", dest=tmp_path / "elsewhere")
    assert rel.path == tmp_path / "elsewhere/domaintune@v1.0.0/models/export"
    assert _folder(rel.path) == snaps["v1.0.0"]
    assert _cache_obj(root, "v1.0.0", "weights.bin").exists()


def test_corrupted_object_raises_and_leaves_nothing(history, tmp_path):
    root, _ = history
    obj = _cache_obj(root, "v2.0.0", "sub/model.json")
    good = obj.read_bytes()
    obj.chmod(0o644)
    obj.write_bytes(b'{"epochs": 99}')
    dest = tmp_path / "rel"
    try:
        with pytest.raises(release.ReleaseError, match=r"cannot materialise domaintune@v2.0.0:\n.*"
                                                       r"models/export/sub/model.json: cache object .* does not match"):
            release.materialise(root, "v2.0.0", dest=dest)
    finally:
        obj.write_bytes(good)
    assert not (dest / "domaintune@v2.0.0").exists()


def test_no_served_version_and_unknown_version(tmp_path):
    root = make_fake_repo(tmp_path / "proj")
    with pytest.raises(release.ReleaseError, match="no version is served"):
        release.materialise(root)
    with pytest.raises(plumbing.RegistryError, match="no version 'v3.0.0'"):
        release.materialise(root, "v3")
    shutil.rmtree(root)
