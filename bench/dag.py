"""The example DAG on the CPU, before and after a change: `dvc repro` in two fresh clones, side by side.

    flock /tmp/domaintune-heavy.lock .venv/bin/python bench/dag.py --before ea27d5a [--after HEAD]

Issue 12 asks that on a CPU box the DAG "behaves as today: same metrics within tolerance, and no
slower" once every stage runs on the training engine. This clones the repository twice (the commit
before the engine, and the one under test), runs the whole `dvc repro` of the embedded example in
each with this venv's interpreter (each clone's own stages/ and domaintune/ are imported: `python -m`
puts the clone first on sys.path), alternating which goes first when --rounds > 1, and records:
wall seconds of the whole repro, each stage's seconds (from the moment each stage's metrics file was
written), and the headline metrics (DAPT perplexity, test accuracy, macro-F1, ECE after calibration).
Results: bench/results/dag_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "dag_cpu.json"
STAGES = ("ingest", "dedupe", "audit", "dapt", "finetune", "evaluate", "export", "drift")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def clone(commit: str, where: Path) -> str:
    subprocess.run(["git", "clone", "-q", "--no-local", str(REPO), str(where)], check=True)
    subprocess.run(["git", "-C", str(where), "checkout", "-q", commit], check=True)
    return subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def _metric(folder: Path, name: str) -> dict:
    p = folder / "metrics" / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _find(d, *keys):
    """The first of `keys` found anywhere in a nested metrics dict (stage metrics changed shape over time)."""
    if isinstance(d, dict):
        for k in keys:
            if k in d and not isinstance(d[k], (dict, list)):
                return d[k]
        for v in d.values():
            got = _find(v, *keys)
            if got is not None:
                return got
    return None


def run_dag(folder: Path) -> dict:
    env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}", DOMAINTUNE_PROGRESS_SECONDS="3600")
    env.pop("PYTHONPATH", None)
    t0 = time.time()
    log = folder / "repro.log"
    with log.open("w") as fh:
        rc = subprocess.run(["dvc", "repro"], cwd=folder, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"dvc repro failed in {folder} (rc {rc}); see {log}")
    stamps, prev, per_stage = {}, t0, {}
    for s in STAGES:
        p = folder / "metrics" / f"{s}.json"
        stamps[s] = p.stat().st_mtime
        per_stage[s] = round(stamps[s] - prev, 1)
        prev = stamps[s]
    dapt, ev, exp = _metric(folder, "dapt"), _metric(folder, "evaluate"), _metric(folder, "export")
    return {"wall_s": round(wall, 1), "stage_s": per_stage,
            "metrics": {"dapt_perplexity_before": _find(dapt, "perplexity_before", "ppl_before"),
                        "dapt_perplexity_after": _find(dapt, "perplexity_after", "ppl_after"),
                        "test_accuracy": (ev.get("after") or {}).get("accuracy"),
                        "test_macro_f1": (ev.get("after") or {}).get("macro_f1"),
                        "ece_before": (ev.get("before") or {}).get("ece"), "ece_after": (ev.get("after") or {}).get("ece"),
                        "export_variants": sorted(exp.get("variants", {})) if isinstance(exp.get("variants"), dict)
                        else exp.get("variants")},
            "evaluate_json": ev}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the commit to compare against (before the change)")
    ap.add_argument("--after", default="HEAD")
    ap.add_argument("--rounds", type=int, default=1, help="pairs of runs; the order alternates (default 1)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dagbench-"))
    result = {"benchmark": "example DAG, `dvc repro` in fresh clones, before vs after",
              "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "loadavg_start": os.getloadavg()}, "runs": []}
    try:
        for r in range(a.rounds):
            order = [("before", a.before), ("after", a.after)]
            if r % 2:
                order.reverse()
            pair = {}
            for name, commit in order:
                folder = work / f"{name}-{r}"
                sha = clone(commit, folder)
                print(f"round {r}: {name} ({sha}) ...", flush=True)
                pair[name] = {"commit": sha, **run_dag(folder)}
                print(f"  {name}: {pair[name]['wall_s']} s, stages {pair[name]['stage_s']}, "
                      f"{ {k: v for k, v in pair[name]['metrics'].items()} }", flush=True)
            pair["after_over_before_wall"] = round(pair["after"]["wall_s"] / pair["before"]["wall_s"], 3)
            result["runs"].append(pair)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_end"] = os.getloadavg()
    ratios = [p["after_over_before_wall"] for p in result["runs"]]
    result["after_over_before_wall_median"] = sorted(ratios)[len(ratios) // 2]
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
