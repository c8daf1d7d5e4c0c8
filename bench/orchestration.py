"""What Prefect + the registry cost on top of plain DVC, measured side by side in one run.

On fresh copies of this repo with the tiny config (2-layer random BERT, ~90
tickets, a few DAPT/fine-tune steps), the same DAG runs as plain `dvc repro`
and as `domaintune retrain --no-publish` (the CLI: its temporary Prefect server,
one Prefect task per stage), each in its own process, in pairs whose order
alternates (dvc first, then the CLI first), so load drifting on a shared
machine hits both sides alike:
  - dvc_full_runs_s / cli_full_runs_s: wall time of each full run
  - cli_vs_dvc_ratio: sum of the CLI runs over sum of the dvc runs (target <= 1.05)
  - dvc_noop_s / cli_noop_s: nothing changed (median of 3 / 2)
The CLI's Prefect home (database) is created once before timing starts, as on any
machine that has run Prefect before; its server start is inside every CLI run.

    flock /tmp/domaintune-heavy.lock .venv/bin/python bench/orchestration.py [--pairs 2]
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


CLI = "import sys; from pipelines.cli import main; sys.exit(main(sys.argv[1:]))"


def main() -> None:
    import argparse

    from _fake_pipeline import make_tiny_bert

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "orchestration.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PYTHONPATH"] = str(REPO)
    try:
        tiny = make_tiny_bert(work / "tiny_bert")
        dvc = str(Path(sys.executable).parent / "dvc")
        # Prefect's database and migrations once, outside the clock (a first-ever run pays them once).
        sh(work, sys.executable, "-c", "from prefect import flow; flow(name='warm')(lambda: 1)()")
        dvc_runs, cli_runs, cli_out = [], [], ""
        for i in range(args.pairs):
            plain = make_project(work / f"plain{i}" / "domaintune", tiny)
            flowed = make_project(work / f"cli{i}" / "domaintune", tiny)
            run_dvc = lambda plain=plain: dvc_runs.append(timed(lambda: sh(plain, dvc, "repro"))[0])  # noqa: E731
            run_cli = lambda flowed=flowed: cli_runs.append(timed(  # noqa: E731
                lambda: sh(flowed, sys.executable, "-c", CLI, "retrain", "--repo", str(flowed), "--no-publish"))[0])
            for fn in ((run_dvc, run_cli) if i % 2 == 0 else (run_cli, run_dvc)):
                fn()
        dvc_noop = [timed(lambda: sh(plain, dvc, "repro"))[0] for _ in range(3)]
        cli_noop = []
        for _ in range(2):
            t, cli_out = timed(lambda: sh(flowed, sys.executable, "-c", CLI, "retrain", "--repo", str(flowed),
                                          "--no-publish"))
            cli_noop.append(t)
        assert "stages run: none (all cached)" in cli_out, cli_out
        ratio = sum(cli_runs) / sum(dvc_runs)
        result = {
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                        "note": "2 cores shared with other work: compare the pairs, not absolute times"},
            "config": "tiny: 2-layer 64-wide random BERT, 90 tickets / 3 labels, dapt 4 steps, finetune 1 epoch",
            "method": "domaintune retrain --no-publish (one dvc repro process, started before the flow; one "
                      "Prefect task per stage; temporary Prefect server) vs dvc repro, fresh copies, alternating order",
            "dvc_full_runs_s": [round(x, 2) for x in dvc_runs],
            "cli_full_runs_s": [round(x, 2) for x in cli_runs],
            "cli_vs_dvc_pair_ratios": [round(c / d, 3) for c, d in zip(cli_runs, dvc_runs)],
            "cli_vs_dvc_ratio": round(ratio, 3),
            "dvc_noop_s": round(statistics.median(dvc_noop), 2),
            "dvc_noop_runs_s": [round(x, 2) for x in dvc_noop],
            "cli_noop_s": round(statistics.median(cli_noop), 2),
            "cli_noop_runs_s": [round(x, 2) for x in cli_noop],
            "targets": {"cli_vs_dvc_ratio_max": 1.05, "dvc_noop_s_max": 3.0},
        }
        result["meets_targets"] = {"cli_vs_dvc_ratio": ratio <= 1.05, "dvc_noop": result["dvc_noop_s"] <= 3.0}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
