"""SIGKILL of a real `domaintune retrain` or `rollback` at each phase, then a plain retrain: no stale override
is ever published, nothing the killed run started keeps running, and a version is served exactly when it was
promoted (a registered tag's pending stage assignment is completed, anything else the killed run changed is
put back, and one line says which).

The killed commands run as subprocesses on the fake git + DVC project (tests/_fake_pipeline.py) whose train
stage can be held (FAKE_HOLD) while the test kills the command; DOMAINTUNE_TEST_KILL_AT makes the command
SIGKILL itself at a named phase (plumbing.fault_point: only under pytest). All but the first use this session's
Prefect server; the first uses its own temporary server, as a plain `domaintune retrain` does.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _fake_pipeline import REPO, env, make_fake_repo, set_params, sh, workspace

from domaintune.registry import plumbing, versions
from pipelines.cli import main

# Prepended to the fake train stage: with FAKE_HOLD=<path> it marks <path>.started and waits for <path>.go.
HOLD = """\
import os as _os, pathlib as _pl, time as _time
_hold = _os.environ.get("FAKE_HOLD")
if _hold:
    _pl.Path(_hold + ".started").touch()
    while not _pl.Path(_hold + ".go").exists():
        _time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory, prefect_harness):
    """v1.0.0 (epochs 3), then v1.1.0 (epochs 4), served; each test works on a copy."""
    from pipelines.retrain import retrain_flow

    root = make_fake_repo(tmp_path_factory.mktemp("kill") / "proj")
    train = root / "fake" / "train.py"
    train.write_text(HOLD + train.read_text())
    sh(root, "git", "commit", "-qam", "a train stage that can be held")
    assert retrain_flow(repo=str(root))["version"] == "domaintune@v1.0.0"
    assert retrain_flow(repo=str(root), overrides=["finetune.epochs=4"])["version"] == "domaintune@v1.1.0"
    assert versions.served_version(root) == "v1.1.0"
    return root


@pytest.fixture()
def proj(template, tmp_path):
    root = tmp_path / "proj"
    shutil.copytree(template, root, symlinks=True)
    return root


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def start_cli(*args: str, own_server: bool = False, log: Path | None = None, **extra: str) -> subprocess.Popen:
    """`domaintune ARGS` as a subprocess (this checkout's code), on this session's Prefect server unless
    own_server (then it starts its temporary one, as a plain `domaintune retrain` does). Output to `log`
    if given (a child that outlives the command cannot hold the test up), else to pipes."""
    e = {**env(), **extra}
    e.pop("PREFECT_API_URL", None)
    if not own_server:
        e["PREFECT_API_URL"] = _api_url()
    out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - the child holds it; closed below
    try:
        return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=e, text=True,
                                stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE)
    finally:
        if log:
            out.close()


def run_killed_at(phase: str, *args: str) -> None:
    proc = start_cli(*args, **{plumbing.KILL_AT_ENV: phase})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {phase!r} (exit {proc.returncode}):\n{out}\n{err}"


def cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    """`domaintune ARGS` in this process: (exit code, stdout, stderr lines of domaintune itself, not Prefect's)."""
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, [ln for ln in err.splitlines() if ln.startswith(f"domaintune {args[0]}:")]


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, start time, command line) of every live process (zombies left out)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] != b"Z":
            table[int(name)] = (int(fields[1]), int(fields[19]), cmd)
    return table


def descendants(pid: int) -> dict[int, tuple[int, str]]:
    table = _proc_table()
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for p, (ppid, start, cmd) in table.items():
            if ppid == parent and p not in found:
                found[p] = (start, cmd)
                todo.append(p)
    return found


def alive(procs: dict[int, tuple[int, str]]) -> dict[int, str]:
    table = _proc_table()
    return {p: cmd for p, (start, cmd) in procs.items() if p in table and table[p][1] == start}


def wait_for(what, timeout: float, why: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {why}")


def epochs_published(root: Path) -> dict[str, int]:
    return {v.version: v.record["params"]["finetune"]["epochs"] for v in versions.list_versions(root)}


def test_sigkill_during_a_stage_ends_its_children_and_the_next_retrain_publishes_no_override(
        proj, template, tmp_path, capsys):
    hold = tmp_path / "hold"
    proc = start_cli("retrain", "--repo", str(proj), "-S", "finetune.epochs=7", own_server=True,
                     log=tmp_path / "retrain.log", FAKE_HOLD=str(hold))
    children = {}
    try:
        # The stage runs, and the flow has started Prefect's temporary server.
        wait_for(lambda: Path(f"{hold}.started").exists() and any(
            "prefect.server.api.server" in cmd for _, cmd in descendants(proc.pid).values()), 180,
            "the train stage to run while the flow's temporary server is up")
        children = descendants(proc.pid)
        cmds = " | ".join(cmd for _, cmd in children.values())
        assert "repro" in cmds and "fake/train.py" in cmds and "prefect.server.api.server" in cmds, cmds
        proc.kill()
        proc.wait(timeout=60)
        # dvc repro, the stage it runs and the temporary server end with the retrain.
        try:
            wait_for(lambda: not alive(children), 30, "the killed retrain's children to end")
        except AssertionError:
            raise AssertionError(f"left running after SIGKILL of the retrain: {alive(children)}") from None
    finally:
        Path(f"{hold}.go").touch()
        for pid in alive(children):
            os.kill(pid, signal.SIGKILL)
    assert "epochs: 7" in (proj / "params.yaml").read_text()  # what the killed run left

    rc, out, said = cli(capsys, "retrain", "--repo", str(proj))
    assert rc == 0, (out, said)
    assert epochs_published(proj) == {"v1.0.0": 3, "v1.1.0": 4}  # the override 7 was never published
    assert "unchanged, current version: domaintune@v1.1.0" in out
    assert versions.served_version(proj) == "v1.1.0"
    # (DVC deletes a stage's outs before running it: the held train stage's metrics are gone too.)
    assert len(said) == 1 and said[0].startswith("domaintune retrain: restored metrics/evaluate.json, params.yaml "
                                                 "as they were before an interrupted retrain (pid"), said
    assert workspace(proj) == workspace(template)
    assert sh(proj, "git", "status", "--porcelain").strip() == ""
    assert not (proj / plumbing.JOURNAL_PATH).exists()


def test_sigkill_after_the_tag_the_next_retrain_serves_that_version(proj, capsys):
    run_killed_at("registered", "retrain", "--repo", str(proj), "-S", "finetune.epochs=6")
    assert "domaintune@v1.2.0" in sh(proj, "git", "tag").split()
    assert versions.served_version(proj) == "v1.1.0"  # registered, never assigned: the killed state

    rc, out, said = cli(capsys, "retrain", "--repo", str(proj))
    assert rc == 0
    assert versions.served_version(proj) == "v1.2.0"
    assert "unchanged, current version: domaintune@v1.2.0" in out
    assert len(said) == 1 and re.fullmatch(
        r"domaintune retrain: completed an interrupted retrain \(pid \d+, started [\d: -]+\) of domaintune@v1\.2\.0: "
        r"it was registered, not in stage challenger; assigned v1\.2\.0 to stage challenger and promoted v1\.2\.0 "
        r"as its retrain decided, now served", said[0]), said
    assert epochs_published(proj) == {"v1.0.0": 3, "v1.1.0": 4, "v1.2.0": 6}  # 6 was applied by the run that published it
    assert sh(proj, "git", "status", "--porcelain").strip() == ""
    assert not (proj / plumbing.JOURNAL_PATH).exists()


@pytest.mark.parametrize("phase", ["rollback-restored", "rollback-committed"])
def test_sigkill_during_a_rollback_then_a_plain_retrain(proj, template, phase, capsys):
    run_killed_at(phase, "rollback", "v1", "--repo", str(proj))
    assert versions.served_version(proj) == "v1.1.0"  # the rollback never got to assign prod
    v1 = versions.get_version(proj, "v1")
    assert (proj / "params.yaml").read_bytes() == plumbing.git_bytes(proj, v1.commit, "params.yaml")

    rc, out, said = cli(capsys, "retrain", "--repo", str(proj))
    served = "v1.1.0" if phase == "rollback-restored" else "v1.0.0"
    # The reported version is the served one, and the workspace is that version.
    assert rc == 0 and f"unchanged, current version: domaintune@{served}" in out, out
    assert versions.served_version(proj) == served
    v = versions.get_version(proj, served)
    assert (proj / "params.yaml").read_bytes() == plumbing.git_bytes(proj, v.commit, "params.yaml")
    assert len(said) == 1, said
    if phase == "rollback-restored":  # files restored, not committed: the rollback is undone
        assert said[0].startswith("domaintune retrain: restored ") and "params.yaml" in said[0] and \
            "before an interrupted rollback (pid" in said[0], said
        assert workspace(proj) == workspace(template)
    else:  # committed, not assigned: the rollback is completed
        assert re.fullmatch(
            r"domaintune retrain: completed an interrupted rollback \(pid \d+, started [\d: -]+\) of domaintune@v1\.0\.0: "
            r"it was registered, not in stage prod; assigned v1\.0\.0 to stage prod, now served", said[0]), said
    assert epochs_published(proj) == {"v1.0.0": 3, "v1.1.0": 4}
    assert sh(proj, "git", "status", "--porcelain").strip() == ""


def test_retrain_refuses_to_publish_params_it_did_not_apply(proj, tmp_path, monkeypatch, capsys):
    """params.yaml changed by someone else (an orphaned run, a person) while the stages ran: refused."""
    hold = tmp_path / "hold"
    monkeypatch.setenv("FAKE_HOLD", str(hold))
    before, tags = (proj / "params.yaml").read_bytes(), sh(proj, "git", "tag")

    def meddle():
        deadline = time.monotonic() + 120
        while not Path(f"{hold}.started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        set_params(proj, {"finetune.epochs": 9})
        Path(f"{hold}.go").touch()

    t = threading.Thread(target=meddle, daemon=True)
    t.start()
    try:
        rc, out, said = cli(capsys, "retrain", "--repo", str(proj), "-S", "finetune.epochs=8")
    finally:
        Path(f"{hold}.go").touch()
        t.join()
    assert rc == 2
    assert said == [f"domaintune retrain: error: {proj / 'params.yaml'}: changed while this retrain ran, not by it; "
                    "refusing to publish params it did not apply (nothing published)"], said
    assert sh(proj, "git", "tag") == tags and versions.served_version(proj) == "v1.1.0"
    assert (proj / "params.yaml").read_bytes() == before
    assert not (proj / plumbing.JOURNAL_PATH).exists()


def test_an_unchanged_retrain_says_when_the_workspace_is_not_the_served_version(proj, capsys):
    """A workspace that is a published version other than the served one (GTO's prod moved by hand, say)."""
    from gto.api import assign

    assign(str(proj), "domaintune", "prod", version="v1.0.0", force=True)
    assert versions.served_version(proj) == "v1.0.0"
    rc, out, said = cli(capsys, "retrain", "--repo", str(proj))
    assert rc == 0 and said == []
    assert ("unchanged: the workspace is domaintune@v1.1.0, which is not served (served: v1.0.0); "
            "`domaintune rollback v1.1.0` serves it") in out
    assert versions.served_version(proj) == "v1.0.0"
