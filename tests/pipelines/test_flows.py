"""Prefect flows on a real git + DVC project with trivial stages, against one temporary Prefect server.

retrain -> v1; nothing changed -> no new version and no stage re-run; new data ->
v2 with another dataset hash; a failing stage publishes nothing and leaves the
tree as it was; a transient failure is retried; a second retrain fails fast;
rollback flow; the cron deployment exists on the server and a triggered run completes.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from _fake_pipeline import add_rows, held_lock, make_fake_repo, make_tiny_dag, sh, tiny_rows, workspace

from domaintune.registry import plumbing, versions


@pytest.fixture(scope="module")
def proj(tmp_path_factory, prefect_harness):
    return make_fake_repo(tmp_path_factory.mktemp("flows") / "proj")


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def go():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                               sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100)

    return asyncio.run(go())


def _artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    async def go():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])),
                flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC,
                limit=10, offset=0)

    return asyncio.run(go())


def _logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    async def go():
        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                          offset=0, sort=LogSort.TIMESTAMP_ASC)

    return [log.message for log in asyncio.run(go())]


def test_retrain_publishes_versions_and_caches(proj):
    from pipelines.retrain import retrain_flow

    state = retrain_flow(repo=str(proj), return_state=True)
    assert state.is_completed()
    res = state.result()
    assert res["ran"] == ["audit", "train"] and res["version"] == "domaintune@v1.0.0" and res["created"]
    # One task per DVC stage, in DAG order, each completed, with the stage's output in its log.
    # Then the comparison with the champion and the promotion decision, each a task of its own.
    runs = sorted(_task_runs(state.state_details.flow_run_id), key=lambda r: r.start_time)
    names = [r.name for r in runs]
    assert names[:2] == ["audit", "train"] and len(names) == 4, names
    assert names[2].startswith("compare-with-champion") and names[3].startswith("promotion-decision"), names
    assert all(r.state.is_completed() for r in runs)
    # Run logs reach the API in batches: give the last batch a moment.
    for _ in range(20):
        logs = "\n".join(_logs(state.state_details.flow_run_id))
        if "python fake/train.py" in logs and "promoted v1.0.0" in logs:
            break
        time.sleep(0.5)
    assert "Running stage 'audit'" in logs and "python fake/train.py" in logs
    assert "promoted v1.0.0: first version: no champion to compare with" in logs
    # The decision and its evidence are the run's markdown artifact as well (the Prefect UI's Artifacts tab).
    art = [a for a in _artifacts(state.state_details.flow_run_id) if a.key == "promotion-decision"]
    assert len(art) == 1 and art[0].type == "markdown" and "**promote**: first version" in art[0].data
    assert sh(proj, "git", "status", "--porcelain").strip() == ""
    # The run summary is written by the flow and is part of the version.
    v = versions.get_version(proj, "v1.0.0")
    summary = json.loads(plumbing.git_bytes(proj, v.commit, "metrics/summary.json"))
    assert summary == json.loads((proj / "metrics" / "summary.json").read_text())
    assert summary["test_accuracy"] == round(json.loads((proj / "metrics/evaluate.json").read_text())["after"]["accuracy"], 4)

    # Nothing changed: DVC skips both stages and no version is added.
    res = retrain_flow(repo=str(proj))
    assert res["ran"] == [] and res["version"] == "domaintune@v1.0.0" and not res["created"]

    # New rows in the source: data stages re-run, new major version with another dataset hash.
    add_rows(proj, 4)
    res = retrain_flow(repo=str(proj))
    assert res["ran"] == ["audit", "train"] and res["version"] == "domaintune@v2.0.0"
    v1, v2 = versions.list_versions(proj)
    assert v1.record["dataset_hash"] != v2.record["dataset_hash"] and v2.served

    # A params override (like `dvc exp run -S`) re-runs only the stage that reads it -> new minor.
    comments = [ln.split("#", 1)[1] for ln in (proj / "params.yaml").read_text().splitlines() if "#" in ln]
    res = retrain_flow(repo=str(proj), overrides=["finetune.epochs=4"])
    assert res["ran"] == ["train"] and res["version"] == "domaintune@v2.1.0"
    text = (proj / "params.yaml").read_text()
    assert "  epochs: 4" in text
    assert [ln.split("#", 1)[1] for ln in text.splitlines() if "#" in ln] == comments  # comments survive


def test_failed_stage_publishes_nothing_and_restores(proj):
    from pipelines.retrain import StageFailed, retrain_flow

    tags = sh(proj, "git", "tag")
    add_rows(proj, 2, start=5000)  # audit will run and succeed, then train fails
    before = workspace(proj)
    head = sh(proj, "git", "rev-parse", "HEAD")
    state = retrain_flow(repo=str(proj), overrides=["finetune.epochs=13"], return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="train.*exit code 2"):
        state.result()
    runs = {r.name: r for r in _task_runs(state.state_details.flow_run_id)}
    assert runs["train"].run_count == 1  # bad input (exit 2) is not retried
    assert sh(proj, "git", "tag") == tags and sh(proj, "git", "rev-parse", "HEAD") == head
    assert workspace(proj) == before  # params.yaml, dvc.lock, metrics and outs as they were
    assert sh(proj, "git", "status", "--porcelain").strip() == ""


def test_transient_failure_is_retried(proj):
    from pipelines.retrain import retrain_flow

    (proj / "FAIL_ONCE").write_text("")
    state = retrain_flow(repo=str(proj), overrides=["finetune.epochs=6"], return_state=True)
    assert state.is_completed(), state
    runs = {r.name: r for r in _task_runs(state.state_details.flow_run_id)}
    assert runs["train"].run_count == 2
    assert state.result()["version"] == "domaintune@v3.0.0"  # the rows added above, now published


def test_second_retrain_fails_fast(proj):
    from pipelines.retrain import retrain_flow

    with held_lock(proj, timeout=30):
        before = workspace(proj)
        t0 = time.perf_counter()
        with pytest.raises(plumbing.BusyError, match="already running"):
            retrain_flow(repo=str(proj), overrides=["finetune.epochs=7"])
        assert time.perf_counter() - t0 < 15
        assert workspace(proj) == before


def test_rollback_flow(proj):
    from pipelines.rollback import rollback_flow

    v1_export = plumbing.git_bytes(proj, versions.get_version(proj, "v1").commit, "dvc.lock")
    res = rollback_flow("v1", repo=str(proj))
    assert res["version"] == "domaintune@v1.0.0" and res["files_verified"] >= 4
    assert (proj / "dvc.lock").read_bytes() == v1_export
    assert versions.served_version(proj) == "v1.0.0"
    from pipelines.cli import main

    assert main(["rollback", "v3", "--repo", str(proj)]) == 0
    assert versions.served_version(proj) == "v3.0.0"


def test_cli_versions_and_diff(proj, capsys):
    from pipelines.cli import main

    assert main(["versions", "--repo", str(proj)]) == 0
    out = capsys.readouterr().out
    served = [ln for ln in out.splitlines() if ln.startswith("* ") and " v" in ln]
    assert len(served) == 1 and "v3.0.0" in served[0]
    assert {"v1.0.0", "v2.0.0", "v2.1.0", "v3.0.0"} <= set(out.split())
    assert main(["diff", "v2.0.0", "v2.1.0", "--repo", str(proj)]) == 0
    out = capsys.readouterr().out
    assert "finetune.epochs: 3 -> 4" in out
    assert main(["diff", "v2.0.0", "v9", "--repo", str(proj)]) == 2
    err = capsys.readouterr().err
    assert "no version 'v9.0.0'" in err and len(err.strip().splitlines()) == 1
    # `domaintune retrain` with nothing changed: every stage cached, the served version stays.
    assert main(["retrain", "--repo", str(proj)]) == 0
    out = capsys.readouterr().out
    assert "stages run: none (all cached)" in out and "unchanged, current version: domaintune@v3.0.0" in out
    import logging

    assert not logging.getLogger("EventsWorker").isEnabledFor(logging.WARNING)  # Prefect's shutdown noise
    assert main(["retrain", "--repo", str(proj), "--set", "finetune.epochs=13"]) == 2
    err = capsys.readouterr().err
    assert "nothing published" in err and "Traceback" not in err


def test_schedule_deployment_and_triggered_run(proj):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runner import Runner

    from pipelines.retrain import make_deployment

    with pytest.raises(Exception, match="cron|Invalid"):
        make_deployment("not a cron", str(proj))
    dep = make_deployment("0 3 * * 1", str(proj), publish=False)

    async def go():
        runner = Runner(name="test-runner", query_seconds=1)
        dep_id = await runner.add_deployment(dep)
        async with get_client() as client:
            d = await client.read_deployment(dep_id)
            crons = [s.schedule.cron for s in d.schedules]
            run = await run_deployment(f"domaintune-retrain/{dep.name}", timeout=0)
            await runner.start(run_once=True)
            final = await client.read_flow_run(run.id)
        return crons, final

    crons, final = asyncio.run(go())
    assert crons == ["0 3 * * 1"]
    assert final.state.is_completed(), final.state
    assert final.parameters["repo"] == str(proj.resolve())
    runs = _task_runs(final.id)
    assert sorted(r.name for r in runs) == ["audit", "train"] and all(r.state.is_completed() for r in runs)


# ----------------------------------------------------------------------------- the real DAG

@pytest.fixture(scope="module")
def dag(tmp_path_factory, tiny_bert, prefect_harness):
    return make_tiny_dag(tmp_path_factory.mktemp("dag") / "domaintune", tiny_bert, tiny_rows(30, start=100))


FIXED_BATCH = ["refund the charge of 7 dollars", "my parcel 12 is late", "password rejected again",
               "where is my money", "reset the password for user 99"]


def _versioned_files(root: Path) -> dict[str, bytes]:
    """params.yaml, dvc.lock and every file under an out that dvc.lock records."""
    outs = [o.path for o in plumbing.lock_outs(root)]
    return {k: v for k, v in workspace(root).items()
            if k in ("params.yaml", "dvc.lock") or any(k == o or k.startswith(o + "/") for o in outs)}


@pytest.mark.slow
def test_real_dag_retrain_rollback_monitor(dag):
    import numpy as np

    from domaintune.predict.predictor import Predictor
    from pipelines.monitor import monitor_flow
    from pipelines.retrain import retrain_flow
    from pipelines.rollback import rollback_flow

    res = retrain_flow(repo=str(dag))
    assert res["version"] == "domaintune@v1.0.0"
    assert res["ran"] == ["ingest", "dedupe", "audit", "dapt", "finetune", "evaluate", "export", "drift"]
    v1_files = _versioned_files(dag)
    assert sh(dag, "git", "status", "--porcelain").strip() == ""  # the version commit took everything
    assert {"models/export/model.json", "models/drift_baseline/profile.json", "data/audited/hashes.json",
            "metrics/evaluate.json"} <= set(v1_files)
    v1_probs = Predictor.load(dag / "models/export").predict_proba(FIXED_BATCH)

    # New rows in the source file -> every stage re-runs -> v2 with another dataset hash.
    with open(dag / "tiny.csv", "a", newline="", encoding="utf-8") as fh:
        import csv

        csv.writer(fh).writerows(tiny_rows(6, start=500))
    sh(dag, "git", "commit", "-qam", "more tickets")
    res = retrain_flow(repo=str(dag))
    assert res["version"] == "domaintune@v2.0.0"
    v1, v2 = versions.list_versions(dag)
    assert v1.record["dataset_hash"] != v2.record["dataset_hash"]
    assert v2.record["dataset_hash"] == json.loads((dag / "data/audited/hashes.json").read_text())["dataset"]
    assert not np.array_equal(Predictor.load(dag / "models/export").predict_proba(FIXED_BATCH), v1_probs)

    # Roll back: every versioned file byte-identical to v1's, same predictions.
    out = rollback_flow("v1", repo=str(dag))
    assert out["version"] == "domaintune@v1.0.0"
    now = _versioned_files(dag)
    assert sorted(now) == sorted(v1_files)
    assert [k for k in v1_files if now[k] != v1_files[k]] == []
    np.testing.assert_array_equal(Predictor.load(dag / "models/export").predict_proba(FIXED_BATCH), v1_probs)

    # Monitor against the restored baseline: in-domain batch vs another domain.
    (dag / "same.txt").write_text("\n".join(t for _, t, _ in tiny_rows(10, start=700)) + "\n")
    same = monitor_flow("same.txt", repo=str(dag), out="reports/monitor_same")
    (dag / "other.txt").write_text("\n".join(
        f"Die Rechnung Nr. {i}{i} über {i * 37} Euro wurde am {i % 28 + 1}.03.2025 doppelt abgebucht, Kündigung!"
        for i in range(30)) + "\n")
    other = monitor_flow("other.txt", repo=str(dag), out="reports/monitor_other")
    assert other["drift"] is True
    assert other["drifted_share"] > same["drifted_share"]
    assert (dag / "reports/monitor_other/report.html").exists()
    assert json.loads((dag / "reports/monitor_other/verdict.json").read_text())["drift"] is True
