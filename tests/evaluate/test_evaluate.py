"""evaluate stage: the core on constructed logits, the real entry point on a tiny model, gate and bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from evalkit import LABELS, calibrated_logits, make_dataset, make_model, make_split, write_params

from domaintune.core.params import EvaluateParams
from domaintune.evaluate import classifier as ev_lib
from stages import evaluate as ev

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- core on constructed logits
def _frame(n: int, y: np.ndarray, name: str) -> pd.DataFrame:
    rng = np.random.default_rng(len(name))
    texts = [" ".join(["word"] * int(rng.integers(1, 30))) for _ in range(n)]
    return pd.DataFrame({"id": [f"{name}-{i:05d}" for i in range(n)], "text": texts,
                         "label": [LABELS[j] for j in y], "split": name})


def test_core_recovers_temperature_and_plants_rows():
    vl, vy = calibrated_logits(3000, len(LABELS), seed=0)
    tl, ty = calibrated_logits(2000, len(LABELS), seed=1)
    vl, tl = vl * 3.0, tl * 3.0  # an overconfident model
    # Plant: row 0 is 'billing' but the model is ~certain it is 'shipping' (the most confident error);
    # row 1 has equal logits (maximum entropy: the most uncertain prediction).
    ty[0], tl[0] = 0, np.array([0.0, 0.0, 80.0])
    ty[1], tl[1] = 1, np.array([5.0, 5.0, 5.0])
    val, test = _frame(3000, vy, "validation"), _frame(2000, ty, "test")
    res = ev_lib.evaluate_logits(val, test, vl, tl, LABELS, EvaluateParams(top_k=5))
    assert res.calibration["temperature"] == pytest.approx(3.0, rel=0.1)
    assert res.after["ece"] < res.before["ece"] / 2 and res.after["nll"] < res.before["nll"]
    for k in ("accuracy", "macro_f1", "weighted_f1"):
        assert res.after[k] == res.before[k]
    assert res.after["accuracy"] == pytest.approx((tl.argmax(1) == ty).mean())
    ce = res.tables["confident_errors"]
    assert ce.loc[0, "id"] == "test-00000" and ce.loc[0, "label"] == "billing" and ce.loc[0, "predicted"] == "shipping"
    assert (np.diff(ce["confidence"]) <= 0).all() and len(ce) == 5
    unc = res.tables["uncertain"]
    assert unc.loc[0, "id"] == "test-00001" and unc.loc[0, "entropy"] == pytest.approx(np.log(3))
    pc = res.tables["per_class"]
    assert list(pc["class"]) == LABELS and pc["support"].sum() == 2000
    pred = tl.argmax(1)
    exp_f1 = 2 * ((pred == 0) & (ty == 0)).sum() / ((pred == 0).sum() + (ty == 0).sum())
    assert pc.loc[0, "f1"] == pytest.approx(exp_f1)
    cp = res.tables["confused_pairs"]
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (ty, pred), 1)
    np.fill_diagonal(cm, 0)
    i, j = np.unravel_index(cm.argmax(), cm.shape)
    assert (cp.loc[0, "actual"], cp.loc[0, "predicted"], cp.loc[0, "count"]) == (LABELS[i], LABELS[j], cm[i, j])
    bl = res.tables["by_length"]
    assert bl["rows"].sum() == 2000 and len(bl) == 4
    assert len(res.plot_data["confusion"]) == 2000


def test_gate_names_metric_value_and_threshold():
    after = {"accuracy": 0.5, "macro_f1": 0.4, "ece": 0.3}
    ev_lib.check_gate(after, {"min_accuracy": 0.5, "min_macro_f1": 0.4, "max_ece": 0.3})  # boundaries pass
    with pytest.raises(ev_lib.StageError, match=r"macro_f1 0\.4000 < evaluate\.gate\.min_macro_f1 0\.6"):
        ev_lib.check_gate(after, {"min_macro_f1": 0.6})
    with pytest.raises(ev_lib.StageError, match=r"ece .*0\.3000 > evaluate\.gate\.max_ece 0\.1"):
        ev_lib.check_gate(after, {"max_ece": 0.1})


def test_seed_summary_mean_std():
    per = {"1": {"before": {"accuracy": 0.8}, "after": {"accuracy": 0.8}},
           "2": {"before": {"accuracy": 0.6}, "after": {"accuracy": 0.6}}}
    s = ev_lib.seed_summary(per)
    assert s["mean"]["after"]["accuracy"] == pytest.approx(0.7)
    assert s["std"]["after"]["accuracy"] == pytest.approx(0.1)


# ---------------------------------------------------------------- the real entry point
@pytest.fixture(scope="module")
def evaluated(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_dataset(root / "data", n_val=10, n_test=8)
    model = make_model(tiny_bert, root / "model", seed=0)
    for seed in (1, 2):  # finetune's multi-seed layout
        make_model(tiny_bert, model / "seeds" / str(seed), seed=seed)
    params = write_params(root / "params.yaml")
    rc = ev.main(["--in", str(root / "data"), "--model", str(model), "--out", str(root / "reports/eval"),
                  "--metrics", str(root / "metrics/evaluate.json"), "--params", str(params)])
    assert rc == 0
    return root


def test_stage_writes_metrics_report_and_plots(evaluated):
    out = evaluated / "reports/eval"
    metrics = json.loads((evaluated / "metrics/evaluate.json").read_text())
    assert metrics["test_rows"] == 24
    for phase in ("before", "after"):
        assert set(ev_lib.METRIC_KEYS) <= set(metrics[phase])
        assert 0.0 <= metrics[phase]["ece"] <= metrics[phase]["mce"] <= 1.0
    assert metrics["after"]["accuracy"] == metrics["before"]["accuracy"]
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["temperature"] == metrics["temperature"] and calib["temperature"] > 0
    assert calib["validation_rows"] == 30
    # Metrics recomputed from the written predictions agree with the JSON.
    conf = pd.read_csv(out / "plots/confusion.csv")
    assert len(conf) == 24 and (conf["actual"] == conf["predicted"]).mean() == pytest.approx(metrics["after"]["accuracy"])
    pc = pd.read_csv(out / "per_class.csv")
    assert list(pc["class"]) == LABELS and pc["support"].tolist() == [8, 8, 8]
    assert pd.read_csv(out / "by_length.csv")["rows"].sum() == 24
    errors = pd.read_csv(out / "confident_errors.csv")
    assert len(errors) == min(20, int(round((1 - metrics["after"]["accuracy"]) * 24)))
    for png in ("confusion", "reliability", "confidence_hist", "per_class_f1"):
        assert (out / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    for png in ("confusion", "reliability", "confidence_hist", "per_class_f1"):
        assert f"]({png}.png)" in md  # embedded, so the report shows them wherever it is rendered
    for heading in ("## Metrics on test", "## Most confident errors", "## Most uncertain predictions",
                    "## Most confused class pairs", "## Accuracy by text length", "## Seeds (2"):
        assert heading in md
    # Multi-seed: each seed reported, plus mean and std over seeds.
    s = metrics["seeds"]
    assert s["n"] == 2 and set(s) >= {"1", "2", "mean", "std"}
    assert s["mean"]["accuracy"] == pytest.approx((s["1"]["accuracy"] + s["2"]["accuracy"]) / 2)


def test_dvc_plots_render(evaluated, tmp_path):
    """The plots declared in dvc.yaml render from the stage's files with `dvc plots show`."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(evaluated / "reports", tmp_path / "reports")
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    shutil.copytree(REPO / ".dvc" / "plots", tmp_path / ".dvc" / "plots")  # the series_* templates
    r = subprocess.run([dvc, "plots", "show", "--json"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    # Other stages' plots (e.g. finetune's DVCLive curves) have no data here; ours must have no errors.
    # risk_coverage.csv is written only with evaluate.abstain on (tests/evaluate/test_abstain.py); here it is off
    ours = [e for e in shown.get("errors") or [] if "reports/eval" in str(e.get("source", e.get("name")))
            and "risk_coverage" not in str(e.get("source", e.get("name")))]
    assert not ours, ours
    import yaml

    ids = {next(iter(p)) for p in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
           if "reports/eval" in json.dumps(p)}
    assert ids == {"eval_confusion", "eval_reliability", "eval_confidence_histogram", "eval_per_class_f1",
                   "eval_risk_coverage"}
    ids.discard("eval_risk_coverage")
    plots = {t: shown["data"][t][0]["content"]["data"]["values"] for t in ids}
    assert len(plots["eval_confusion"]) == 24
    assert {row["class"] for row in plots["eval_per_class_f1"]} == set(LABELS)
    # Series are told apart by readable names (with each one's ECE), not by CSV file names.
    ece = json.loads((evaluated / "metrics/evaluate.json").read_text())
    reliability = plots["eval_reliability"]
    names = {row["series"] for row in reliability}
    assert names == {"perfectly calibrated", *(f"{p} calibration (ECE {ece[p]['ece']:.3f})" for p in ("before", "after"))}
    hist = plots["eval_confidence_histogram"]
    assert {row["series"] for row in hist} == {"before calibration", "after calibration"}
    assert sum(int(row["rows"]) for row in hist) == 2 * 24  # before + after, every test row once each


def test_gate_failure_writes_nothing(evaluated, tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", evaluate={"gate": {"min_accuracy": 1.0, "max_ece": 1.0}})
    rc = ev.main(["--in", str(evaluated / "data"), "--model", str(evaluated / "model"),
                  "--out", str(tmp_path / "reports/eval"), "--metrics", str(tmp_path / "metrics/evaluate.json"),
                  "--params", str(params)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "quality gate failed" in err and "accuracy" in err and "min_accuracy 1.0" in err
    assert not (tmp_path / "reports").exists() and not (tmp_path / "metrics").exists()


# ---------------------------------------------------------------- bad input
def _run_bad(tmp_path, data, model, capsys, **params) -> str:
    p = write_params(tmp_path / "params.yaml", evaluate=params)
    rc = ev.main(["--in", str(data), "--model", str(model), "--out", str(tmp_path / "out"),
                  "--metrics", str(tmp_path / "m.json"), "--params", str(p)])
    assert rc == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
    return capsys.readouterr().err


def test_model_labels_must_match_dataset(evaluated, tiny_bert, tmp_path, capsys):
    model = make_model(tiny_bert, tmp_path / "m4", labels=LABELS + ["refunds"])
    err = _run_bad(tmp_path, evaluated / "data", model, capsys)
    assert "labels.json" in err and "only in model ['refunds']" in err


def test_test_split_missing_a_class(evaluated, tmp_path, capsys):
    from domaintune.data.dataset import write_dataset

    splits = {"train": make_split("train", 5), "validation": make_split("validation", 10),
              "test": make_split("test", 5, labels=["billing", "login"])}
    write_dataset(tmp_path / "data", splits, LABELS)
    err = _run_bad(tmp_path, tmp_path / "data", evaluated / "model", capsys)
    assert "test.parquet" in err and "'label'" in err and "['shipping']" in err


def test_unknown_label_in_test_names_row(evaluated, tmp_path, capsys):
    from domaintune.data.dataset import write_dataset

    test = make_split("test", 4)
    test.loc[5, "label"] = "cancellations"
    splits = {"train": make_split("train", 5), "validation": make_split("validation", 10), "test": test}
    write_dataset(tmp_path / "data", splits, LABELS)
    err = _run_bad(tmp_path, tmp_path / "data", evaluated / "model", capsys)
    assert "test.parquet: row 5 (id test-login-1): field 'label'" in err and "cancellations" in err


def test_validation_too_small_to_calibrate(evaluated, tmp_path, capsys):
    err = _run_bad(tmp_path, evaluated / "data", evaluated / "model", capsys, min_calibration_rows=31)
    assert "validation.parquet" in err and "30 rows" in err and "min_calibration_rows=31" in err


def test_multi_label_thresholds_tuned_on_validation():
    # Label 'login' is under-predicted: positives get p ~0.3, so 0.5 misses them and a tuned threshold does not.
    rng = np.random.default_rng(0)

    def make(n, name):
        Y = rng.integers(0, 2, size=(n, 3))
        Y[Y.sum(1) == 0, 0] = 1
        p = np.where(Y == 1, 0.85, 0.1)
        p[:, 1] = np.where(Y[:, 1] == 1, 0.3, 0.05)
        logits = np.log(p / (1 - p)) + rng.normal(0, 0.05, size=p.shape)
        labels = ["|".join(LABELS[j] for j in range(3) if row[j]) for row in Y]
        df = pd.DataFrame({"id": [f"{name}-{i}" for i in range(n)], "text": ["a b c"] * n, "label": labels,
                           "split": name})
        return df, logits

    (val, vl), (test, tl) = make(200, "validation"), make(100, "test")
    res = ev_lib.evaluate_logits(val, test, vl, tl, LABELS, EvaluateParams(), problem_type="multi_label")
    thr = res.calibration["thresholds"]
    assert 0.05 < thr["login"] <= 0.3 and res.calibration["method"] == "thresholds"
    assert res.before["accuracy"] < 1.0 and res.after["accuracy"] == 1.0
    assert res.after["macro_f1"] == 1.0
    assert res.after["ece"] == res.before["ece"]  # thresholds do not change probabilities
    pc = res.tables["per_class"]
    assert list(pc["class"]) == LABELS and pc.loc[1, "threshold"] == thr["login"]
    ev_lib.check_labels(LABELS, ["billing", "billing|login", "shipping"], {"validation": val, "test": test}, "d",
                    "multi_label")


def test_stage_runs_a_multi_label_model(tiny_bert, tmp_path):
    from domaintune.data.dataset import write_dataset

    splits = {}
    for name, n in (("train", 5), ("validation", 10), ("test", 8)):
        df = make_split(name, n)
        df.loc[::3, "label"] = df.loc[::3, "label"] + "|login"
        df["label"] = df["label"].str.replace("login|login", "login", regex=False)
        splits[name] = df
    write_dataset(tmp_path / "data", splits, sorted(set(splits["train"]["label"])))
    model = make_model(tiny_bert, tmp_path / "model", problem_type="multi_label")
    rc = ev.main(["--in", str(tmp_path / "data"), "--model", str(model), "--out", str(tmp_path / "eval"),
                  "--metrics", str(tmp_path / "m.json"), "--params", str(write_params(tmp_path / "p.yaml"))])
    assert rc == 0
    calib = json.loads((tmp_path / "eval/calibration.json").read_text())
    assert set(calib["thresholds"]) == set(LABELS)
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(ev_lib.METRIC_KEYS) <= set(m["after"])
    assert all(0.0 <= m[ph][k] <= 1.0 for ph in ("before", "after") for k in ("accuracy", "macro_f1", "ece"))
    assert m["after"]["ece"] == m["before"]["ece"]  # thresholds leave the probabilities alone
    assert "## Most confident errors" in (tmp_path / "eval/report.md").read_text()


def test_predictor_applies_the_stage_calibration(evaluated, tmp_path):
    from domaintune.evaluate.calibration import softmax
    from domaintune.predict.predictor import Predictor

    calib = json.loads((evaluated / "reports/eval/calibration.json").read_text())
    p = Predictor.load(evaluated / "model", calibration=evaluated / "reports/eval")
    assert p.temperature == pytest.approx(calib["temperature"])
    texts = ["refund charged twice", "password locked"]
    np.testing.assert_allclose(p.predict_proba(texts), softmax(p.logits(texts), calib["temperature"]), atol=1e-12)
    calib["labels"] = ["x", "y", "z"]
    (tmp_path / "c.json").write_text(json.dumps(calib))
    with pytest.raises(ValueError, match="fitted for labels"):
        Predictor.load(evaluated / "model", calibration=tmp_path / "c.json")


def test_pngs_carry_ece_bin_counts_and_f1_values(tmp_path):
    """What a reader of reports/eval/*.png sees: each curve's ECE, rows per bin, each class's F1."""
    from domaintune.evaluate import report as rp

    bins = [{"confidence": 0.55, "accuracy": 0.5, "count": 4}, {"confidence": 0.95, "accuracy": 0.9, "count": 30},
            {"confidence": 0.75, "accuracy": 0.0, "count": 0}]
    texts = rp.plot_reliability({"before calibration": bins, "after calibration": bins[:1]}, tmp_path / "r.png",
                                {"before calibration": 0.1234, "after calibration": 0.0321})
    assert {"before calibration (ECE 0.123)", "after calibration (ECE 0.032)", "n=4", "n=30"} <= set(texts)
    assert "n=0" not in texts  # empty bins are not drawn
    per_class = pd.DataFrame({"class": ["a", "b"], "f1": [0.5, 0.875]})
    texts = rp.plot_per_class_f1(per_class, tmp_path / "f.png")
    assert {"0.50", "0.88"} <= set(texts)
    assert (tmp_path / "r.png").read_bytes()[:4] == (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
