"""export stage: merged == unmerged, a standalone folder, every variant verified and gated, calibrated predict,
the model card; ONNX served without domaintune (tests/export/test_onnx.py), nothing loads a random head."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import yaml
from evalkit import LABELS, make_dataset, make_model, write_params

from domaintune.core.io import OUTPUT_MARKER, read_json, write_json
from domaintune.data.dataset import read_dataset
from domaintune.export import classifier as ex_lib
from stages import evaluate as ev
from stages import export as ex


def test_quantize_tensor_error_bound():
    import torch

    from domaintune.modeling.quantize import dequantize_tensor, quantize_tensor

    w = torch.tensor([[0.5, -1.27, 0.003], [0.0, 0.0, 0.0], [100.0, -50.0, 25.0]])
    q, s = quantize_tensor(w)
    assert q.dtype == torch.int8 and s.shape == (3,)
    assert s[0].item() == pytest.approx(1.27 / 127) and q[0, 1].item() == -127
    assert q[2].tolist() == [127, -64, 32]  # -63.5 rounds half to even; scale is per row
    err = (dequantize_tensor(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
    assert (dequantize_tensor(q, s)[1] == 0).all()


DAPT_INFO = {"base_model": "minilm", "params": {"block_size": 64, "batch_size": 16, "lr": 5e-5, "mlm_probability": 0.15},
             "corpus": {"files": ["examples/support_tickets/unlabelled.txt"], "used": 1234, "removed": 17},
             "metrics": {"enabled": True, "steps": 100, "epochs": 0.9, "train_blocks": 1600,
                         "perplexity_before": 874.31, "perplexity_after": 354.27, "heldout_texts": 120,
                         "seconds": 212.4}}


@pytest.fixture(scope="module")
def exported(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = root / "base_encoder"  # deleted after export: the export must not need it
    shutil.copytree(tiny_bert, base)
    make_dataset(root / "data", n_val=10, n_test=8)
    model = make_model(base, root / "models/finetuned", lora=True, seed=3)
    # A random tiny model: one flipped test row is 4 points, so the gates are tested on their own (below).
    params = write_params(root / "params.yaml", export={"latency_repeats": 1, "latency_single_texts": 2,
                                                        "max_accuracy_drop": 100.0, "max_ece_increase": 100.0,
                                                        "variants": ["float32", "int8", "onnx", "onnx-int8"]})
    assert ev.main(["--in", str(root / "data"), "--model", str(model), "--out", str(root / "reports/eval"),
                    "--metrics", str(root / "metrics/evaluate.json"), "--params", str(params)]) == 0
    write_json(root / "reports/audit/summary.json", {
        "flag_rule": "cleanlab find_label_issues", "params": {"action": "drop"},
        "metrics": {"issues_found": 7, "rows_acted_on": {"dropped": 5, "relabelled": 0}}})
    write_json(root / "models/dapt/dapt_info.json", DAPT_INFO)
    # Reference logits of the unmerged LoRA model, computed independently of the stage.
    from domaintune.modeling.encoders import load_classifier, predict_logits

    splits, _ = read_dataset(root / "data")
    m, tok, meta = load_classifier(model)
    ref = predict_logits(m, tok, splits["test"]["text"].tolist(), 64, meta["max_length"])
    rc = ex.main(["--model", str(model), "--calibration", str(root / "reports/eval"), "--in", str(root / "data"),
                  "--audit", str(root / "reports/audit"), "--dapt", str(root / "models/dapt"),
                  "--out", str(root / "models/export"),
                  "--metrics", str(root / "metrics/export.json"), "--params", str(params)])
    assert rc == 0
    shutil.rmtree(base)
    return root, ref, splits["test"]


def test_export_is_standalone_and_equals_unmerged(exported):
    from domaintune.modeling.encoders import load_classifier, predict_logits

    root, ref, test = exported
    out = root / "models/export"
    meta = read_json(out / "model.json")
    assert meta["adapter"] is None and meta["merged_adapter"] is True and meta["base_encoder"] is None
    assert not (out / "adapter").exists() and (out / "encoder" / "encoder.safetensors").exists()
    assert not (out / "encoder" / "model.safetensors").exists()  # see test_no_transformers_class_loads_a_random_head
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

    from domaintune.predict.predictor import Predictor

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
    for v in ("unmerged", "float32", "int8", "onnx", "onnx-int8"):
        row = m["variants"][v]
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1 and row["batched_ms_per_text"] > 0
        assert row["single_text_p50_ms"] > 0
    assert m["variants"]["float32"]["accuracy"] == m["variants"]["unmerged"]["accuracy"]
    for v in ("int8", "onnx", "onnx-int8"):
        row = m["variants"][v]
        assert 0 < row["size_bytes"] and 0 <= row["agreement_with_float32"] <= 1
    assert m["variants"]["onnx"]["agreement_with_float32"] == 1.0
    assert m["variants"]["onnx"]["max_abs_logit_diff_vs_float32"] < 1e-3
    assert m["variants"]["onnx-int8"]["size_bytes"] < 0.5 * m["variants"]["onnx"]["size_bytes"]


def test_predict_returns_calibrated_probabilities(exported):
    from domaintune.evaluate.calibration import softmax
    from domaintune.predict.predictor import Predictor

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
    assert front["license"] == "apache-2.0" and front["language"] == ["en"]
    assert front["datasets"] == [f"custom-dataset-sha256-{hashes['dataset'][:12]}"]
    assert dt["dataset_hash"] == hashes["dataset"] and dt["split_hashes"]["test"] == hashes["test"]
    assert dt["split_sizes"] == {"train": 15, "validation": 30, "test": 24}
    assert dt["method"] == "lora" and dt["labels"] == LABELS
    assert dt["temperature"] == pytest.approx(read_json(root / "reports/eval/calibration.json")["temperature"])
    ev_after = read_json(root / "metrics/evaluate.json")["after"]
    mets = {x["type"]: x["value"] for x in front["model-index"][0]["results"][0]["metrics"]}
    assert mets["accuracy"] == round(ev_after["accuracy"], 4) and mets["ece"] == round(ev_after["ece"], 4)
    assert mets["f1"] == round(ev_after["macro_f1"], 4) and set(front["metrics"]) >= {"accuracy", "f1"}
    for section in ("## Training data", "## Training procedure", "### Domain-adaptive pre-training (DAPT)",
                    "### Fine-tuning", "### Environment", "## Evaluation (test split)", "### Per class",
                    "## Variants", "## How to use", "## Promotion", "## Intended use", "## Limitations"):
        assert section in card
    # The DAPT section is read from models/dapt/dapt_info.json, rounded for people.
    assert "874.3 before, 354.3 after" in card and "`examples/support_tickets/unlabelled.txt`" in card
    assert "Steps: 100" in card and "Time: 212 s" in card
    assert "Issues found: 7" in card and "{'" not in card  # no dict reprs in the prose
    per_class = read_json(root / "metrics/evaluate.json")  # every class has its own row
    assert all(f"| {lab} " in card for lab in LABELS) and per_class
    assert "faster" not in card  # no speed claim that no bench checks
    for v in ("float32", "int8", "onnx", "onnx-int8"):
        assert f'variant="{v}"' in card
    # The domaintune snippet runs as written (from the folder that holds models/export).
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(root)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102
    auto = read_json(root / "metrics/export.json")["speed"]["auto"]["variant"]
    assert ns["probs"].shape == (1, len(LABELS)) and ns["p"].variant == auto  # variant="auto": the recorded pick


def test_card_without_dapt_summary_says_so(exported):
    from domaintune.export.modelcard import dapt_section

    assert "No DAPT summary" in "\n".join(dapt_section(None))
    off = "\n".join(dapt_section({"metrics": {"enabled": False, "steps": 0}, "pass_through": "copied"}))
    assert "DAPT was off" in off


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


def test_no_transformers_class_loads_a_random_head(exported):
    """The export is not a transformers classifier folder, so transformers must refuse it loudly
    (today's trap: the bare encoder loaded with a fresh random 2-class head)."""
    from transformers import AutoModelForSequenceClassification, pipeline

    root, _, _ = exported
    out = root / "models/export"
    for folder in (out, out / "encoder", out / "int8" / "encoder", out / "onnx", out / "onnx-int8"):
        with pytest.raises((OSError, ValueError)):
            AutoModelForSequenceClassification.from_pretrained(str(folder))
    with pytest.raises((OSError, ValueError)):
        pipeline("text-classification", model=str(out))


def test_variant_names_and_missing_variants(exported, tmp_path):
    from domaintune.core.errors import DataError
    from domaintune.predict.predictor import Predictor

    root, _, test = exported
    out = root / "models/export"
    texts = test["text"].tolist()[:4]
    assert Predictor.load(out, variant="float").variant == "float32"  # the old name still works
    np.testing.assert_allclose(Predictor.load(out, variant="onnx").predict_proba(texts),
                               Predictor.load(out).predict_proba(texts), atol=1e-5)
    with pytest.raises(ValueError, match="unknown variant 'fp16'"):
        Predictor.load(out, variant="fp16")
    shutil.copytree(out, tmp_path / "e", ignore=shutil.ignore_patterns("onnx-int8"))
    with pytest.raises(DataError, match="variant 'onnx-int8' not found"):
        Predictor.load(tmp_path / "e", variant="onnx-int8")


def _relabelled_by_float32(root, dest):
    """The fixture's data with test labels set to the float32 export's own predictions (float32 accuracy 1.0)."""
    from domaintune.data.dataset import write_dataset
    from domaintune.predict.predictor import Predictor

    splits, labels = read_dataset(root / "data")
    splits["test"] = splits["test"].assign(label=Predictor.load(root / "models/export").predict(
        splits["test"]["text"].tolist()))
    write_dataset(dest, splits, labels)
    return dest


def test_a_variant_that_loses_accuracy_is_refused_and_not_shipped(exported, tmp_path, monkeypatch, caplog):
    """A broken int8 (head sign flipped) is past export.max_accuracy_drop: refused, its folder not shipped, the
    refusal recorded; float32 ships (before: the stage failed and wrote nothing)."""
    from safetensors.torch import load_file, save_file

    from domaintune.export import artifacts

    root, _, _ = exported
    data = _relabelled_by_float32(root, tmp_path / "data")
    params = write_params(tmp_path / "params.yaml", export={"latency_repeats": 1, "latency_single_texts": 0,
                                                            "variants": ["float32", "int8"]})
    write_int8 = artifacts.write_int8

    def broken_int8(out, model, meta, embeddings):  # a broken int8 writer: the head's sign flipped,
        info = write_int8(out, model, meta, embeddings)  # so int8 predicts float32's least likely class
        head = out / "int8" / "head.safetensors"
        save_file({k: -v for k, v in load_file(str(head)).items()}, str(head))
        return info

    monkeypatch.setattr(artifacts, "write_int8", broken_int8)
    argv = ["--model", str(root / "models/export"), "--calibration", str(root / "reports/eval"), "--in", str(data),
            "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"), "--params", str(params)]
    with caplog.at_level("WARNING"):
        assert ex.main(argv) == 0
    warned = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(warned) == 1 and "variant int8 refused" in warned[0] and "export.max_accuracy_drop 0.5" in warned[0]
    assert (tmp_path / "out/model.json").is_file() and not (tmp_path / "out/int8").exists()
    assert "accuracy" in read_json(tmp_path / "m.json")["variants_refused"]["int8"]["why"]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_ece_gate_and_variant_subset(exported, tmp_path, capsys):
    root, _, _ = exported
    data = _relabelled_by_float32(root, tmp_path / "data")
    base = ["--model", str(root / "models/export"), "--calibration", str(root / "reports/eval"), "--in", str(data),
            "--params"]
    ok = write_params(tmp_path / "ok.yaml", export={"latency_repeats": 1, "latency_single_texts": 0,
                                                    "variants": ["float32", "onnx-int8"], "max_accuracy_drop": 100.0,
                                                    "max_ece_increase": 100.0})
    assert ex.main(base + [str(ok), "--out", str(tmp_path / "a"), "--metrics", str(tmp_path / "a.json")]) == 0
    written = sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_dir())
    assert written == ["encoder", "onnx-int8", "tokenizer"]  # onnx/ was only the step to onnx-int8
    m = json.loads((tmp_path / "a.json").read_text())
    assert set(m["variants"]) == {"float32", "onnx-int8", "unmerged"}
    assert read_json(tmp_path / "a/model.json")["variants"] == ["float32", "onnx-int8"]


def test_openvino_int8_is_written_calibrated_and_passes_the_default_gates(exported, tmp_path, capsys):
    """export.variants [float32, openvino-int8] with the shipped gates (0.5 points of accuracy, 1 of ECE, floored
    at one test row): the stage writes openvino-int8/ calibrated on export.calibration_rows train texts drawn with
    base.seed, reloads and re-scores it like every variant, and the card offers its no-domaintune snippet."""
    from domaintune.export.artifacts import calibration_texts
    from domaintune.predict.predictor import Predictor

    root, _, _ = exported
    data = _relabelled_by_float32(root, tmp_path / "data")
    params = write_params(tmp_path / "params.yaml", base={"seed": 13},
                          export={"latency_repeats": 1, "latency_single_texts": 0, "calibration_rows": 7,
                                  "variants": ["float32", "openvino-int8"]})
    argv = ["--model", str(root / "models/export"), "--calibration", str(root / "reports/eval"), "--in", str(data),
            "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"), "--params", str(params)]
    assert ex.main(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert "Statistics collection" not in err and "━" not in err  # NNCF's progress bars stay off the stage's output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["encoder", "openvino-int8", "tokenizer"]
    m = json.loads((tmp_path / "m.json").read_text())
    v = m["variants"]["openvino-int8"]
    assert v["size_bytes"] > 0 and v["batched_ms_per_text"] > 0 and "agreement_with_float32" in v
    assert 100 * (m["variants"]["float32"]["accuracy"] - v["accuracy"]) <= m["gates"]["accuracy_points"]
    q = json.loads((out / "openvino-int8/config.json").read_text())["domaintune"]["quantization"]
    splits, _ = read_dataset(data)
    assert q["calibration"] == {"split": "train", "rows": 7, "seed": 13}
    assert len(calibration_texts(splits["train"]["text"].tolist(), 7, 13)) == 7
    card = (out / "README.md").read_text()
    assert "import openvino as ov" in card and "`openvino-int8/` OpenVINO IR" in card
    front = yaml.safe_load(card.split("---")[1])
    assert "openvino" in front["tags"] and "openvino-int8" in front["domaintune"]["variants"]
    texts = splits["test"]["text"].tolist()
    assert Predictor.load(out, variant="openvino-int8").predict(texts) == Predictor.load(out).predict(texts)


def test_openvino_int8_without_train_texts_is_one_clear_error(exported, tmp_path, capsys):
    from domaintune.data.dataset import write_dataset

    root, _, _ = exported
    splits, labels = read_dataset(root / "data")
    splits["train"] = splits["train"].iloc[:0]
    write_dataset(tmp_path / "data", splits, labels)
    params = write_params(tmp_path / "params.yaml", export={"latency_repeats": 1, "latency_single_texts": 0,
                                                            "variants": ["float32", "openvino-int8"]})
    argv = ["--model", str(root / "models/export"), "--calibration", str(root / "reports/eval"), "--in",
            str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"),
            "--params", str(params)]
    assert ex.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.parquet" in err[0] and "openvino-int8 is calibrated on train texts" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_a_variant_that_loses_calibration_is_refused_and_float32_ships(exported, tmp_path, monkeypatch, caplog):
    """An int8 writer whose head is scaled by 0.1 keeps every argmax (same accuracy) but is far less
    confident than it is right: its ECE rise is far above both export.max_ece_increase and the floor of
    one row moving between two bins (2 of the 24 test rows), so int8 is refused: its folder is not shipped,
    the refusal and its numbers are recorded, the card says so, and float32 ships (before: the stage failed,
    so one noisy int8 graph stopped `dvc repro`)."""
    from safetensors.torch import load_file, save_file

    from domaintune.export import artifacts

    root, _, _ = exported
    data = _relabelled_by_float32(root, tmp_path / "data")
    params = write_params(tmp_path / "params.yaml", export={"latency_repeats": 1, "latency_single_texts": 0,
                                                            "variants": ["float32", "int8"]})
    write_int8 = artifacts.write_int8

    def underconfident_int8(out, model, meta, embeddings):
        info = write_int8(out, model, meta, embeddings)
        head = out / "int8" / "head.safetensors"
        save_file({k: 0.1 * v for k, v in load_file(str(head)).items()}, str(head))
        return info

    monkeypatch.setattr(artifacts, "write_int8", underconfident_int8)
    argv = ["--model", str(root / "models/export"), "--calibration", str(root / "reports/eval"), "--in", str(data),
            "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"), "--params", str(params)]
    with caplog.at_level("WARNING"):
        assert ex.main(argv) == 0
    warned = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(warned) == 1 and "variant int8 refused" in warned[0] and "export.max_ece_increase 1" in warned[0]
    out = tmp_path / "out"
    assert (out / "model.json").is_file() and not (out / "int8").exists()
    m = read_json(tmp_path / "m.json")
    assert set(m["variants_refused"]) == {"int8"} and "int8" not in m["variants"]
    assert "ECE" in m["variants_refused"]["int8"]["why"] and m["variants_refused"]["int8"]["ece"] > 0
    assert m["speed"]["variants"]["int8"]["passed_gates"] is False and m["speed"]["auto"]["variant"] != "int8"
    assert "Not shipped (past their gates" in (out / "README.md").read_text()
    assert read_json(out / "export_report.json")["variants_refused"] == m["variants_refused"]


def test_a_pickled_lora_adapter_is_refused(tiny_bert, tmp_path):
    from domaintune.core.errors import DataError
    from domaintune.modeling.encoders import load_classifier

    model = make_model(tiny_bert, tmp_path / "ft", lora=True, seed=1)
    st = model / "adapter" / "adapter_model.safetensors"
    st.rename(model / "adapter" / "adapter_model.bin")  # what an old peft save looks like (a pickle)
    with pytest.raises(DataError, match=r"adapter_model.safetensors: missing \(found adapter_model.bin: pickle"):
        load_classifier(model)


def test_the_accuracy_gate_never_fails_on_a_single_test_row():
    """On the example's 177 test rows one flipped prediction is 0.56 points, above the 0.5-point default:
    the allowance is at least one row, so one flip passes and two fail, naming both numbers."""
    from types import SimpleNamespace

    from domaintune.core.errors import StageError

    params = SimpleNamespace(max_accuracy_drop=0.5, max_ece_increase=1.0)
    ref = {"accuracy": 168 / 177, "ece": 0.07}
    ex_lib.check_gates({"float32": ref, "onnx-int8": {"accuracy": 167 / 177, "ece": 0.07}}, params, 177)
    with pytest.raises(StageError, match=r"variant onnx-int8: accuracy 0\.9379 is 1\.13 points below .*"
                                         r"export\.max_accuracy_drop 0\.5; one of the 177 test rows is 0\.56 points"):
        ex_lib.check_gates({"float32": ref, "onnx-int8": {"accuracy": 166 / 177, "ece": 0.07}}, params, 177)
    # ECE: one row moving between two bins (1.13 points of 177 rows) passes, more fails.
    ex_lib.check_gates({"float32": ref, "onnx": {"accuracy": ref["accuracy"], "ece": 0.0801}}, params, 177)
    with pytest.raises(StageError, match=r"variant onnx: ECE 0\.0900 is 2\.00 points above"):
        ex_lib.check_gates({"float32": ref, "onnx": {"accuracy": ref["accuracy"], "ece": 0.09}}, params, 177)
    # On a large test split the 0.5-point allowance itself applies.
    with pytest.raises(StageError):
        ex_lib.check_gates({"float32": {"accuracy": 0.95, "ece": 0.07}, "onnx": {"accuracy": 0.944, "ece": 0.07}},
                       params, 10_000)


def _predict_cli(capsys, *argv) -> tuple[int, list[str]]:
    from pipelines.cli import build_parser

    capsys.readouterr()
    args = build_parser().parse_args(["predict", *map(str, argv)])
    rc = args.fn(args)
    return rc, capsys.readouterr().err.strip().splitlines()


def test_the_export_records_checksums_and_a_changed_file_is_refused(exported, tmp_path, capsys):
    """Before: a bit-flipped model.onnx loaded and predicted garbage with exit 0."""
    import hashlib

    from domaintune.core.errors import DataError
    from domaintune.tasks import load_predictor

    root, _, test = exported
    out = root / "models/export"
    listed = read_json(out / "checksums.json")
    files = {p.relative_to(out).as_posix(): p for p in out.rglob("*")
             if p.is_file() and p.name not in ("checksums.json", OUTPUT_MARKER)}  # the marker is written after it
    assert listed["algorithm"] == "md5" and sorted(listed["files"]) == sorted(files)
    assert all(listed["files"][rel] == hashlib.md5(p.read_bytes()).hexdigest() for rel, p in files.items())
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    onnx = copy / "onnx" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    onnx.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(f"{onnx}: md5 differs from checksums.json")):
        load_predictor(copy, variant="onnx")
    src = tmp_path / "in.txt"
    src.write_text("\n".join(test["text"].tolist()[:3]) + "\n")
    rc, err = _predict_cli(capsys, src, "--model", copy, "--variant", "onnx", "--out", tmp_path / "o.jsonl")
    assert rc == 2 and len(err) == 1 and "model.onnx: md5 differs from checksums.json" in err[0], err
    assert not (tmp_path / "o.jsonl").exists()
    # Only the files a variant reads are checked; verify=False skips the check (and then loads the changed file).
    texts = test["text"].tolist()[:3]
    assert load_predictor(copy, variant="float32").predict_proba(texts).shape == (3, len(LABELS))
    assert load_predictor(copy, variant="onnx", verify=False).variant == "onnx"
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=re.escape(f"{copy / 'tokenizer/tokenizer.json'}: missing (listed in checksums.json); "
                                                  "the export stage writes it")):
        load_predictor(copy)


def test_a_missing_tokenizer_folder_says_which_stage_writes_it(exported, tmp_path, capsys):
    """Before: the model hub's "Repo id must be in the form ..." for <export>/tokenizer."""
    root, _, _ = exported
    copy = tmp_path / "export"
    shutil.copytree(root / "models/export", copy, ignore=shutil.ignore_patterns("checksums.json"))
    shutil.rmtree(copy / "tokenizer")
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    rc, err = _predict_cli(capsys, src, "--model", copy, "--variant", "float32")  # the variant that reads tokenizer/
    assert rc == 2 and err == [f"domaintune predict: error: {copy / 'tokenizer'}: missing; the export stage writes it "
                               "(`dvc repro export`), or give the export folder"]


def test_card_counts_the_best_epoch_from_one_as_the_training_log_does():
    """model.json keeps the trainer's 0-based index; the card says "2 of 2" where the log's line for that
    epoch reads "epoch 2/2 ... (best so far)"."""
    from domaintune.export.modelcard import training_section
    from domaintune.train.classifier import epoch_line

    meta = {"method": "full", "pooling": "mean", "max_length": 128, "best_epoch": 1, "seed": 42,
            "history_epochs": [{"epoch": 0}, {"epoch": 1}], "params": {"finetune": {"epochs": 2}}}
    card = "\n".join(training_section(meta, {"calib": {"method": "temperature", "temperature": 1.2}, "dapt": None}))
    assert "- Best epoch on validation macro-F1: 2 of 2 (seed 42)" in card
    log_line = epoch_line(42, meta["best_epoch"], 2, {"train_loss": 0.1, "val_macro_f1": 0.9}, best=True)
    assert "epoch 2/2" in log_line and log_line.endswith("(best so far)")


def _report(test_rows: int, ece: dict, params) -> dict:
    variants = {k: {"accuracy": 0.93, "macro_f1": 0.92, "ece": e, "size_bytes": 90_000_000, "batched_ms_per_text": 2.5,
                    "single_text_p50_ms": 9.0, "agreement_with_float32": 1.0} for k, e in ece.items()}
    return {"variants": variants, "merge_check": {"had_adapter": False},
            "gates": ex_lib.check_gates(variants, params, test_rows),
            "latency": {"batch_size": 64, "texts": test_rows, "batched_passes": 3, "single_texts": 50, "threads": 2,
                        "cpu": "AMD EPYC", "load_average_1min": 1.5}}


def test_card_states_the_gates_the_export_applies_floors_included():
    """The issue's export: 158 test rows, onnx-int8 ECE 0.0724 -> 0.0833 (+1.09 points) passed although the
    card said a variant fails above 1 point: the floor (one row moving between two bins, 1.27 points) was
    unstated. The card now states the allowance check_gates applies, and a variant just past it fails."""
    from types import SimpleNamespace

    from domaintune.core.errors import StageError
    from domaintune.export.modelcard import variants_section

    params = SimpleNamespace(max_accuracy_drop=0.5, max_ece_increase=1.0)
    report = _report(158, {"float32": 0.0724, "onnx-int8": 0.0833}, params)
    text = "\n".join(variants_section(report))
    assert "adds more than 1.27 points of ECE (export.max_ece_increase 1, but at least one row moving" in text
    assert "loses more than 0.63 points of accuracy (export.max_accuracy_drop 0.5, but at least one test row)" in text
    assert "| onnx-int8 |" in text and "| 0.0833 | +1.09 |" in text
    assert report["gates"]["ece_points"] == pytest.approx(2 * 100 / 158)
    with pytest.raises(StageError, match="variant onnx-int8: ECE"):
        ex_lib.check_gates({"float32": {"accuracy": 0.93, "ece": 0.0724},
                            "onnx-int8": {"accuracy": 0.93, "ece": 0.0724 + 0.0128}}, params, 158)
    # on a large test split the floor is below the param, and the card says the param's number
    big = "\n".join(variants_section(_report(10_000, {"float32": 0.07, "onnx": 0.075}, params)))
    assert "adds more than 1.00 points of ECE" in big and "loses more than 0.50 points of accuracy" in big


def test_card_numbers_and_latency_load_come_from_the_export_metrics(exported):
    """Every variant number in the card is metrics/export.json's (what the stage's log line prints), and the
    latency is given with the load it was measured under: batch size, threads, CPU, load average."""
    from domaintune.export.modelcard import latency_text, pct

    root, _, _ = exported
    card = (root / "models/export/README.md").read_text()
    m = read_json(root / "metrics/export.json")
    lat = m["latency"]
    assert lat["batch_size"] == read_json(root / "models/export/model.json")["export_params"]["batch_size"]
    assert lat["threads"] >= 1 and lat["cpu"] and "load_average_1min" in lat
    assert latency_text(lat) in card
    assert f"in batches of {lat['batch_size']}" in card and f"{lat['threads']} threads on {lat['cpu']}" in card
    for name in ("float32", "int8", "onnx", "onnx-int8"):
        v = m["variants"][name]
        row = next(line for line in card.splitlines() if line.startswith(f"| {name} "))
        assert f"| {pct(v['accuracy'])} |" in row and f"| {v['ece']:.4f} |" in row
        assert f"| {v['batched_ms_per_text']:.1f} |" in row
    assert m["gates"]["test_rows"] == m["test_rows"] and m["gates"]["ece_points"] >= m["gates"]["max_ece_increase"]


def test_model_card_names_the_warm_start_regulariser_and_extra_rows():
    from domaintune.export.modelcard import continual_lines

    meta = {"warm_start": {"version": "v1.2.0", "dataset_hash": "f" * 64},
            "regularize": {"kind": "ewc", "strength": 0.5},
            "extra_rows": {"rows": 30, "augmented": 24, "replay": {"rows": 6}, "sha256": "a" * 64}}
    lines = continual_lines(meta)
    assert lines[0] == "- Started from version v1.2.0 (its dataset `ffffffffffff`), regulariser ewc (strength 0.5)"
    assert lines[1] == "- Train had 30 extra rows (24 augmented, 6 replayed), hash `aaaaaaaaaaaa`"
    assert continual_lines({}) == ["- Started from the base encoder, no regulariser"]
    oe = continual_lines({"outlier_exposure": {"weight": 0.5, "texts": 1114, "source": "labels/oos/known.txt",
                                               "sha256": "b" * 64}})
    assert oe[1].startswith("- Outlier exposure (weight 0.5): 1,114 known out-of-scope texts from "
                            "labels/oos/known.txt") and "`bbbbbbbbbbbb`" in oe[1]


def test_the_export_measures_every_variant_and_records_what_auto_serves(exported):
    """Each exported variant's texts/s (token-budget batches, the way predict runs them, on a seeded sample of at
    most 512 test texts) and its gate verdict are in export_report.json and metrics/export.json; --variant auto
    resolves to the recorded pick, and the card names it. Before: no speeds were recorded, auto did not exist."""
    from domaintune.core.device import MAX_BATCH_TOKENS, cpu_has_fast_bf16
    from domaintune.export.variants import fastest_passing, resolve_variant
    from domaintune.tasks import load_predictor

    root, _, test = exported
    out = root / "models/export"
    m = read_json(root / "metrics/export.json")
    speed = m["speed"]
    assert read_json(out / "export_report.json")["speed"] == speed
    assert speed["texts"] == min(512, len(test)) and speed["of_test_rows"] == len(test)
    assert speed["max_batch_tokens"] == MAX_BATCH_TOKENS and speed["cpu"] and speed["threads"] >= 1
    for name in ("float32", "int8", "onnx", "onnx-int8"):
        row = speed["variants"][name]
        assert row["texts_per_s"] > 0 and row["passed_gates"] is True and row["servable"] is True
        assert m["variants"][name]["texts_per_s"] == pytest.approx(row["texts_per_s"], abs=0.1)
    # bf16 autocast: its own measured row where the CPU is fast at bf16, never a variant auto can pick
    assert ("bf16-autocast" in speed["variants"]) == cpu_has_fast_bf16()
    if cpu_has_fast_bf16():
        bf16 = speed["variants"]["bf16-autocast"]
        assert bf16["servable"] is False and bf16["texts_per_s"] > 0 and 0 <= bf16["accuracy"] <= 1
        assert "bf16-autocast" not in m["variants"]  # the exported variants' table is unchanged
    best = fastest_passing(speed)
    assert speed["auto"] == {"variant": best[0], "texts_per_s": best[1], "why": best[2]}
    choice = resolve_variant(out)
    assert choice.variant == best[0] and choice.texts_per_s == best[1]
    p = load_predictor(out, variant="auto")
    assert p.variant == best[0] and p.variant_choice == choice
    card = (out / "README.md").read_text()
    assert f"variant: {choice.note}" in card and choice.note.startswith(f"{best[0]} (auto: ")
