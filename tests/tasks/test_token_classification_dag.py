"""base.task token_classification through the real dvc.yaml run by real DVC on a copy of the repo (a tiny random
BERT, a slice of examples/support_entities with the three ingest params), then an NER version published, a second
one made and published, and the first rolled back, as for a classifier. Slow (real DVC, two DAG runs)."""
from __future__ import annotations

import json
import subprocess

import pytest
from _fake_pipeline import BIN, REPO, env, make_tiny_dag, set_params, sh, workspace

pytestmark = pytest.mark.slow

NER_PARAMS = {
    "base.task": "token_classification", "ingest.source": "tagged.jsonl", "ingest.id_column": "ticket_id",
    "ingest.tokens_column": "tokens", "ingest.tags_column": "tags", "ingest.spans_column": None,
    "ingest.feedback": None, "finetune.epochs": 2, "finetune.batch_size": 16, "finetune.lr": 1.0e-3,
    "base.max_length": 48, "evaluate.min_calibration_rows": 5,
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert):
    root = make_tiny_dag(tmp_path_factory.mktemp("ner_dag") / "domaintune", tiny_bert, [])
    rows = (REPO / "examples/support_entities/tagged.jsonl").read_text(encoding="utf-8").splitlines()[:150]
    (root / "tagged.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    set_params(root, NER_PARAMS)
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "token_classification task")
    proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=root, capture_output=True, text=True,
                          env={**env(), "DOMAINTUNE_PROGRESS_SECONDS": "3600"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def test_dvc_repro_trains_audits_evaluates_exports_and_profiles_a_tagger(project):
    m = {s: json.loads((project / "metrics" / f"{s}.json").read_text())
         for s in ("ingest", "audit", "finetune", "evaluate", "export", "drift")}
    assert m["ingest"]["task"] == m["audit"]["task"] == m["evaluate"]["task"] == "token_classification"
    assert "f1" in m["evaluate"]["entity"] and set(m["export"]["variants"]) == {"float32", "onnx", "onnx-int8"}
    assert m["drift"]["task"] == "token_classification"
    assert (project / "models/export/export_info.json").is_file()


def test_publish_and_roll_back_an_ner_version(project):
    from domaintune.registry import rollback, versions

    v1, created = versions.publish(project, "ner v1", stage="prod")
    assert created and v1.record["metrics"]["evaluate"]["task"] == "token_classification"
    snap = workspace(project)
    set_params(project, {"finetune.epochs": 1})
    sh(project, str(BIN / "dvc"), "repro", "-q")
    v2, created = versions.publish(project, "one epoch", stage="prod")
    assert created and v2.version != v1.version
    assert workspace(project)["models/export/model.safetensors"] != snap["models/export/model.safetensors"]
    version, checked = rollback.rollback(project, v1.version)
    assert version.version == v1.version and checked >= 4
    now = workspace(project)
    for rel in ("models/export/model.safetensors", "models/finetuned/model.safetensors", "params.yaml", "dvc.lock",
                "metrics/evaluate.json"):
        assert now[rel] == snap[rel], rel
    assert versions.served_version(project) == v1.version
