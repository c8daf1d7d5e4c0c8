"""`domaintune monitor` on a base.task: generation export: the drift stage builds the classifier's baseline
format from prompt descriptors and the causal LM's own hidden states (domaintune/tasks/generation/drift.py), and the
monitor writes the same verdict.json, report.html and history: in-domain prompts give no alarm (exit 0),
out-of-domain ones alarm (exit 1). With a label set (classification as generation) the verdict also has
the predicted-label mix and the estimated accuracy, as a classifier's does."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from driftkit import german

from domaintune.data.dataset import write_dataset

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "examples" / "support_replies" / "pairs.csv"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from domaintune.core.io import write_json
    from domaintune.export.generation import save_export
    from domaintune.modeling import tinyllm
    from domaintune.modeling.causal import load_causal_lm

    root = tmp_path_factory.mktemp("genmonitor")
    df = pd.read_csv(PAIRS).rename(columns={"ticket_id": "id", "prompt": "text", "response": "label"})
    df = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    cuts = {"train": df.iloc[:120], "validation": df.iloc[120:180], "test": df.iloc[180:]}
    splits = {k: v.assign(split=k) for k, v in cuts.items()}
    write_dataset(root / "audited", splits, [])
    model = tinyllm.save(root / "tiny", df["text"].tolist() + df["label"].tolist(), seed=0)
    m, tok = load_causal_lm(str(model))
    export = root / "models" / "export"
    save_export(m, tok, export, 16)  # the export stage's layout: model, tokenizer, generation config
    write_json(export / "export_info.json", {"task": "generation", "method": "full", "base_model": str(model),
                                             "max_length": 128})
    (root / "params.yaml").write_text(yaml.safe_dump({
        "base": {"task": "generation", "model": str(model), "max_length": 128, "device": "cpu"},
        "drift": {"batch_size": 32, "pca_components": 3, "calibration_resamples": 60}}))
    from stages.drift import main

    assert main(["--params", str(root / "params.yaml"), "--in", str(root / "audited"), "--model", str(export),
                 "--out", str(root / "models" / "drift_baseline"),
                 "--metrics", str(root / "metrics" / "drift.json")]) == 0
    (root / "same.txt").write_text("\n".join(t.replace("\n", " ") for t in splits["test"]["text"]) + "\n",
                                   encoding="utf-8")
    (root / "other.txt").write_text("\n".join(german(40)) + "\n", encoding="utf-8")
    return root


def cli(*argv) -> int:
    from pipelines.cli import main

    return main(list(argv))


def test_drift_stage_writes_the_classifier_baseline_files_from_the_models_hidden_states(project):
    from domaintune.monitor.drift import Baseline

    metrics = json.loads((project / "metrics" / "drift.json").read_text())
    assert metrics["task"] == "generation"
    assert metrics["text_reference_rows"] == 180 and metrics["output_reference_rows"] == 60
    assert metrics["reference_accuracy"] is None and metrics["reference_expected_accuracy"] is None
    base = Baseline(project / "models" / "drift_baseline")  # every file the classifier's baseline has
    assert base.labels == [] and base.profile["problem_type"] == "generation" and base.profile["max_length"] == 128
    assert base.arrays["pca_components"].shape == (3, 64)  # axes in the tiny Llama's hidden size
    assert 0.0 < base.out_ref["confidence"].min() <= base.out_ref["confidence"].max() < 1.0  # familiarity


def test_monitor_gives_the_same_verdict_and_exit_codes_for_a_generation_model(project, capsys):
    from domaintune.monitor.report import read_embedded_verdict

    assert cli("monitor", "--batch", "same.txt", "--repo", str(project), "--out", "reports/same") == 0
    assert cli("monitor", "--batch", "other.txt", "--repo", str(project), "--out", "reports/other") == 1
    out = capsys.readouterr().out
    assert "same.txt: no drift" in out and "other.txt: DRIFT: " in out
    calm = json.loads((project / "reports" / "same" / "verdict.json").read_text())
    alarm = json.loads((project / "reports" / "other" / "verdict.json").read_text())
    # The classifier's verdict keys, with no label mix and no accuracy estimate (there is no label set).
    assert set(alarm) == set(calm) >= {"drift", "reasons", "rows", "false_alarm_rate", "signals", "p_values",
                                       "accuracy", "most_atypical", "least_confident", "review_queued"}
    assert not calm["drift"] and alarm["drift"] and alarm["accuracy"] is None and alarm["review_queued"] == 0
    assert "pred_label" not in alarm["signals"]
    assert {"embeddings_mmd", "pc1", "confidence", "n_chars"} <= set(alarm["signals"])
    assert alarm["signals"]["embeddings_mmd"]["drifted"] and alarm["signals"]["confidence"]["drifted"]
    assert "familiarity" in alarm["signals"]["confidence"]["explanation"]
    assert alarm["tests"] == calm["tests"] == len(alarm["signals"])  # Bonferroni over the signals only
    html = (project / "reports" / "other" / "report.html").read_text(encoding="utf-8")
    assert read_embedded_verdict(html) == json.loads(json.dumps(alarm, sort_keys=True))
    marks = ["DRIFT detected", "Signals, most drifted", "10 most atypical", "Details (evidently)"]
    assert [html.index(m) for m in marks] == sorted(html.index(m) for m in marks)
    with (project / "reports" / "monitor_history.csv").open(newline="") as fh:
        hist = list(csv.DictReader(fh))
    assert [(Path(r["batch"]).name, r["drift"]) for r in hist] == [("same.txt", "0"), ("other.txt", "1")]
    assert not (project / "data" / "review_queue.csv").exists()


TOPICS = {"billing": ["invoice", "charged twice", "refund", "payment failed", "receipt"],
          "login": ["password", "two-factor code", "locked out", "sign in", "reset link"],
          "shipping": ["parcel", "tracking number", "delivery address", "courier", "customs"]}


def _topic_split(name: str, n: int, seed: int) -> pd.DataFrame:
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % 3]
        a, b = rng.sample(TOPICS[label], 2)
        rows.append((f"{name}-{i}", f"Hello, a question about my {a} and the {b}, ticket {rng.randint(100, 999)}.",
                     label, name))
    return pd.DataFrame(rows, columns=["id", "text", "label", "split"])


@pytest.fixture(scope="module")
def label_project(tmp_path_factory):
    from domaintune.core.io import write_json
    from domaintune.export.generation import save_export
    from domaintune.modeling import tinyllm
    from domaintune.modeling.causal import load_causal_lm

    root = tmp_path_factory.mktemp("genmonitor_labels")
    splits = {"train": _topic_split("train", 60, 0), "validation": _topic_split("validation", 45, 1),
              "test": _topic_split("test", 30, 2)}
    write_dataset(root / "audited", splits, [])
    model = tinyllm.save(root / "tiny", [t for df in splits.values() for t in df["text"]] + list(TOPICS), seed=0)
    m, tok = load_causal_lm(str(model))
    export = root / "models" / "export"
    save_export(m, tok, export, 4)
    write_json(export / "export_info.json", {"task": "generation", "method": "full", "base_model": str(model),
                                             "max_length": 64,
                                             "classification": {"labels": list(TOPICS), "temperature": 0.5}})
    (root / "params.yaml").write_text(yaml.safe_dump({
        "base": {"task": "generation", "model": str(model), "max_length": 64, "device": "cpu"},
        "evaluate": {"label_set": list(TOPICS)},
        "drift": {"batch_size": 32, "pca_components": 3, "calibration_resamples": 60}}))
    from stages.drift import main

    assert main(["--params", str(root / "params.yaml"), "--in", str(root / "audited"), "--model", str(export),
                 "--out", str(root / "models" / "drift_baseline"),
                 "--metrics", str(root / "metrics" / "drift.json")]) == 0
    (root / "same.txt").write_text("\n".join(splits["test"]["text"]) + "\n", encoding="utf-8")
    (root / "other.txt").write_text("\n".join(german(30)) + "\n", encoding="utf-8")
    return root


def test_with_a_label_set_the_verdict_has_the_label_mix_and_the_accuracy_estimate(label_project, capsys):
    from domaintune.monitor.drift import Baseline

    root = label_project
    metrics = json.loads((root / "metrics" / "drift.json").read_text())
    assert 0.0 <= metrics["reference_accuracy"] <= 1.0 and 0.0 < metrics["reference_expected_accuracy"] <= 1.0
    base = Baseline(root / "models" / "drift_baseline")
    assert base.labels == list(TOPICS) and base.profile["problem_type"] == "single_label"
    assert base.profile["temperature"] == 0.5 and set(base.out_ref["pred_label"]) <= set(TOPICS)
    assert cli("monitor", "--batch", "same.txt", "--repo", str(root), "--out", "reports/same") == 0
    assert cli("monitor", "--batch", "other.txt", "--repo", str(root), "--out", "reports/other") == 1
    out = capsys.readouterr().out
    assert "same.txt: no drift" in out and "other.txt: DRIFT: " in out and "estimated accuracy" in out
    calm = json.loads((root / "reports" / "same" / "verdict.json").read_text())
    alarm = json.loads((root / "reports" / "other" / "verdict.json").read_text())
    for v in (calm, alarm):
        assert {"pred_label", "embeddings_mmd", "confidence"} <= set(v["signals"]) and v["accuracy"] is not None
        assert set(v["prediction_distribution"]) == set(TOPICS)
    assert "familiarity" not in alarm["signals"]["confidence"]["explanation"]  # the calibrated top probability
    assert alarm["signals"]["embeddings_mmd"]["drifted"]
