"""Drift stage and monitor comparison on a tiny dataset and a tiny random classifier."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from domaintune.data import read_json, write_dataset

TEMPLATES = {
    "billing": ["I was charged twice for invoice {n}", "refund my payment of {n} dollars please",
                "why is my bill {n} this month", "the card payment failed again"],
    "login": ["cannot log in to my account", "password reset link does not work",
              "my account is locked after {n} tries", "two factor code never arrives"],
    "shipping": ["where is my parcel {n}", "the delivery is late by {n} days",
                 "package arrived damaged", "change the shipping address please"],
}


def tiny_splits(n_per_class: int = 12, seed: int = 0) -> tuple[dict[str, pd.DataFrame], list[str]]:
    rng = random.Random(seed)
    rows = []
    for label, temps in TEMPLATES.items():
        for i in range(n_per_class):
            rows.append((label, rng.choice(temps).format(n=rng.randint(2, 999))))
    rng.shuffle(rows)
    splits = {"train": [], "validation": [], "test": []}
    for i, (label, text) in enumerate(rows):
        name = "train" if i % 6 < 4 else ("validation" if i % 6 == 4 else "test")
        splits[name].append({"id": f"r{i}", "text": text, "label": label, "split": name})
    return {k: pd.DataFrame(v) for k, v in splits.items()}, sorted(TEMPLATES)


def save_tiny_classifier(tiny_bert: Path, out: Path, labels: list[str], temperature: float = 1.5) -> Path:
    import torch

    from domaintune.modeling import build_classifier, load_encoder, load_tokenizer, save_classifier

    torch.manual_seed(0)
    model = build_classifier(load_encoder(str(tiny_bert)), len(labels), "mean", 0.0)
    save_classifier(model, load_tokenizer(str(tiny_bert)), out,
                    {"labels": labels, "pooling": "mean", "problem_type": "single_label", "method": "full",
                     "max_length": 64, "temperature": temperature})
    return out


@pytest.fixture(scope="module")
def drift_setup(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("drift")
    splits, labels = tiny_splits()
    write_dataset(root / "audited", splits, labels)
    save_tiny_classifier(tiny_bert, root / "export", labels)
    params = root / "params.yaml"
    params.write_text("base: {seed: 0, model: minilm, max_length: 64}\n"
                      "drift: {batch_size: 16, pca_components: 3, stattest_threshold: 0.05, drift_share: 0.5,"
                      " max_confidence_drop: 0.1}\n")
    from stages.drift import main

    rc = main(["--params", str(params), "--in", str(root / "audited"), "--model", str(root / "export"),
               "--out", str(root / "baseline"), "--metrics", str(root / "metrics" / "drift.json")])
    assert rc == 0
    return root, splits, labels


def test_baseline_profile_contents(drift_setup):
    from safetensors.numpy import load_file

    root, splits, labels = drift_setup
    out = root / "baseline"
    assert sorted(p.name for p in out.iterdir()) == ["pca.safetensors", "profile.json", "reference.parquet",
                                                     "report.html", "vocab.json"]
    ref = pd.read_parquet(out / "reference.parquet")
    train = splits["train"]
    assert len(ref) == len(train)
    assert ref["id"].tolist() == train["id"].tolist()
    # Features are the real per-text numbers.
    assert ref["n_chars"].tolist() == [float(len(t)) for t in train["text"]]
    assert ref["n_words"].tolist() == [float(len(t.split())) for t in train["text"]]
    assert (ref["oov_rate"] == 0).all()           # every train word is in the train vocabulary
    assert ref["pred_label"].isin(labels).all()
    assert ((ref["confidence"] > 1 / 3 - 1e-6) & (ref["confidence"] <= 1 + 1e-6)).all()
    pca = load_file(str(out / "pca.safetensors"))
    assert pca["components"].shape == (3, 64)
    # Orthonormal axes, and the projected train set is centred.
    np.testing.assert_allclose(pca["components"] @ pca["components"].T, np.eye(3), atol=1e-4)
    np.testing.assert_allclose(ref[["pc1", "pc2", "pc3"]].mean().to_numpy(), 0, atol=1e-4)
    assert ref["pc1"].var() >= ref["pc2"].var() >= ref["pc3"].var()
    profile = read_json(out / "profile.json")
    assert profile["temperature"] == 1.5
    assert profile["dataset_hash"] == read_json(root / "audited" / "hashes.json")["dataset"]
    assert abs(sum(profile["label_distribution"].values()) - 1) < 1e-9
    assert profile["label_distribution"]["billing"] == pytest.approx((train["label"] == "billing").mean())
    assert profile["mean_confidence"] == pytest.approx(ref["confidence"].mean())
    assert set(profile["sanity_validation_vs_train"]["p_values"]) == set(profile["numeric_features"]) | {"pred_label"}
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Drifted Columns" in html and "oov_rate" in html
    metrics = json.loads((root / "metrics" / "drift.json").read_text())
    assert metrics["reference_rows"] == len(train)
    assert metrics["pca_components"] == 3


def test_monitor_verdicts(drift_setup):
    from domaintune.params import DriftParams
    from stages.drift import Baseline, compare_batch

    root, splits, _ = drift_setup
    baseline = Baseline(root / "baseline")
    params = DriftParams(pca_components=3)
    same = compare_batch(baseline, splits["train"]["text"].tolist(), root / "export", params, 16)
    assert same["drift"] is False and same["reasons"] == []
    assert same["drifted_columns"] == []
    assert same["confidence_drop"] == pytest.approx(0.0, abs=1e-6)
    # Another domain: long German texts full of numbers and unseen words.
    rng = random.Random(1)
    shifted = [f"Sehr geehrte Damen und Herren, die Lieferung Nummer {rng.randint(10000, 99999)} vom "
               f"{rng.randint(1, 28)}.{rng.randint(1, 12)}.2025 ist beschädigt, Größe {rng.randint(30, 50)}, "
               f"bitte um Rückerstattung von {rng.randint(100, 999)} Euro." for _ in range(30)]
    html = root / "monitor.html"
    moved = compare_batch(baseline, shifted, root / "export", params, 16, html_path=html)
    assert moved["drift"] is True
    assert {"n_chars", "n_words", "oov_rate", "digit_rate", "non_ascii_rate"} <= set(moved["drifted_columns"])
    assert moved["p_values"]["n_chars"] < 1e-6
    assert html.exists() and html.stat().st_size > 1000


def test_missing_model_fails_cleanly_without_output(tmp_path, drift_setup, capsys):
    from stages.drift import main

    root, _, _ = drift_setup
    out = tmp_path / "baseline"
    rc = main(["--params", str(root / "params.yaml"), "--in", str(root / "audited"), "--model",
               str(tmp_path / "nope"), "--out", str(out), "--metrics", str(tmp_path / "m.json")])
    assert rc == 2
    assert "model.json" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "m.json").exists()
    assert [p for p in tmp_path.iterdir()] == []  # no temporary leftovers either


def test_monitor_batch_reader_names_file_row_and_field(tmp_path):
    from domaintune.data import DataError
    from pipelines.monitor import read_batch

    txt = tmp_path / "b.txt"
    txt.write_text("first ticket\nsecond ticket\n", encoding="utf-8")
    assert read_batch(txt) == ["first ticket", "second ticket"]
    csv = tmp_path / "b.csv"
    csv.write_bytes(b"body,other\nfine,1\n   ,2\n")
    with pytest.raises(DataError, match=r"b\.csv: row 2: field 'body': empty or missing text"):
        read_batch(csv, "body")
    with pytest.raises(DataError, match=r"field 'text': column missing"):
        read_batch(csv)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff byte"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl: row 2: field 'text': .*not UTF-8"):
        read_batch(jsonl)
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "b.xlsx").write_text("x")
        read_batch(tmp_path / "b.xlsx")
    pq = tmp_path / "b.parquet"
    pd.DataFrame({"text": ["a parcel", "a refund"], "label": ["x", "y"]}).to_parquet(pq)
    assert read_batch(pq) == ["a parcel", "a refund"]


def test_constant_feature_no_nan_and_still_judged(tmp_path):
    """A feature constant in the reference (no non-ASCII text in train) has zero std: evidently's
    correlation matrix divided by it (NaN, RuntimeWarning). It is now tested with scipy's K-S: no
    warning, p = 1 while both sides hold the constant, drift as soon as the batch moves off it."""
    import warnings

    from stages.drift import PRED_COLUMN, drift_report

    rng = np.random.default_rng(0)
    # confidence: a confident model's calibrated top probability, 1.0 up to float rounding; on
    # such data evidently's histogram raised "Too many bins for data range".
    ref = pd.DataFrame({"n_chars": rng.normal(40, 5, 60), "non_ascii_rate": 0.0,
                        "confidence": rng.choice([1.0, 0.9999999999999998], 60),
                        PRED_COLUMN: rng.choice(["a", "b"], 60)})
    same = pd.DataFrame({"n_chars": rng.normal(40, 5, 50), "non_ascii_rate": 0.0,
                         "confidence": rng.choice([1.0, 0.9999999999999885, 0.9999999999999998], 50),
                         PRED_COLUMN: rng.choice(["a", "b"], 50)})
    moved = same.assign(non_ascii_rate=rng.uniform(0.1, 0.3, 50))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        calm = drift_report(ref, same, ["n_chars", "non_ascii_rate", "confidence"], 0.05, 0.5)
        drifted = drift_report(ref, moved, ["n_chars", "non_ascii_rate", "confidence"], 0.05, 0.5,
                               tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    section = html[html.index("Features constant in the reference"):]
    assert "<td>non_ascii_rate</td><td>0</td><td>0.1" in section and "drifted" in section
    assert calm["constant_columns"] == ["non_ascii_rate", "confidence"]
    assert calm["p_values"]["non_ascii_rate"] == calm["p_values"]["confidence"] == 1.0
    assert calm["drifted_columns"] == []
    assert list(calm["p_values"]) == ["n_chars", "non_ascii_rate", "confidence", PRED_COLUMN]  # report order kept
    assert drifted["p_values"]["non_ascii_rate"] < 1e-6 and "non_ascii_rate" in drifted["drifted_columns"]
    assert drifted["drifted_share"] == len(drifted["drifted_columns"]) / 4
    assert all(np.isfinite(p) for p in drifted["p_values"].values())


def test_drift_report_survives_a_feature_that_differs_only_in_float_noise(tmp_path):
    """A saturated confidence (1.0 and 1.0 - 1e-16) used to crash evidently's histogram inside drift_report."""
    import numpy as np
    import pandas as pd

    from stages.drift import CONF_COLUMN, PRED_COLUMN, drift_report

    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"chars": rng.normal(50, 5, 40), CONF_COLUMN: 1.0 - rng.integers(0, 2, 40) * 1e-16,
                        PRED_COLUMN: ["a", "b"] * 20})
    cur = ref.sample(frac=1.0, random_state=1).reset_index(drop=True)
    out = drift_report(ref, cur, ["chars", CONF_COLUMN], 0.05, 0.5, tmp_path / "r.html")
    assert set(out["p_values"]) == {"chars", CONF_COLUMN, PRED_COLUMN}
    assert out["drifted_columns"] == [] and (tmp_path / "r.html").stat().st_size > 0
