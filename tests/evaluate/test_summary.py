"""The run summary: metrics/summary.json is the headline (quality and data), the stage times go to
metrics/timings.json, so `dvc metrics diff` between two runs shows what changed in the model, not seconds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _fake_pipeline import env

from domaintune.evaluate.summary import SUMMARY_FILE, TIMINGS_FILE, write_summary

DVC = str(Path(sys.executable).with_name("dvc"))


def stage_metrics(root: Path, seconds: float, accuracy: float) -> None:
    m = root / "metrics"
    m.mkdir(exist_ok=True)
    (m / "ingest.json").write_text(json.dumps({"rows_read": 100, "rejected": 1, "stage_seconds": seconds}))
    (m / "evaluate.json").write_text(json.dumps({
        "before": {"accuracy": accuracy, "macro_f1": 0.8, "ece": 0.09},
        "after": {"accuracy": accuracy, "macro_f1": 0.8, "ece": 0.03}, "temperature": 1.3,
        "stage_seconds": 3 * seconds}))


def run(root: Path, *args: str) -> str:
    r = subprocess.run(list(args), cwd=root, capture_output=True, text=True, env=env())  # no DVC analytics
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_timings_are_kept_out_of_the_headline_file(tmp_path):
    stage_metrics(tmp_path, 10.0, 0.9)
    s = write_summary(tmp_path)
    assert s["seconds"] == {"ingest": 10.0, "evaluate": 30.0, "total": 40.0}  # the table still shows them
    headline = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert "seconds" not in headline and headline["test_accuracy"] == 0.9 and headline["rows_in"] == 100
    assert json.loads((tmp_path / TIMINGS_FILE).read_text()) == {"seconds": s["seconds"]}


def test_dvc_metrics_diff_between_two_runs_shows_quality_not_seconds(tmp_path):
    run(tmp_path, "git", "init", "-q")
    run(tmp_path, DVC, "init", "-q")
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics/summary.json\n")
    (tmp_path / ".gitignore").write_text("/metrics/timings.json\n")  # as the project's
    stage_metrics(tmp_path, 10.0, 0.9)
    write_summary(tmp_path)
    run(tmp_path, "git", "add", "-A")
    run(tmp_path, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1")
    stage_metrics(tmp_path, 97.0, 0.9)  # the same model, a busier machine
    write_summary(tmp_path)
    assert json.loads(run(tmp_path, DVC, "metrics", "diff", "--json")) == {}
    assert "timings.json" not in run(tmp_path, "git", "status", "--porcelain", "--untracked-files=all")
    stage_metrics(tmp_path, 97.0, 0.95)  # a better model
    write_summary(tmp_path)
    changed = json.loads(run(tmp_path, DVC, "metrics", "diff", "--json"))["metrics/summary.json"]
    assert set(changed) == {"test_accuracy"} and changed["test_accuracy"]["new"] == 0.95
