"""End to end with base.task: generation: the real dvc.yaml run by real DVC on a copy of the repo,
a tiny random Llama and a BPE tokenizer the project builds (domaintune/modeling/tinyllm.py), and a slice of
examples/support_replies. Checks every out and metric, then publishes two versions and rolls back."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess

import pandas as pd
import pytest
import yaml
from _fake_pipeline import BIN, REPO, env, make_tiny_dag, set_params, sh, workspace

from domaintune.export.artifacts import verify_checksums

PAIRS = REPO / "examples" / "support_replies" / "pairs.csv"
GEN_PARAMS = {
    "base.task": "generation", "base.max_length": 192, "ingest.source": "tiny_pairs.csv",
    "dapt.max_steps": 3, "dapt.block_size": 192, "dapt.batch_size": 4, "dapt.lr": 1.0e-3,
    "finetune.method": "lora", "finetune.epochs": 2, "finetune.batch_size": 8, "finetune.lr": 1.0e-2,
    "finetune.target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"], "finetune.lora_dropout": 0.0,
    "finetune.packing": True,
    "evaluate.samples": 2, "evaluate.max_new_tokens": 8,
}


def _rows() -> list[list[str]]:
    rows = list(csv.reader(PAIRS.open(encoding="utf-8")))
    return rows[1:61] + rows[-5:]  # 60 pairs (with the near-empty and long replies) + 5 duplicates/conflicts


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from domaintune.modeling import tinyllm

    texts = [c for r in _rows() for c in r[1:]]
    return tinyllm.save(tmp_path_factory.mktemp("tiny_llama") / "model", texts, seed=0)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama):
    root = make_tiny_dag(tmp_path_factory.mktemp("gen") / "domaintune", tiny_llama, [])
    with (root / "tiny_pairs.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["ticket_id", "prompt", "response"])
        w.writerows(_rows())
    set_params(root, GEN_PARAMS)
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "generation task")
    proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=root, capture_output=True, text=True,
                          env={**env(), "DOMAINTUNE_PROGRESS_SECONDS": "3600"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def _metrics(root, stage):
    return json.loads((root / "metrics" / f"{stage}.json").read_text())


def test_every_stage_writes_every_out(project):
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        for entry in stage.get("outs", []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            assert (project / path).exists(), f"stage {name} did not write {path}"


def test_data_stages_account_for_every_row(project):
    ing = _metrics(project, "ingest")
    assert ing["rows_read"] == 65 and ing["rejected"] == 0 and ing["labels"] == 0
    assert sum(ing["rows"].values()) == 65 and min(ing["rows"].values()) > 0
    removed = pd.read_csv(project / "data/deduped/removed.csv")
    assert set(removed["reason"]) <= {"exact_duplicate", "cross_split_leak", "label_conflict", "near_duplicate",
                                      "near_leak"}
    for dup in ("DUP-001", "DUP-002", "DUP-003"):  # a copy of one pair: one of the two goes
        src = pd.read_csv(project / "tiny_pairs.csv").set_index("ticket_id").loc[dup, "prompt"]
        assert (removed["text"] == src).sum() == 1
    for conf in ("CONF-001", "CONF-002"):  # one prompt, two responses: reported in removed.csv
        assert conf in set(removed["id"]) or conf in set(removed["kept_id"].astype(str))
    ded = _metrics(project, "dedupe")
    assert sum(ded["rows_out"].values()) == 65 - len(removed)
    audit = _metrics(project, "audit")
    assert audit["issues"]["near_empty_response"] == 3  # ok / Noted. / Thanks!
    assert audit["issues"]["length_outlier"] >= 1      # the reply repeated 6 times
    assert audit["issues"]["response_truncated"] >= 1  # ...which does not fit 192 tokens
    issues = pd.read_csv(project / "reports/audit/generation_issues.csv")
    assert "TCK-000309" in set(issues.loc[issues["issue"] == "length_outlier", "id"])
    assert audit["dataset_hash_in"] != audit["dataset_hash_out"] or audit["rows_with_issues"] > 0


def test_training_stages_learn(project):
    dapt = _metrics(project, "dapt")
    assert dapt["steps"] == 3 and dapt["perplexity_after"] < dapt["perplexity_before"]
    ft = _metrics(project, "finetune")
    assert ft["method"] == "lora" and ft["packing"] and ft["steps"] >= 2
    assert ft["loss_last"] < ft["loss_first"] and ft["tokens_per_second"] > 0
    assert (project / "models/finetuned/adapter_model.safetensors").is_file()
    assert (project / "reports/finetune/live/plots/metrics/train/loss.tsv").is_file()
    ev = _metrics(project, "evaluate")
    assert ev["perplexity"]["tuned"] < ev["perplexity"]["base"] and ev["test_response_tokens"] > 0
    samples = json.loads((project / "reports/eval/samples.json").read_text())
    assert len(samples) == 2 and all(isinstance(s["generated"], str) for s in samples)


def test_export_is_merged_verified_and_loads_in_a_pipeline(project):
    from transformers import pipeline

    ex = _metrics(project, "export")
    check = ex["merge_check"]
    assert check["had_adapter"] and check["examples"] > 0 and check["max_rel_diff"] <= check["tolerance"]
    out = project / "models/export"
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert not list(out.glob("adapter_*"))  # merged: a plain model
    assert verify_checksums(out) == len([p for p in out.rglob("*") if p.is_file()]) - 2  # checksums.json, marker
    card = (out / "README.md").read_text()
    assert "chat template" in card and "Greedy decoding" in card
    gen = pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    res = gen("Where is my invoice?", max_new_tokens=5, do_sample=False)
    assert isinstance(res[0]["generated_text"], str)
    drift, rows = _metrics(project, "drift"), _metrics(project, "dedupe")["rows_out"]
    assert drift["task"] == "generation" and drift["output_reference_rows"] == rows["validation"]
    assert drift["text_reference_rows"] == rows["train"] + rows["validation"]
    assert (project / "models/drift_baseline/reference_outputs.parquet").is_file()  # the classifier's baseline files


def test_monitor_judges_prompt_batches_against_the_generation_baseline(project, capsys):
    """`domaintune monitor` on the DAG's own export and drift baseline: the same verdict files and exit codes."""
    from driftkit import german

    from pipelines.cli import main as cli

    (project / "same.txt").write_text("\n".join(pd.read_parquet(project / "data/audited/test.parquet")["text"]
                                                .str.replace("\n", " ")) + "\n", encoding="utf-8")
    (project / "other.txt").write_text("\n".join(german(20)) + "\n", encoding="utf-8")
    try:
        assert cli(["monitor", "--batch", "same.txt", "--repo", str(project), "--out", "reports/monitor"]) == 0
        assert cli(["monitor", "--batch", "other.txt", "--repo", str(project), "--out", "reports/monitor"]) == 1
        verdict = json.loads((project / "reports/monitor/verdict.json").read_text())
        assert verdict["drift"] and verdict["accuracy"] is None and "embeddings_mmd" in verdict["signals"]
        assert "other.txt: DRIFT" in capsys.readouterr().out
    finally:  # leave the workspace as dvc repro left it for the publish test
        for f in ("same.txt", "other.txt"):
            (project / f).unlink()
        shutil.rmtree(project / "reports/monitor", ignore_errors=True)
        (project / "reports/monitor_history.csv").unlink(missing_ok=True)


def test_publish_and_roll_back_a_generation_version(project):
    from domaintune.registry import rollback, versions

    v1, created = versions.publish(project, "generation v1", stage="prod")
    assert created and v1.record["base_model"] and v1.record["metrics"]["evaluate"]["task"] == "generation"
    snap = workspace(project)
    set_params(project, {"finetune.epochs": 1})
    sh(project, str(BIN / "dvc"), "repro", "-q")
    v2, created = versions.publish(project, "one epoch", stage="prod")
    assert created and v2.version != v1.version
    assert workspace(project)["models/export/model.safetensors"] != snap["models/export/model.safetensors"]
    version, checked = rollback.rollback(project, v1.version)
    assert version.version == v1.version and checked >= 4
    now = workspace(project)
    for rel in ("models/export/model.safetensors", "models/finetuned/adapter_model.safetensors", "params.yaml",
                "dvc.lock", "metrics/evaluate.json"):
        assert now[rel] == snap[rel], rel
    assert versions.served_version(project) == v1.version
