"""base.task token_classification through every stage by the stage CLI (in process, a tiny random BERT, a slice of
examples/support_entities): every out and metric; `domaintune predict` writes entities; the float32 export loads
in transformers' pipeline in a process that cannot import domaintune and gives the Predictor's entities; `serve`
answers /predict and KServe v2 with entity lists on 127.0.0.1."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from domaintune.export.artifacts import verify_checksums
from domaintune.tasks import export_task, load_predictor
from stages import audit, dapt, dedupe, drift, evaluate, export, finetune, ingest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "support_entities"
TEXTS = ["Order INV-12345 for Ledgerly Pro was charged twice on 3 May .",
         "Thanks Tom Becker , the Receipt Scanner issue is fixed .", "I cannot log in since 2026-03-04 ."]


@pytest.fixture(scope="module")
def project(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    rows = EXAMPLE.joinpath("tagged.jsonl").read_text(encoding="utf-8").splitlines()[:120]
    (root / "tagged.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "corpus.txt").write_text("customer asked about the Ledgerly Pro invoice\n" * 20)
    params = yaml.safe_load((EXAMPLE / "params.token.yaml").read_text())
    params["base"]["model"] = str(tiny_bert)
    params["ingest"]["source"] = str(root / "tagged.jsonl")
    params["audit"].update(decisions=str(root / "decisions.csv"), folds=2)
    params["dapt"].update(enabled=True, corpus=[str(root / "corpus.txt")], max_steps=2, block_size=32, batch_size=4,
                          head_warmup_steps=0)
    params["finetune"].update(epochs=2, batch_size=16, lr=1.0e-3, early_stopping_patience=1)
    params["drift"]["calibration_resamples"] = 20
    # a random tiny BERT on 14 test sentences: one word is 1-2 ECE points, so the variant gates (whose failure is
    # tested below on the stage itself) would fail at random
    params["export"].update(max_accuracy_drop=100.0, max_ece_increase=100.0)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "decisions.csv").write_text("id,decision,corrected_label\n")
    p = ["--params", str(root / "params.yaml")]

    def at(*parts):
        return str(root.joinpath(*parts))
    runs = [
        (ingest, ["--source", at("tagged.jsonl"), "--out", at("data/ingested"), "--metrics", at("m/ingest.json")]),
        (dedupe, ["--in", at("data/ingested"), "--out", at("data/deduped"), "--metrics", at("m/dedupe.json")]),
        (audit, ["--in", at("data/deduped"), "--out", at("data/audited"), "--report", at("reports/audit"),
                 "--metrics", at("m/audit.json"), "--embeddings", at("data/embeddings")]),
        (dapt, ["--in", at("data/audited"), "--out", at("models/dapt"), "--metrics", at("m/dapt.json"),
                "--checkpoints", at("models/dapt_ckpt"), "--live", at("reports/dapt"), "--no-progress"]),
        (finetune, ["--in", at("data/audited"), "--encoder", at("models/dapt"), "--out", at("models/finetuned"),
                    "--metrics", at("m/finetune.json"), "--checkpoints", at("models/ckpt"),
                    "--live", at("reports/finetune"), "--no-progress"]),
        (evaluate, ["--in", at("data/audited"), "--model", at("models/finetuned"), "--out", at("reports/eval"),
                    "--metrics", at("m/evaluate.json")]),
        (export, ["--model", at("models/finetuned"), "--calibration", at("reports/eval"), "--in", at("data/audited"),
                  "--audit", at("reports/audit"), "--dapt", at("models/dapt"), "--out", at("models/export"),
                  "--metrics", at("m/export.json")]),
        (drift, ["--in", at("data/audited"), "--model", at("models/export"), "--out", at("models/drift"),
                 "--metrics", at("m/drift.json")]),
    ]
    for stage, argv in runs:
        assert stage.main(argv + p) == 0, stage.__name__
    return root


def _m(root: Path, stage: str) -> dict:
    return json.loads((root / "m" / f"{stage}.json").read_text())


def test_every_stage_writes_its_outs_and_metrics(project):
    ing, ded = _m(project, "ingest"), _m(project, "dedupe")
    assert ing["rows_read"] == 120 and ing["tag_scheme"] == "IOB2" and ing["rejected"] == 0
    tags = json.loads((project / "data/deduped/labels.json").read_text())
    assert tags == ing["tags"] and "B-product" in tags and tags[-1] == "O"  # the tag set survives dedupe
    assert ded["removed"]["exact_duplicate"] > 0  # the example repeats its slot-free templates
    au = _m(project, "audit")
    assert au["task"] == "token_classification" and au["words_scored"] > 500 and au["folds_used"] == 2
    assert (project / "reports/audit/token_issues.csv").is_file()
    assert _m(project, "dapt")["steps"] == 2
    ft = _m(project, "finetune")
    assert ft["task"] == "token_classification" and "val_entity_f1" in ft and ft["per_seed"]["42"]["steps"] > 0
    assert (project / "reports/finetune/plots/metrics/val/entity_f1.tsv").is_file()  # DVCLive curve
    ev = _m(project, "evaluate")
    assert set(ev["entity"]) >= {"f1", "precision", "recall", "per_type"} and 0 <= ev["token_accuracy"] <= 1
    cal = ev["calibration"]
    assert cal["temperature"] > 0 and cal["ece_after"] <= cal["ece_before"] + 0.05
    assert {p.name for p in (project / "reports/eval/errors").iterdir()} == {"missed.csv", "invented.csv",
                                                                            "mistyped.csv"}
    ex = _m(project, "export")
    assert set(ex["variants"]) == {"float32", "onnx", "onnx-int8"} and ex["pipeline_check"]["loaded"]
    out = project / "models/export"
    assert export_task(out) == "token_classification" and verify_checksums(out) > 5
    assert not list(out.rglob("*.bin")) and "token-classification" in (out / "README.md").read_text()
    dr = _m(project, "drift")
    assert dr["task"] == "token_classification" and dr["reference_accuracy"] is None
    assert dr["reference_expected_accuracy"] is None


def test_the_gate_applies_to_entity_f1_and_writes_nothing(project, capsys):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["gate"]["min_macro_f1"] = 1.0
    (project / "gate.yaml").write_text(yaml.safe_dump(params))
    rc = evaluate.main(["--in", str(project / "data/audited"), "--model", str(project / "models/finetuned"),
                        "--out", str(project / "gated"), "--metrics", str(project / "gated.json"),
                        "--params", str(project / "gate.yaml")])
    assert rc == 2 and "entity F1" in capsys.readouterr().err and not (project / "gated").exists()


def test_export_gates_hold_variants_to_float32_entity_f1_and_ece():
    from types import SimpleNamespace

    from domaintune.core.errors import StageError
    from domaintune.export.tokens import check_gates, gate_failures

    p = SimpleNamespace(max_accuracy_drop=0.5, max_ece_increase=1.0)
    ref = {"entity_f1": 0.60, "ece": 0.020, "support": 1000, "words": 20000}
    ok = {"float32": ref, "onnx-int8": {**ref, "entity_f1": 0.596, "ece": 0.029}}
    assert check_gates(ok, p) == {"max_entity_f1_drop_points": 0.5, "max_ece_increase_points": 1.0}
    with pytest.raises(StageError, match="variant onnx-int8: entity F1 0.5900 is 1.00 points below"):
        check_gates({"float32": ref, "onnx-int8": {**ref, "entity_f1": 0.59}}, p)
    with pytest.raises(StageError, match="word ECE 0.0350 is 1.50 points above"):
        check_gates({"float32": ref, "onnx-int8": {**ref, "ece": 0.035}}, p)
    g, refused = gate_failures({"float32": ref, "onnx": ok["onnx-int8"], "onnx-int8": {**ref, "entity_f1": 0.58}}, p)
    assert list(refused) == ["onnx-int8"] and "2.00 points below" in refused["onnx-int8"]
    small = {**ref, "support": 50}  # one of 50 test entities is 2 points: the allowance never goes below it
    assert check_gates({"float32": small, "onnx": {**small, "entity_f1": 0.581}}, p)["max_entity_f1_drop_points"] == 2


def test_predict_cli_writes_entities_per_row(project, capsys):
    from pipelines.cli import main as cli

    src = project / "texts.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "text": TEXTS}).to_csv(src, index=False)
    assert cli(["predict", str(src), "--model", str(project / "models/export"), "--id-column", "id",
                "--out", str(project / "entities.jsonl")]) == 0
    rows = [json.loads(line) for line in (project / "entities.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    for r in rows:
        for e in r["entities"]:
            assert set(e) == {"start", "end", "text", "label", "score"} and r["text"][e["start"]:e["end"]] == e["text"]
            assert 0 < e["score"] <= 1
    onnx = load_predictor(project / "models/export", variant="onnx")
    assert [[(e["start"], e["end"], e["label"]) for e in ents] for ents in onnx.entities(TEXTS)] == \
        [[(e["start"], e["end"], e["label"]) for e in r["entities"]] for r in rows]


PIPELINE = """
import json, sys

class NoDomaintune:  # python -I drops PYTHONPATH and the cwd; the venv's editable install is blocked here
    def find_spec(self, name, path=None, target=None):
        if name == "domaintune" or name.startswith("domaintune."):
            raise ImportError("domaintune is not importable in this process")
        return None

sys.meta_path.insert(0, NoDomaintune())
from transformers import pipeline
folder, texts = sys.argv[1], json.loads(sys.argv[2])
first = pipeline("token-classification", model=folder, aggregation_strategy="first", device="cpu")
simple = pipeline("token-classification", model=folder, aggregation_strategy="simple", device="cpu")
try:
    import domaintune  # noqa: F401
    raise SystemExit("domaintune was importable")
except ImportError:
    pass
print(json.dumps({"first": [[[int(e["start"]), int(e["end"]), e["entity_group"]] for e in first(t)] for t in texts],
                  "labels": simple.model.config.id2label, "simple": [len(simple(t)) >= 0 for t in texts],
                  "domaintune": "domaintune" in sys.modules}))
"""


def test_pipeline_loads_the_export_without_domaintune_and_finds_the_predictors_entities(project, tmp_path):
    (tmp_path / "check.py").write_text(PIPELINE)
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "check.py"), str(project / "models/export"),
                           json.dumps(TEXTS)], capture_output=True, text=True, cwd=tmp_path,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["domaintune"] is False
    tags = json.loads((project / "data/audited/labels.json").read_text())
    assert sorted(got["labels"].values()) == sorted(tags)
    predictor = load_predictor(project / "models/export")
    mine = [[[e["start"], e["end"], e["label"]] for e in ents] for ents in predictor.entities(TEXTS)]
    assert got["first"] == mine


def test_serve_answers_predict_and_v2_with_entity_lists(project):
    from domaintune.serve.app import build
    from domaintune.serve.settings import ServeSettings
    from pipelines.serve import ServerThread

    s = ServeSettings(model_dir=project / "models/export", port=0, poll_s=0.2, max_wait_ms=2.0, max_texts=4)
    expected = load_predictor(project / "models/export").entities(TEXTS)
    with ServerThread(build(s).app, s) as url:
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/predict", json={"texts": TEXTS, "ids": ["a", "b", "c"]})
            assert r.status_code == 200 and [p["entities"] for p in r.json()["predictions"]] == expected
            v2 = c.post("/v2/models/domaintune/infer",
                        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": TEXTS}]})
            assert v2.status_code == 200
            out = v2.json()["outputs"][0]
            assert out["name"] == "entities" and [json.loads(x) for x in out["data"]] == expected
            meta = c.get("/v2/models/domaintune").json()
            assert meta["parameters"]["task"] == "token_classification"
            assert c.post("/predict", json={"texts": TEXTS * 2}).status_code == 413  # the same limits


def test_monitor_judges_a_batch_against_the_tagger_baseline(project, capsys):
    """`domaintune monitor`: entity-type mix and confidence as drift signals, no accuracy line for a tagger."""
    from pipelines.cli import main as cli

    batch = project / "same.txt"
    batch.write_text("\n".join(pd.read_parquet(project / "data/audited/test.parquet")["text"]) + "\n")
    rc = cli(["monitor", "--batch", str(batch), "--baseline", str(project / "models/drift"),
              "--model", str(project / "models/export"), "--out", str(project / "reports/monitor"),
              "--history", str(project / "reports/history.csv"), "--review-queue", str(project / "reports/q.csv"),
              "--repo", str(project)])
    assert rc in (0, 1), capsys.readouterr()
    verdict = json.loads((project / "reports/monitor/verdict.json").read_text())
    assert verdict["accuracy"] is None and "pred_label" in verdict["signals"] and "confidence" in verdict["signals"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_saved_token_classification_model_computes_the_trained_taggers_logits(tiny_bert, method):
    """to_token_classification copies the tagger (a LoRA encoder merged in) into AutoModelForTokenClassification."""
    import dataclasses

    import torch

    from domaintune.core.params import FinetuneParams
    from domaintune.modeling.tagger import build_tagger, to_token_classification
    from domaintune.train.classifier import _apply_method

    tags = ["B-x", "I-x", "O"]
    tagger, tok = build_tagger(str(tiny_bert), len(tags))
    _apply_method(tagger, dataclasses.replace(FinetuneParams(), method=method, lora_dropout=0.0), 0)
    with torch.no_grad():
        for name, p in tagger.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter is not the identity
    tagger.eval()
    enc = tok(["Order INV-1 for Ledgerly Pro", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = tagger(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        model = to_token_classification(tagger, tags)
        got = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert model.config.id2label == {0: "B-x", 1: "I-x", 2: "O"}
    assert torch.allclose(got, want, atol=1e-5)
