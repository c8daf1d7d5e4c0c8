"""Registry on a real git + DVC + GTO project (tiny fake stages): publish, list, diff, verify, roll back."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from _fake_pipeline import BIN, add_rows, held_lock, make_fake_repo, set_params, sh, workspace

from domaintune.registry import cache, diff, plumbing, rollback, versions


def repro(root: Path) -> None:
    sh(root, str(BIN / "dvc"), "repro", "-q")


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """v1.0.0 (10 rows) -> v2.0.0 (15 rows) -> v2.1.0 (same data, epochs 5), with each version's files."""
    root = make_fake_repo(tmp_path_factory.mktemp("reg") / "proj")
    snaps = {}
    repro(root)
    v1, created = versions.publish(root, "first", stage="prod")
    assert created
    snaps[v1.version] = workspace(root)
    add_rows(root, 5)
    repro(root)
    v2, _ = versions.publish(root, "more data", stage="prod")
    snaps[v2.version] = workspace(root)
    set_params(root, {"finetune.epochs": 5})
    repro(root)
    v21, _ = versions.publish(root, "epochs 5", stage="prod")
    snaps[v21.version] = workspace(root)
    return root, snaps


def test_versions_semver_and_records(history):
    root, snaps = history
    found = versions.list_versions(root)
    assert [v.version for v in found] == ["v1.0.0", "v2.0.0", "v2.1.0"]
    v1, v2, v21 = found
    # New data -> new major; same data, new params -> new minor.
    assert v1.record["dataset_hash"] != v2.record["dataset_hash"] == v21.record["dataset_hash"]
    for v in found:
        files = snaps[v.version]
        assert v.record["dataset_hash"] == json.loads(files["data/audited/hashes.json"])["dataset"]
        assert v.record["metrics"]["evaluate"] == json.loads(files["metrics/evaluate.json"])
        assert v.record["base_model"] == "minilm" and v.record["method"] == "lora"
        # The tagged commit holds exactly that version's params, dvc.lock and metrics.
        for f in ("params.yaml", "dvc.lock", "metrics/evaluate.json", "metrics/audit.json"):
            assert plumbing.git_bytes(root, v.commit, f) == files[f]
    assert [v.served for v in found] == [False, False, True]  # publishing serves the new version
    assert v21.key_metrics() == {f"evaluate.{k}": v21.record["metrics"]["evaluate"]["after"][k]
                                 for k in ("accuracy", "macro_f1", "ece")}
    assert sh(root, "git", "status", "--porcelain").strip() == ""


def test_versions_command_shows_headline_metrics(history, capsys):
    """`domaintune versions` on versions whose metrics/evaluate.json has the evaluate stage's shape."""
    from pipelines.cli import main

    root, _ = history
    assert main(["versions", "--repo", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for v in versions.list_versions(root):
        after = v.record["metrics"]["evaluate"]["after"]
        row = next(line for line in lines if f" {v.version} " in f" {line} ")
        for k in ("accuracy", "macro_f1", "ece"):
            assert f"{k}={after[k]:.3f}" in row, row
        assert not row.rstrip().endswith(" -"), row


def test_republish_unchanged_creates_nothing(history):
    root, _ = history
    tags = sh(root, "git", "tag")
    repro(root)
    v, created = versions.publish(root, "again", stage="prod")
    assert not created and v.version == "v2.1.0"
    assert sh(root, "git", "tag") == tags


def test_diff(history):
    root, _ = history
    d = diff.diff_versions(root, "v2.0.0", "v2.1.0")
    assert d["params"] == {"finetune.epochs": (3, 5)}
    assert "dataset_hash" not in d
    assert set(d["metrics"]) <= {f"evaluate.{p}.{k}" for p in ("before", "after") for k in ("accuracy", "macro_f1", "weighted_f1")}
    d = diff.diff_versions(root, "v1.0.0", "v2.0.0")
    assert d["params"] == {}
    assert d["metrics"]["audit.rows"] == (11, 16)  # lines incl. header
    assert d["dataset_hash"][0] != d["dataset_hash"][1]
    with pytest.raises(plumbing.RegistryError, match="no version 'v9.0.0'"):
        diff.diff_versions(root, "v1.0.0", "v9")


def test_diff_lists_the_changed_outputs_with_md5_and_size(history, capsys):
    """After the headline metrics: every output whose content changed, with its old and new md5 and size as
    each version's dvc.lock records them; unchanged outputs are not listed."""
    import yaml

    from pipelines.cli import main

    root, _ = history
    found = {v.version: v for v in versions.list_versions(root)}

    def lock(v):
        data = yaml.safe_load(plumbing.git_bytes(root, found[v].commit, "dvc.lock"))
        return {o["path"]: o for body in data["stages"].values() for o in body.get("outs", [])}

    d = diff.diff_versions(root, "v1.0.0", "v2.0.0")  # more data: the data, the model and the metrics change
    a, b = lock("v1.0.0"), lock("v2.0.0")
    rows = {r["path"]: r for r in d["outputs"]}
    assert {"data/audited", "models/export", "metrics/audit.json"} <= set(rows)
    for path, r in rows.items():
        assert (r["old_md5"], r["new_md5"]) == (a[path]["md5"], b[path]["md5"]) and r["old_md5"] != r["new_md5"]
        assert (r["old_size"], r["new_size"]) == (a[path]["size"], b[path]["size"])
    assert rows["data/audited"]["new_size"] > rows["data/audited"]["old_size"]  # 5 rows more
    assert rows["models/export"]["new_nfiles"] == b["models/export"]["nfiles"]
    d = diff.diff_versions(root, "v2.0.0", "v2.1.0")  # epochs only: the data is the same
    assert "data/audited" not in {r["path"] for r in d["outputs"]} and "models/export" in {r["path"] for r in d["outputs"]}
    assert main(["diff", "v1.0.0", "v2.0.0", "--repo", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("outputs:"))
    assert lines[at - 1].startswith("dataset: changed") and lines[at + 1 + len(rows)] == "params: no change"
    total = {o.path for v in ("v1.0.0", "v2.0.0") for o in plumbing.lock_outs(root, found[v].commit)}
    assert "models/checkpoints" not in total  # scratch resume state is no part of a version
    assert lines[at] == f"outputs: {len(rows)} of {len(total)} changed"
    row = a["data/audited"], b["data/audited"]
    assert (f"  data/audited: md5 {row[0]['md5']} -> {row[1]['md5']}, size {diff.human_size(row[0]['size'], 2)} -> "
            f"{diff.human_size(row[1]['size'], 2)}") in lines
    assert diff.human_size(90_123_456, 12) == "90.1 MB, 12 files" and diff.human_size(512) == "512 B"


def test_cli_diff_default_pair_and_order(history, capsys):
    """No arguments: the served version (the latest here) against the workspace; headline metrics and
    the dataset first, timings and hashes last."""
    from pipelines.cli import main

    root, _ = history
    ev = root / "metrics" / "evaluate.json"
    saved = ev.read_bytes()
    m = json.loads(saved)
    # What the real evaluate stage writes: the headline under "after", timings beside.
    ev.write_text(json.dumps({"after": {"accuracy": 0.5, "macro_f1": 0.25, "ece": 0.05}, "eval_seconds": 3.5}))
    try:
        assert main(["diff", "--repo", str(root)]) == 0
        lines = capsys.readouterr().out.splitlines()
    finally:
        ev.write_bytes(saved)
    assert lines[0] == "domaintune@v2.1.0 -> workspace"
    assert lines[1].startswith("headline")
    m = m.get("after", m)  # the real evaluate stage's shape, or the flat one
    assert lines[2] == f"  accuracy: {m['accuracy']:.4f} -> 0.5000  ({0.5 - m['accuracy']:+.4f})"
    assert lines[3] == f"  macro-F1: {m['macro_f1']:.4f} -> 0.2500  ({0.25 - m['macro_f1']:+.4f})"
    assert lines[4] == f"  ECE after calibration: {m['ece']:.4f} -> 0.0500  ({0.05 - m['ece']:+.4f})"
    assert lines[5] == "dataset: same"
    order = [i for i, ln in enumerate(lines) if not ln.startswith(" ")]
    assert [lines[i].split(":")[0] for i in order] == ["domaintune@v2.1.0 -> workspace", "headline (test split)",
                                                      "dataset", "outputs", "params", "other metrics",
                                                      "timings and hashes"]
    assert "  evaluate.eval_seconds: - -> 3.5000" in lines[lines.index("timings and hashes:"):]
    assert main(["diff", "v1", "--repo", str(root)]) == 0  # one version: against the workspace
    out = capsys.readouterr().out
    assert out.startswith("domaintune@v1.0.0 -> workspace\n") and "dataset: changed " in out
    assert main(["diff", "v1.0.0", "v2.0.0", "--repo", str(root), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert list(d)[:4] == ["a", "b", "headline", "dataset_hash"] and d["metrics"]["audit.rows"] == [11, 16]
    headline = {k for _, keys in diff.HEADLINE_METRICS for k in keys}
    assert d["headline"] and not headline & set(d["metrics"])  # the headline is not repeated below


def test_rollback_refuses_any_uncommitted_file_it_would_change(history):
    root, _ = history
    ev = root / "metrics" / "evaluate.json"
    saved = ev.read_bytes()
    ev.write_text('{"accuracy": 1.0, "note": "hand edit"}\n')
    head, tags = sh(root, "git", "rev-parse", "HEAD"), sh(root, "git", "tag")
    try:
        with pytest.raises(plumbing.RegistryError, match=r"overwrite uncommitted changes to metrics/evaluate.json;"):
            rollback.rollback(root, "v1.0.0")
        assert ev.read_text() == '{"accuracy": 1.0, "note": "hand edit"}\n'
        assert sh(root, "git", "rev-parse", "HEAD") == head and sh(root, "git", "tag") == tags
    finally:
        ev.write_bytes(saved)


def _cache_obj(root: Path, version: versions.Version, relpath: str) -> Path:
    """The DVC cache file holding `relpath` (inside models/export) of `version`."""
    folder = cache.cache_dir(root)
    out = next(o for o in plumbing.lock_outs(root, version.commit) if o.path == "models/export")
    entries = json.loads(cache.cache_path(folder, out.md5).read_text())
    md5 = next(e["md5"] for e in entries if e["relpath"] == relpath)
    return cache.cache_path(folder, md5)


def test_tampered_cache_fails_and_changes_nothing(history):
    root, _ = history
    params = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(params + "# local edit\n")
    with pytest.raises(plumbing.RegistryError, match="uncommitted changes"):
        rollback.rollback(root, "v1.0.0")
    assert (root / "params.yaml").read_text() == params + "# local edit\n"
    (root / "params.yaml").write_text(params)
    before = workspace(root)
    head = sh(root, "git", "rev-parse", "HEAD")
    target = versions.get_version(root, "v1.0.0")
    obj = _cache_obj(root, target, "weights.bin")
    good = obj.read_bytes()
    obj.chmod(0o644)
    obj.write_bytes(b"x" + good[1:])
    try:
        with pytest.raises(plumbing.RegistryError, match=r"models/export/weights.bin.*does not match"):
            rollback.rollback(root, "v1.0.0")
    finally:
        obj.write_bytes(good)
    assert workspace(root) == before
    assert sh(root, "git", "rev-parse", "HEAD") == head
    assert versions.served_version(root) == "v2.1.0"


def test_rollback_restores_v1_exactly_then_forward(history):
    root, snaps = history
    # Lose one of v1's objects locally: rollback must fetch it from the DVC remote.
    v1 = versions.get_version(root, "v1.0.0")
    _cache_obj(root, v1, "weights.bin").unlink()
    version, checked = rollback.rollback(root, "v1")
    assert version.version == "v1.0.0" and version.served
    assert checked >= 4
    now = workspace(root)
    scratch = "models/checkpoints/"  # uncached resume state: deliberately not part of a version
    for rel, data in snaps["v1.0.0"].items():
        if rel.startswith(scratch):
            continue
        if rel.startswith(("data/", "models/", "metrics/")) or rel in ("params.yaml", "dvc.lock", "dvc.yaml"):
            assert now[rel] == data, rel
    assert not [r for r in now if r.startswith(("data/", "models/")) and not r.startswith(scratch)
                and r not in snaps["v1.0.0"]]
    assert versions.served_version(root) == "v1.0.0"
    assert diff.default_diff_pair(root) == ("v1.0.0", "v2.1.0")  # `domaintune diff`: served vs latest
    assert "rollback to domaintune@v1.0.0" in sh(root, "git", "log", "-1", "--format=%s")
    assert sh(root, "git", "status", "--porcelain").strip() == ""
    # DVC agrees every out is what dvc.lock says; only the source (newer than v1) differs.
    status = sh(root, str(BIN / "dvc"), "status")
    assert "changed outs" not in status and "src/data.csv" in status
    # And forward again.
    rollback.rollback(root, "v2.1.0")
    now = workspace(root)
    assert now["models/export/weights.bin"] == snaps["v2.1.0"]["models/export/weights.bin"]
    assert versions.served_version(root) == "v2.1.0"


def test_corrupt_object_fetched_from_remote_is_not_kept(history):
    root, _ = history
    v1 = versions.get_version(root, "v1.0.0")
    obj = _cache_obj(root, v1, "sub/model.json")
    md5 = obj.parent.name + obj.name
    in_remote = cache.cache_path(root.parent / f"{root.name}-dvc-remote" / "files" / "md5", md5)
    saved_local, saved_remote = obj.read_bytes(), in_remote.read_bytes()
    obj.unlink()
    in_remote.chmod(0o644)
    in_remote.write_bytes(b'{"epochs": 666}')  # the remote's copy went bad
    before, served = workspace(root), versions.served_version(root)
    try:
        remote = re.escape(f"remote 'local' ({root.parent / (root.name + '-dvc-remote')})")
        with pytest.raises(plumbing.RegistryError, match=rf"sub/model.json: the copy of {md5} on {remote} is corrupted"):
            rollback.rollback(root, "v1.0.0")
        assert not obj.exists()  # not left in the local cache
        assert workspace(root) == before and versions.served_version(root) == served
    finally:
        in_remote.write_bytes(saved_remote)
        obj.parent.mkdir(exist_ok=True)
        obj.write_bytes(saved_local)


def test_object_missing_from_cache_and_remote_fails_and_changes_nothing(history):
    root, _ = history
    v1 = versions.get_version(root, "v1.0.0")
    obj = _cache_obj(root, v1, "weights.bin")
    md5 = obj.parent.name + obj.name
    remote = root.parent / f"{root.name}-dvc-remote"  # ensure_remote's default folder
    in_remote = cache.cache_path(remote / "files" / "md5", md5)
    assert in_remote.exists()
    saved = obj.read_bytes()
    obj.unlink()
    in_remote.unlink()  # the remote lost it too
    before, served = workspace(root), versions.served_version(root)
    try:
        with pytest.raises(plumbing.RegistryError, match=r"weights.bin: .* not in cache"):
            rollback.rollback(root, "v1.0.0")
        assert workspace(root) == before
        assert versions.served_version(root) == served
    finally:
        obj.write_bytes(saved)


def test_lock_is_exclusive_and_fails_fast(tmp_path):
    with held_lock(tmp_path, timeout=10):
        holder = (tmp_path / plumbing.LOCK_PATH).read_text()
        assert holder.startswith("pid ")
        t0 = time.perf_counter()
        with pytest.raises(plumbing.BusyError, match="already running"):
            with plumbing.repo_lock(tmp_path):
                pass
        assert time.perf_counter() - t0 < 1.0
        assert (tmp_path / plumbing.LOCK_PATH).read_text() == holder  # the loser never rewrites the holder's pid
    with plumbing.repo_lock(tmp_path):  # free again once the holder is done
        pass



def test_cli_help_is_instant_and_light():
    import subprocess
    import sys

    code = ("import sys, pipelines.cli as c\n"
            "for argv in (['--help'], ['versions', '--help'], ['rollback', '--help'], ['schedule', '--help']):\n"
            "    try: c.main(argv)\n"
            "    except SystemExit: pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'prefect', 'dvc', 'gto', 'transformers'}))")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # no heavy import behind --help
    assert "rollback" in proc.stdout and "--cron" in proc.stdout
    assert time.perf_counter() - t0 < 10


def test_tags_gto_or_people_write_are_never_fatal(tmp_path, capsys):
    """A pre-release registered with GTO itself, a tag with a malformed record and a tag that is no
    version at all: listed or skipped with a note; versions, diff, rollback and the next publish work."""
    from pipelines.cli import main

    root = make_fake_repo(tmp_path / "proj")
    repro(root)
    v1, _ = versions.publish(root, "first", stage="prod")
    sh(root, "git", "commit", "-q", "--allow-empty", "-m", "candidate")
    sh(root, str(BIN / "gto"), "register", "domaintune", "HEAD", "--version", "v2.0.0-rc1")
    sh(root, "git", "tag", "-a", "domaintune@v1.1.0", "-m", "hand-made\n\ndomaintune-record: {\"metrics\": {oops")
    sh(root, "git", "tag", "domaintune@vnext", "HEAD")
    found, skipped = versions.scan_versions(root)
    assert [v.version for v in found] == ["v1.0.0", "v1.1.0"] and found[1].record == {}
    assert {s.tag: s.reason.split(":")[0].split(",")[0] for s in skipped} == {
        "domaintune@v2.0.0-rc1": "pre-release or build version", "domaintune@v1.1.0": "listed without a record",
        "domaintune@vnext": "not a version vMAJOR.MINOR.PATCH"}
    assert main(["versions", "--repo", str(root)]) == 0
    cap = capsys.readouterr()
    assert "v1.1.0" in cap.out and "note: domaintune@v2.0.0-rc1: pre-release" in cap.err
    assert main(["diff", "v1.0.0", "v1.1.0", "--repo", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "domaintune@v1.0.0 -> domaintune@v1.1.0" and out[2].endswith(" -> -")  # no record: no metrics
    with pytest.raises(plumbing.RegistryError, match=r"domaintune@v2.0.0-rc1 exists but is skipped: pre-release"):
        versions.get_version(root, "v2.0.0-rc1")
    add_rows(root, 3)
    repro(root)
    v2, created = versions.publish(root, "more data", stage="prod")  # new data: next major after v1.1.0, past the rc
    assert created and v2.version == "v2.0.0" and versions.served_version(root) == "v2.0.0"
    version, _ = rollback.rollback(root, "v1.0.0")
    assert version.served and versions.served_version(root) == "v1.0.0"
    rollback.rollback(root, "v2")
    assert versions.served_version(root) == "v2.0.0"
