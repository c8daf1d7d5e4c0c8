"""End to end: the real dvc.yaml, run by real DVC on a copy of the repo, tiny model and data.

Checks what a user relies on: every stage's outs appear, a second `dvc repro`
runs nothing, and touching one finetune param re-runs finetune and only the
stages downstream of it.
"""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import yaml

from _fake_pipeline import make_tiny_dag, set_params, sh, tiny_rows

DOWNSTREAM_OF_FINETUNE = {"finetune", "evaluate", "export", "drift"}


def stages_run(output: str) -> set[str]:
    """Stages DVC ran, from `dvc repro`'s stdout (its "Running stage" lines go to stdout, warnings to stderr)."""
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert):
    rows = tiny_rows(36) + [("T99999", "where is my parcel 100", "shipping")]  # an exact duplicate for dedupe
    root = make_tiny_dag(tmp_path_factory.mktemp("e2e") / "domaintune", tiny_bert, rows)
    first = sh(root, "dvc", "repro")
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
    assert ingested["rows_read"] == 3 * 36 + 1 and ingested["rejected"] == 0
    # The one duplicated text is removed once: within its split or as a leak out of validation/test.
    removed = pd.read_csv(root / "data/deduped/removed.csv")
    copies = removed[removed["text"] == "where is my parcel 100"]
    assert len(copies) == 1 and copies["reason"].iloc[0] in {"exact_duplicate", "cross_split_leak"}
    deduped = json.loads((root / "metrics/dedupe.json").read_text())
    assert deduped["removed_total"] == len(removed)
    hashes = json.loads((root / "data/audited/hashes.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", hashes["dataset"])


def test_metrics_and_plots_render(project):
    root, _ = project
    metrics = json.loads(sh(root, "dvc", "metrics", "show", "--json"))  # stdout only: a warning cannot break it
    assert metrics, "dvc metrics show returned nothing"
    sh(root, "dvc", "plots", "show", "-o", "plots_html")
    assert (root / "plots_html" / "index.html").stat().st_size > 0


def test_second_repro_runs_nothing(project):
    root, _ = project
    out = sh(root, "dvc", "repro")
    assert stages_run(out) == set(), out
    assert "didn't change, skipping" in out, out  # stage log lines are on stdout: the check above is not vacuous


def test_finetune_param_change_reruns_only_downstream(project):
    root, _ = project
    lr = yaml.safe_load((root / "params.yaml").read_text())["finetune"]["lr"]
    set_params(root, {"finetune.lr": lr * 2})
    out = sh(root, "dvc", "repro")
    assert stages_run(out) == DOWNSTREAM_OF_FINETUNE, out
