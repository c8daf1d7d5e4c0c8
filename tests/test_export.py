"""export stage: merged == unmerged, a standalone folder, int8 close to float, calibrated predict, model card."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import yaml

from domaintune.data import read_dataset, read_json, write_json
from evalkit import LABELS, make_dataset, make_model, write_params
from stages import evaluate as ev
from stages import export as ex


def test_quantize_tensor_error_bound():
    import torch

    from domaintune.quantize import dequantize_tensor, quantize_tensor

    w = torch.tensor([[0.5, -1.27, 0.003], [0.0, 0.0, 0.0], [100.0, -50.0, 25.0]])
    q, s = quantize_tensor(w)
    assert q.dtype == torch.int8 and s.shape == (3,)
    assert s[0].item() == pytest.approx(1.27 / 127) and q[0, 1].item() == -127
    assert q[2].tolist() == [127, -64, 32]  # -63.5 rounds half to even; scale is per row
    err = (dequantize_tensor(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
    assert (dequantize_tensor(q, s)[1] == 0).all()


@pytest.fixture(scope="module")
def exported(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = root / "base_encoder"  # deleted after export: the export must not need it
    shutil.copytree(tiny_bert, base)
    make_dataset(root / "data", n_val=10, n_test=8)
    model = make_model(base, root / "models/finetuned", lora=True, seed=3)
    params = write_params(root / "params.yaml", export={"latency_repeats": 1, "latency_single_texts": 2})
    assert ev.main(["--in", str(root / "data"), "--model", str(model), "--out", str(root / "reports/eval"),
                    "--metrics", str(root / "metrics/evaluate.json"), "--params", str(params)]) == 0
    write_json(root / "reports/audit/summary.json", {
        "flag_rule": "cleanlab find_label_issues", "params": {"action": "drop"},
        "metrics": {"issues_found": 7, "rows_acted_on": {"dropped": 5, "relabelled": 0}}})
    # Reference logits of the unmerged LoRA model, computed independently of the stage.
    from domaintune.modeling import load_classifier, predict_logits

    splits, _ = read_dataset(root / "data")
    m, tok, meta = load_classifier(model)
    ref = predict_logits(m, tok, splits["test"]["text"].tolist(), 64, meta["max_length"])
    rc = ex.main(["--model", str(model), "--calibration", str(root / "reports/eval"), "--in", str(root / "data"),
                  "--audit", str(root / "reports/audit"), "--out", str(root / "models/export"),
                  "--metrics", str(root / "metrics/export.json"), "--params", str(params)])
    assert rc == 0
    shutil.rmtree(base)
    return root, ref, splits["test"]


def test_export_is_standalone_and_equals_unmerged(exported):
    from domaintune.modeling import load_classifier, predict_logits

    root, ref, test = exported
    out = root / "models/export"
    meta = read_json(out / "model.json")
    assert meta["adapter"] is None and meta["merged_adapter"] is True and meta["base_encoder"] is None
    assert not (out / "adapter").exists() and (out / "encoder" / "model.safetensors").exists()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))
    model, tok, meta = load_classifier(out)  # the base encoder folder is gone: this must not need it
    logits = predict_logits(model, tok, test["text"].tolist(), 64, meta["max_length"])
    assert np.abs(logits - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(ref).max() > 0.1  # the adapter and head are non-trivial, so the comparison means something
    metrics = json.loads((root / "metrics/export.json").read_text())
    mc = metrics["merge_check"]
    assert mc["had_adapter"] and mc["max_abs_diff"] < 1e-4 and mc["texts"] == len(test) == 24
    assert mc["argmax_agreement"] == 1.0


def test_int8_variant_close_to_float_and_smaller(exported):
    from safetensors import safe_open

    from domaintune.predict import Predictor

    root, ref, test = exported
    out = root / "models/export"
    with safe_open(str(out / "int8/encoder/model.int8.safetensors"), framework="pt") as f:
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    q = [k for k in dtypes if k.endswith("query.weight")]
    assert q and all(dtypes[k] == "I8" for k in q)
    assert dtypes["embeddings.word_embeddings.weight"] == "I8"
    texts = test["text"].tolist()
    fl = Predictor.load(out).logits(texts)
    i8 = Predictor.load(out, variant="int8").logits(texts)
    assert np.abs(fl - i8).max() < 0.02 * max(1.0, np.abs(fl).max())
    m = json.loads((root / "metrics/export.json").read_text())
    assert m["int8_size_ratio"] < 0.4
    assert m["int8_vs_float32"]["max_abs_diff"] == pytest.approx(np.abs(fl - i8).max(), rel=1e-3, abs=1e-6)
    for v in ("unmerged", "float32", "int8"):
        row = m["variants"][v]
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1 and row["batched_ms_per_text"] > 0
    assert m["variants"]["float32"]["accuracy"] == m["variants"]["unmerged"]["accuracy"]


def test_predict_returns_calibrated_probabilities(exported):
    from domaintune.calibration import softmax
    from domaintune.predict import Predictor

    root, ref, test = exported
    T = read_json(root / "reports/eval/calibration.json")["temperature"]
    p = Predictor.load(root / "models/export")
    assert p.temperature == pytest.approx(T) and p.labels == LABELS
    texts = test["text"].tolist()[:5]
    probs = p.predict_proba(texts)
    np.testing.assert_allclose(probs, softmax(ref[:5], T), atol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert p.predict(texts) == [LABELS[i] for i in ref[:5].argmax(1)]


def test_model_card_metadata_and_runnable_snippet(exported, monkeypatch):
    root, _, test = exported
    card = (root / "models/export/README.md").read_text()
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, "README.md must start with YAML front matter"
    front = yaml.safe_load(m.group(1))
    hashes = read_json(root / "data/hashes.json")
    dt = front["domaintune"]
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert front["pipeline_tag"] == "text-classification"
    assert dt["dataset_hash"] == hashes["dataset"] and dt["split_hashes"]["test"] == hashes["test"]
    assert dt["split_sizes"] == {"train": 15, "validation": 30, "test": 24}
    assert dt["method"] == "lora" and dt["labels"] == LABELS
    assert dt["temperature"] == pytest.approx(read_json(root / "reports/eval/calibration.json")["temperature"])
    ev_after = read_json(root / "metrics/evaluate.json")["after"]
    mets = {x["type"]: x["value"] for x in front["model-index"][0]["results"][0]["metrics"]}
    assert mets["accuracy"] == round(ev_after["accuracy"], 4) and mets["ece"] == round(ev_after["ece"], 4)
    for section in ("## Training data", "## Label audit", "## Evaluation (test split)", "## Variants",
                    "## Intended use", "## Limitations", "## How to load"):
        assert section in card
    assert "Issues found: 7" in card
    # The how-to-load snippet runs as written (from the folder that holds models/export).
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(root)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102
    assert ns["logits"].shape == (1, len(LABELS))


def test_calibration_for_another_model_is_rejected(exported, tmp_path, capsys):
    root, _, _ = exported
    shutil.copytree(root / "reports/eval", tmp_path / "eval")
    calib = read_json(tmp_path / "eval/calibration.json")
    calib["labels"] = ["a", "b", "c"]
    write_json(tmp_path / "eval/calibration.json", calib)
    rc = ex.main(["--model", str(root / "models/export"), "--calibration", str(tmp_path / "eval"),
                  "--in", str(root / "data"), "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"),
                  "--params", str(root / "params.yaml")])
    assert rc == 2 and not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
    assert "calibration.json: field 'labels'" in capsys.readouterr().err


def test_missing_audit_summary_is_an_error(exported, tmp_path, capsys):
    root, _, _ = exported
    rc = ex.main(["--model", str(root / "models/export"), "--calibration", str(root / "reports/eval"),
                  "--in", str(root / "data"), "--audit", str(tmp_path / "noaudit"), "--out", str(tmp_path / "out"),
                  "--metrics", str(tmp_path / "m.json"), "--params", str(root / "params.yaml")])
    assert rc == 2 and not (tmp_path / "out").exists()
    assert "summary.json" in capsys.readouterr().err


def test_export_of_a_full_finetune_has_nothing_to_merge(tiny_bert, tmp_path):
    make_dataset(tmp_path / "data", n_val=10, n_test=4)
    model = make_model(tiny_bert, tmp_path / "ft", lora=False, seed=5)
    params = write_params(tmp_path / "params.yaml", export={"latency_repeats": 1, "latency_single_texts": 0})
    # A hand-written calibration (no evaluate run needed for this check).
    write_json(tmp_path / "eval/calibration.json", {"problem_type": "single_label", "method": "temperature",
                                                    "temperature": 1.5, "labels": LABELS})
    write_json(tmp_path / "eval/metrics.json", {"before": {}, "after": {}})
    assert ex.main(["--model", str(model), "--calibration", str(tmp_path / "eval"), "--in", str(tmp_path / "data"),
                    "--out", str(tmp_path / "export"), "--metrics", str(tmp_path / "x.json"),
                    "--params", str(params)]) == 0
    m = json.loads((tmp_path / "x.json").read_text())
    assert m["merge_check"]["had_adapter"] is False and m["merge_check"]["max_abs_diff"] == 0.0
    card = (tmp_path / "export/README.md").read_text()
    assert "No label-audit summary was given" in card and "LoRA adapter merged" not in card
    assert read_json(tmp_path / "export/model.json")["temperature"] == 1.5
