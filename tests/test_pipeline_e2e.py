"""End to end: the real dvc.yaml, run by real DVC on a copy of the repo, tiny model and data.

Checks what a user relies on: every stage's outs appear, a second `dvc repro`
runs nothing, and touching one finetune param re-runs finetune and only the
stages downstream of it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _fake_pipeline import tiny_rows, write_ticket_csv

REPO = Path(__file__).resolve().parents[1]
DOWNSTREAM_OF_FINETUNE = {"finetune", "evaluate", "export", "drift"}

def write_tiny_dataset(path: Path, rows_per_class: int = 36) -> None:
    rows = tiny_rows(rows_per_class)
    rows.append(("T99999", "where is my parcel 100", "shipping"))  # exact duplicate of a row above
    write_ticket_csv(path, rows)


def _files_to_copy() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=REPO, check=True, capture_output=True, text=True).stdout
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_params(project: Path, updates: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in updates.items():
        section, key = dotted.split(".", 1)
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("e2e") / "domaintune"
    for rel in _files_to_copy():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst)
    write_tiny_dataset(root / "tiny.csv")
    (root / "tiny_corpus.txt").write_text(
        "\n".join(f"customer {i} asked about refunds, passwords and parcels" for i in range(60)) + "\n")
    set_params(root, {
        "base.model": str(tiny_bert), "base.max_length": 32,
        "ingest.source": "tiny.csv", "ingest.id_column": "ticket_id",
        "audit.folds": 3,
        "dapt.corpus": ["tiny_corpus.txt"], "dapt.max_steps": 4, "dapt.block_size": 32, "dapt.batch_size": 4,
        "finetune.epochs": 1, "finetune.batch_size": 8,
        "evaluate.min_calibration_rows": 5,
    })
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny project"], root)
    first = run(["dvc", "repro"], root)
    return root, first


def test_first_repro_runs_every_stage_and_writes_all_outs(project):
    root, first = project
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    assert stages_run(first) == set(dvc["stages"])
    for name, stage in dvc["stages"].items():
        for entry in stage.get("outs", []) + stage.get("metrics", []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            assert (root / path).exists(), f"stage {name} did not write {path}"
    ingested = json.loads((root / "metrics/ingest.json").read_text())
    deduped = json.loads((root / "metrics/dedupe.json").read_text())
    assert json.dumps(ingested) and json.dumps(deduped)
    hashes = json.loads((root / "data/audited/hashes.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", hashes["dataset"])


def test_metrics_and_plots_render(project):
    root, _ = project
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], root))
    assert metrics, "dvc metrics show returned nothing"
    run(["dvc", "plots", "show", "-o", "plots_html"], root)
    assert (root / "plots_html" / "index.html").stat().st_size > 0


def test_second_repro_runs_nothing(project):
    root, _ = project
    out = run(["dvc", "repro"], root)
    assert stages_run(out) == set(), out


def test_finetune_param_change_reruns_only_downstream(project):
    root, _ = project
    lr = yaml.safe_load((root / "params.yaml").read_text())["finetune"]["lr"]
    set_params(root, {"finetune.lr": lr * 2})
    out = run(["dvc", "repro"], root)
    assert stages_run(out) == DOWNSTREAM_OF_FINETUNE, out
