"""Retrain on a Prefect work pool: a real `prefect server start` on 127.0.0.1 and a real process worker.

`domaintune deploy` registers the retrain flow on the pool; a triggered run is picked up by the worker,
runs the (tiny, fake-stage) DAG and publishes a version. The test stops every process it started.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from _fake_pipeline import BIN, REPO, env, make_fake_repo

from domaintune.registry import versions

POOL = "dt-pool"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _process(cmd: list[str], environ: dict, log: Path):
    """A child in its own process group, killed with its children on exit."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=environ, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


def _wait_for(what: str, check, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what} did not happen within {timeout} s\n{tail}")


def _get(url: str):
    import httpx

    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    e = env()
    e.update({"PREFECT_HOME": str(tmp / "home"), "PREFECT_API_URL": api, "PYTHONPATH": str(REPO),
              "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
              "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"})
    log = tmp / "server.log"
    with _process([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], e, log):
        _wait_for("prefect server health", lambda: (r := _get(f"{api}/health")) is not None and r.status_code == 200,
                  180, log)
        yield api, e, tmp


def _cli(args: list[str], e: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=180)


def test_deploy_refuses_missing_pool_and_bad_cron(prefect_server, tmp_path):
    api, e, _ = prefect_server
    proj = make_fake_repo(tmp_path / "proj")
    r = _cli(["deploy", "--repo", str(proj), "--pool", "no-such-pool", "--code", str(REPO)], e, proj)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"deploy: work pool 'no-such-pool' not found on {api}; create it first, e.g. "
        "`prefect work-pool create no-such-pool --type process`"]
    r = _cli(["deploy", "--repo", str(proj), "--pool", POOL, "--cron", "not a cron"], e, proj)
    assert r.returncode == 2 and r.stderr.startswith("deploy: --cron 'not a cron' is not a valid cron expression")


def test_triggered_run_is_picked_up_by_a_process_worker_and_publishes(prefect_server, tmp_path):
    import httpx

    api, e, tmp = prefect_server
    proj = make_fake_repo(tmp_path / "proj")
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], env=e, check=True,
                   capture_output=True, timeout=120)
    r = _cli(["deploy", "--repo", str(proj), "--pool", POOL, "--cron", "0 3 * * 1", "--code", str(REPO)], e, proj)
    assert r.returncode == 0, r.stderr
    assert "deployed domaintune-retrain/retrain on work pool 'dt-pool'" in r.stdout

    dep = httpx.get(f"{api}/deployments/name/domaintune-retrain/retrain", timeout=10).json()
    assert dep["work_pool_name"] == POOL and dep["parameters"]["repo"] == str(proj.resolve())
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * 1"]
    run = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={}, timeout=10).json()

    def state():
        return httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()["state"]["type"]

    log = tmp_path / "worker.log"
    with _process([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                   "--name", "dt-test-worker"], e, log):
        final = _wait_for("the flow run to finish", lambda: (s := state()) in ("COMPLETED", "FAILED", "CRASHED")
                          and s, 300, log)
    assert final == "COMPLETED", log.read_text(errors="replace")[-3000:]
    flow_run = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()
    assert flow_run["work_pool_name"] == POOL
    tasks = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}},
                       timeout=10).json()
    names = sorted(t["name"] for t in tasks)  # one task per DVC stage, then the comparison and the decision
    assert names[:2] == ["audit", "compare-with-champion-" + names[1].rsplit("-", 1)[-1]], names
    assert len(names) == 4 and names[2].startswith("promotion-decision") and names[3] == "train", names
    found = versions.list_versions(proj)
    assert [v.version for v in found] == ["v1.0.0"] and found[0].served
    assert (proj / "models" / "export" / "weights.bin").exists()
