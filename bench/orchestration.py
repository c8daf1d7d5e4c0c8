"""What Prefect + the registry cost on top of plain DVC, measured side by side in one run.

On two fresh copies of this repo with the tiny config (2-layer random BERT, ~90
tickets, a few DAPT/fine-tune steps), the same DAG runs once as plain
`dvc repro` and once as the retrain flow (one Prefect task per stage):
  - dvc_full_s / flow_full_s: wall time of a full run each way
  - flow_overhead_s: flow wall time minus the sum of its stage tasks' times
    (task start-up, logging, the lock, the stage-order lookup), without and with
    publishing (dvc push + git commit + GTO tag)
  - dvc_noop_s: `dvc repro` with nothing changed (median of 3)
  - flow_noop_s: the retrain flow with nothing changed (median of 3): every
    stage task asks DVC, which skips it; no version is added
Targets: no-op `dvc repro` <= 3 s; flow overhead <= 10% of a full run.
The Prefect server is the temporary local one (started before timing starts).

    flock /tmp/domaintune-heavy.lock .venv/bin/python bench/orchestration.py
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

def sh(cwd: Path, *cmd: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@x", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="b@x")
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def make_project(dst: Path, tiny_bert: Path) -> Path:
    from _fake_pipeline import make_tiny_dag, tiny_rows

    return make_tiny_dag(dst, tiny_bert, tiny_rows(30))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    from _fake_pipeline import make_tiny_bert
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.retrain import retrain_flow

    work = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    try:
        tiny = make_tiny_bert(work / "tiny_bert")
        plain = make_project(work / "plain" / "domaintune", tiny)
        flowed = make_project(work / "flow" / "domaintune", tiny)
        dvc = str(Path(sys.executable).parent / "dvc")

        dvc_full_s, _ = timed(lambda: sh(plain, dvc, "repro"))
        dvc_noop = [timed(lambda: sh(plain, dvc, "repro"))[0] for _ in range(3)]

        with prefect_test_harness(server_startup_timeout=120):
            warm = make_project(work / "warm" / "domaintune", tiny)  # first flow run pays Prefect's start-up
            retrain_flow(repo=str(warm), publish=False, overrides=["dapt.enabled=false"])
            flow_full_s, res = timed(lambda: retrain_flow(repo=str(flowed)))
            stage_sum = sum(s["seconds"] for s in res["stages"])
            noop = [timed(lambda: retrain_flow(repo=str(flowed))) for _ in range(3)]
        assert res["version"] == "domaintune@v1.0.0" and res["created"], res
        assert all(not r["ran"] and r["version"] == "domaintune@v1.0.0" for _, r in noop), noop

        overhead_total = flow_full_s - stage_sum
        overhead_no_publish = overhead_total - res["publish_seconds"]
        result = {
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "config": "tiny: 2-layer 32-wide random BERT, 90 tickets / 3 labels, dapt 4 steps, finetune 1 epoch",
            "stages": [s["stage"] for s in res["stages"]],
            "dvc_full_s": round(dvc_full_s, 2),
            "flow_full_s": round(flow_full_s, 2),
            "flow_stage_sum_s": round(stage_sum, 2),
            "flow_stage_seconds": {s["stage"]: round(s["seconds"], 2) for s in res["stages"]},
            "flow_publish_s": round(res["publish_seconds"], 2),
            "flow_overhead_s": round(overhead_no_publish, 2),
            "flow_overhead_fraction": round(overhead_no_publish / flow_full_s, 4),
            "flow_overhead_with_publish_s": round(overhead_total, 2),
            "flow_overhead_with_publish_fraction": round(overhead_total / flow_full_s, 4),
            "flow_vs_dvc_full_ratio": round(flow_full_s / dvc_full_s, 3),
            "dvc_noop_s": round(statistics.median(dvc_noop), 2),
            "dvc_noop_runs_s": [round(x, 2) for x in dvc_noop],
            "flow_noop_s": round(statistics.median(t for t, _ in noop), 2),
            "flow_noop_runs_s": [round(t, 2) for t, _ in noop],
            "targets": {"dvc_noop_s_max": 3.0, "flow_overhead_fraction_max": 0.10},
        }
        result["meets_targets"] = {
            "dvc_noop": result["dvc_noop_s"] <= 3.0,
            "flow_overhead": result["flow_overhead_fraction"] <= 0.10,
        }
        out = REPO / "bench" / "results" / "orchestration.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
