"""release.materialise on a real git + DVC + GTO project: a version's export outside the workspace, verified."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
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
    v1, _ = versions.publish(root, "first", stage="prod")
    snaps[v1.version] = _export_files(workspace(root))
    add_rows(root, 5)
    sh(root, str(BIN / "dvc"), "repro", "-q")
    v2, _ = versions.publish(root, "more data", stage="prod")
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


# ----------------------------------------------------------------------------- hostile registry contents

def _remote(root: Path) -> Path:
    return root.parent / f"{root.name}-dvc-remote"  # ensure_remote's default folder


def _publish_crafted(root: Path, version: str, entries: list[dict], blobs: dict[str, bytes]) -> str:
    """Publish `version` as someone with push rights to the registry could: a commit whose dvc.lock points
    models/export at a .dir manifest listing `entries`, the manifest and `blobs` (md5 -> bytes) in the local
    cache and the remote, a GTO tag. The workspace and HEAD are left as they were. Returns the .dir id."""
    from gto.api import register

    manifest = json.dumps(entries).encode()
    dir_md5 = hashlib.md5(manifest).hexdigest() + ".dir"
    for store in (cache.cache_dir(root), _remote(root) / "files" / "md5"):
        for md5, data in {**blobs, dir_md5: manifest}.items():
            p = store / md5[:2] / md5[2:]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    out = next(o for o in lock["stages"]["train"]["outs"] if o["path"] == "models/export")
    out["md5"], out["nfiles"] = dir_md5, len(entries)
    saved = (root / "dvc.lock").read_bytes()
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    sh(root, "git", "commit", "-qm", f"crafted {version}", "--", "dvc.lock")
    commit = sh(root, "git", "rev-parse", "HEAD").strip()
    register(str(root), plumbing.ARTIFACT, commit, version=version,
             message=f"crafted\n\n{versions.RECORD_MARK} " + json.dumps({"outs": {"models/export": dir_md5}}))
    sh(root, "git", "reset", "-q", "--hard", "HEAD~1")
    assert (root / "dvc.lock").read_bytes() == saved
    return dir_md5


def _predict_cli(capsys, *argv) -> tuple[int, list[str]]:
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["predict", *map(str, argv)])
    rc = args.fn(args)
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("bad", ["escape", "absolute", "object-id"])
def test_a_version_whose_manifest_leaves_its_folder_is_refused_everywhere(history, tmp_path, capsys, bad):
    """A published version whose .dir manifest names a file outside models/export (or an object id that is a
    path) writes nothing anywhere: predict --version, materialise (what serve runs) and rollback refuse it
    with one line. Before: materialise wrote ../../../../tmp/... outside the repository and said "verified"."""
    from domaintune.registry import rollback

    root, _ = history
    evil = b"written outside the repository\n"
    outside = tmp_path / "outside" / "pwned.txt"
    rel = {"escape": "../" * 40 + str(outside).lstrip("/"), "absolute": str(outside),
           "object-id": "weights.bin"}[bad]
    md5 = {"object-id": "../" * 8 + "x"}.get(bad, hashlib.md5(evil).hexdigest())
    version = {"escape": "v9.0.0", "absolute": "v9.1.0", "object-id": "v9.2.0"}[bad]
    _publish_crafted(root, version, [{"md5": md5, "relpath": rel}, {"md5": hashlib.md5(b"ok").hexdigest(),
                                                                    "relpath": "ok.txt"}],
                     {hashlib.md5(evil).hexdigest(): evil, hashlib.md5(b"ok").hexdigest(): b"ok"})
    before, head, served = workspace(root), sh(root, "git", "rev-parse", "HEAD"), versions.served_version(root)
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    rc, err = _predict_cli(capsys, src, "--version", version, "--repo", root, "--out", tmp_path / "o.jsonl")
    assert rc == 2 and len(err) == 1, err
    assert f"cannot materialise domaintune@{version}" in err[0] and "refusing this version" in err[0]
    with pytest.raises(release.ReleaseError, match="refusing this version") as exc:
        release.materialise(root, version, dest=tmp_path / "rel")
    assert "\n" not in str(exc.value)
    with pytest.raises(plumbing.RegistryError, match="refusing this version"):
        rollback.rollback(root, version)
    assert not outside.exists() and not (tmp_path / "o.jsonl").exists()
    assert not (tmp_path / "rel" / f"domaintune@{version}").exists()
    assert not (root / ".domaintune/releases" / f"domaintune@{version}").exists()
    assert workspace(root) == before and sh(root, "git", "rev-parse", "HEAD") == head
    assert versions.served_version(root) == served


def test_a_symlink_planted_in_a_materialised_release_is_removed_not_followed(history, tmp_path):
    root, snaps = history
    rel = release.materialise(root, "v1.0.0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the registry's")
    shutil.rmtree(rel.path / "sub")
    (rel.path / "sub").symlink_to(elsewhere, target_is_directory=True)
    again = release.materialise(root, "v1.0.0")
    assert _folder(again.path) == snaps["v1.0.0"] and not (again.path / "sub").is_symlink()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]


def test_a_corrupt_object_from_the_remote_never_enters_the_cache(history, tmp_path, capsys):
    """predict --version fetching a corrupt object: exit 2, one problem naming the file, the object and the
    remote it came from; the bad copy is not in the local cache, so once the remote is repaired the same
    command works with nothing removed by hand."""
    root, snaps = history
    obj = _cache_obj(root, "v1.0.0", "sub/model.json")
    md5 = obj.parent.name + obj.name
    in_remote = cache.cache_path(_remote(root) / "files" / "md5", md5)
    saved_remote = in_remote.read_bytes()
    obj.unlink()
    in_remote.chmod(0o644)
    bad = b'{"epochs": 666}'
    in_remote.write_bytes(bad)
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    try:
        rc, err = _predict_cli(capsys, src, "--version", "v1.0.0", "--repo", root)
        assert rc == 2
        assert err[0] == "domaintune predict: error: cannot materialise domaintune@v1.0.0:"
        assert err[1:] == [f"  models/export/sub/model.json: the copy of {md5} on remote 'local' ({_remote(root)}) "
                           f"is corrupted (its md5 is {hashlib.md5(bad).hexdigest()}); "
                           "not kept in the local cache"]
        assert not obj.exists()
        assert not [p for p in obj.parent.iterdir() if p.name.startswith(obj.name)]  # no temporary left either
    finally:
        in_remote.write_bytes(saved_remote)
    rel = release.materialise(root, "v1.0.0", dest=tmp_path / "rel")
    assert _folder(rel.path) == snaps["v1.0.0"] and obj.exists()


def test_a_corrupt_dir_manifest_on_the_remote_is_refused_in_one_line(history, tmp_path):
    """Before: DVC read the remote's bad manifest and raised its own ValueError ("Bad cache file path")."""
    root, _ = history
    v1 = versions.get_version(root, "v1.0.0")
    out = next(o for o in plumbing.lock_outs(root, v1.commit) if o.path == "models/export")
    local = cache.cache_path(cache.cache_dir(root), out.md5)
    in_remote = cache.cache_path(_remote(root) / "files" / "md5", out.md5)
    saved_local, saved_remote = local.read_bytes(), in_remote.read_bytes()
    local.unlink()
    in_remote.chmod(0o644)
    in_remote.write_bytes(b'[{"md5": "00", "relpath": "x"}]')
    try:
        with pytest.raises(release.ReleaseError) as exc:
            release.materialise(root, "v1.0.0", dest=tmp_path / "rel")
        problems = str(exc.value).splitlines()[1:]
        assert len(problems) == 1 and f"models/export: the copy of {out.md5} on remote 'local'" in problems[0]
        assert not local.exists()
    finally:
        in_remote.write_bytes(saved_remote)
        if not local.exists():
            local.write_bytes(saved_local)


def test_an_unreachable_remote_is_named_as_such(history, tmp_path):
    """Before: "weights.bin: ... not in cache" as if the remote had lost the object."""
    root, _ = history
    obj = _cache_obj(root, "v1.0.0", "weights.bin")
    saved = obj.read_bytes()
    obj.unlink()
    moved = tmp_path / "moved-remote"
    shutil.move(str(_remote(root)), str(moved))
    try:
        with pytest.raises(release.ReleaseError) as exc:
            release.materialise(root, "v1.0.0", dest=tmp_path / "rel")
        lines = str(exc.value).splitlines()
        assert len(lines) == 2, lines
        assert lines[1].strip().startswith(f"remote 'local' ({_remote(root)}) unreachable: {_remote(root)} does not exist")
        assert "models/export/weights.bin" in lines[1]
    finally:
        shutil.move(str(moved), str(_remote(root)))
        obj.write_bytes(saved)


def test_version_record_names_the_warm_start_regulariser_and_extra_rows(tmp_path):
    """build_record lifts finetune's warm start, regulariser and extra-rows hash to the record's top level."""
    from domaintune.registry.plumbing import Out
    from domaintune.registry.versions import build_record

    (tmp_path / "params.yaml").write_text("finetune: {method: full, init: v1.0.0}\n")
    (tmp_path / "metrics").mkdir()
    ft = {"warm_start": {"version": "v1.0.0", "labels_new": ["delivery"]}, "regularize": {"kind": "l2sp"},
          "extra_rows": {"rows": 3, "sha256": "ab" * 32}}
    (tmp_path / "metrics" / "finetune.json").write_text(json.dumps(ft))
    rec = build_record(tmp_path, [Out("finetune", "metrics/finetune.json", "0" * 32, True),
                                  Out("finetune", "data/extra_train.parquet", "1" * 32, False)])
    assert rec["warm_start"]["version"] == "v1.0.0" and rec["regularize"] == {"kind": "l2sp"}
    assert rec["extra_rows"]["sha256"] == "ab" * 32 and rec["outs"]["data/extra_train.parquet"] == "1" * 32
