"""evaluate.abstain: the scores, the threshold (fitted on validation, kept within binomial noise), auto's choice,
the out-of-scope file reader, params, and the evaluate stage with abstention on a tiny model (method none changes
nothing; a bad oos_texts file is one line, exit 2)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from evalkit import OOS_TEXTS, make_dataset, make_model, write_params

from domaintune.core.errors import DataError, ParamsError
from domaintune.core.params import EvaluateParams, parse_section
from domaintune.evaluate import abstain as ab
from domaintune.evaluate.calibration import softmax
from stages import evaluate as ev


# ---------------------------------------------------------------- scores and threshold on constructed numbers
@pytest.mark.parametrize("recall", [0.9, 0.97, 0.99])
def test_threshold_keeps_the_in_scope_recall_within_binomial_noise(recall):
    rng = np.random.default_rng(0)
    val, fresh = rng.normal(size=2000), rng.normal(size=2000)
    t = ab.fit_threshold(val, recall)
    kept_val = (val >= t).mean()
    assert recall <= kept_val <= recall + 1 / len(val) + 1e-12  # the largest threshold that keeps the share
    sigma = np.sqrt(recall * (1 - recall) / len(fresh))
    assert abs((fresh >= t).mean() - recall) <= 3 * sigma  # on new in-scope rows: within binomial noise


def test_energy_and_max_prob_use_the_calibrated_logits():
    logits = np.array([[4.0, 0.0, -1.0], [0.5, 0.4, 0.3]])
    T = 2.0
    np.testing.assert_allclose(ab.energy_score(logits, T), T * np.log(np.exp(logits / T).sum(1)))
    np.testing.assert_allclose(ab.max_prob_score(logits, T), softmax(logits, T).max(1))
    assert ab.max_prob_score(logits, T)[0] < softmax(logits, 1.0).max(1)[0]  # T matters
    big = np.array([[1000.0, 999.0]])  # stable for large logits
    assert np.isfinite(ab.energy_score(big, 1.0)).all()


def test_mahalanobis_separates_a_far_cluster_with_a_singular_covariance():
    """More dimensions than rows: the plain covariance is singular; Ledoit-Wolf shrinkage keeps it invertible."""
    rng = np.random.default_rng(1)
    d, k = 40, 3
    centres = rng.normal(0, 4, size=(k, d))
    y = np.repeat(np.arange(k), 8)  # 24 rows < 40 dimensions
    x = centres[y] + rng.normal(size=(len(y), d))
    assert np.linalg.matrix_rank(np.cov((x - centres[y]).T)) < d
    means, precision, shrinkage = ab.fit_mahalanobis(x, y, k)
    assert np.isfinite(precision).all() and 0 < shrinkage <= 1
    in_scope = centres[np.repeat(np.arange(k), 20)] + rng.normal(size=(60, d))
    oos = rng.normal(0, 4, size=(60, d)) + 12.0
    s_in, s_oos = ab.mahalanobis_score(in_scope, means, precision), ab.mahalanobis_score(oos, means, precision)
    assert ab.auroc(s_in, s_oos) > 0.99 and ab.fpr_at_95tpr(s_in, s_oos) < 0.05
    # the distance to the nearest class mean, in the precision's metric
    diff = in_scope[0] - means
    assert s_in[0] == pytest.approx(-min(float(v @ precision @ v) for v in diff), rel=1e-9)


def test_auto_picks_the_best_validation_auroc_and_records_it():
    rng = np.random.default_rng(2)
    k, d = 3, 8
    centres = rng.normal(0, 5, size=(k, d))
    y = np.repeat(np.arange(k), 30)
    x = centres[y] + rng.normal(size=(len(y), d))
    # logits that say nothing about scope (same confidence everywhere), vectors that do
    flat = np.tile([[2.0, 0.0, 0.0]], (len(y), 1))
    train, val = ab.Split(flat, x, y), ab.Split(flat, x + rng.normal(0, 0.1, size=x.shape), y)
    oos = ab.Split(np.tile([[2.0, 0.0, 0.0]], (20, 1)), rng.normal(0, 5, size=(20, d)) + 20)
    abstainer, info = ab.fit_abstention("auto", 0.95, "out_of_scope", 1.0, k, train, val, oos)
    assert abstainer.method == info["chosen"] == "mahalanobis"
    assert set(info["candidates"]) == set(ab.SCORES) and info["candidates"]["mahalanobis"]["validation_auroc"] > 0.99
    assert info["candidates"]["max_prob"]["validation_auroc"] == pytest.approx(0.5)
    # without out-of-scope texts there is nothing to compare on: max_prob
    abstainer, info = ab.fit_abstention("auto", 0.95, "out_of_scope", 1.0, k, train, val, None)
    assert abstainer.method == "max_prob" and "no evaluate.abstain.oos_texts" in info["why"]


def test_metrics_count_abstentions_as_errors():
    logits = np.array([[3.0, 0.0], [3.0, 0.0], [0.1, 0.0], [0.0, 3.0]])
    test = ab.Split(logits, None, np.array([0, 1, 0, 1]))  # row 1 wrong, row 2 low confidence
    a = ab.Abstainer("max_prob", 0.6, 1.0)
    oos = ab.Split(np.array([[0.0, 0.05], [4.0, 0.0]]))
    m, curve = ab.abstain_metrics(a, test, oos)
    assert m["abstain_rate"] == 0.25 and m["in_scope_accuracy"] == 0.5  # rows 0 and 3 right and answered
    assert m["oos_recall"] == 0.5 and m["oos_precision"] == 0.5  # 1 of the 2 abstentions is out of scope
    assert curve[-1]["coverage"] == 1.0 and curve[-1]["risk"] == pytest.approx(0.25)


# ---------------------------------------------------------------- files and params
def test_oos_file_reader_names_file_row_and_field(tmp_path):
    good = tmp_path / "oos.csv"
    good.write_text("text,x\nwhat is the weather,1\nplay jazz,2\n")
    assert ab.read_texts(good, "evaluate.abstain.oos_texts") == ["what is the weather", "play jazz"]
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nfine\n\"\"\n")
    with pytest.raises(DataError) as e:
        ab.read_texts(bad, "evaluate.abstain.oos_texts")
    assert str(e.value).startswith(f"{bad}: row 2: field 'text'")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("question\nwhat\n")
    with pytest.raises(DataError, match="field 'text'.*no column 'text'"):
        ab.read_texts(nocol, "evaluate.abstain.oos_texts")


def test_abstain_params_are_typed_and_validated():
    p = parse_section("evaluate", {"abstain": {"method": "auto", "oos_texts": "labels/oos/a.txt"}})
    assert p.abstain.method == "auto" and p.abstain.in_scope_recall == 0.97 and p.abstain.label == "out_of_scope"
    assert EvaluateParams().abstain.method == "none"
    for raw, msg in (({"method": "softmax"}, "evaluate.abstain.method"),
                     ({"in_scope_recall": 1.0}, "evaluate.abstain.in_scope_recall"),
                     ({"oos_texts": "/tmp/x.txt"}, "evaluate.abstain.oos_texts: must be a file in labels/oos/"),
                     ({"oos_test": "labels/oos/../../x.txt"}, "evaluate.abstain.oos_test"),
                     ({"label": ""}, "evaluate.abstain.label"),
                     ({"threshold": 0.5}, "unknown key(s) ['threshold']"),
                     ({"in_scope_recall": "high"}, "expected float")):
        with pytest.raises(ParamsError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            parse_section("evaluate", {"abstain": raw})


# ---------------------------------------------------------------- the stage on a tiny model
@pytest.fixture(scope="module")
def data_and_model(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("abstain")
    make_dataset(root / "data", n_val=20, n_test=8)
    return root, make_model(tiny_bert, root / "model", seed=3)


def run_stage(root, model, out, params, cwd, monkeypatch) -> int:
    monkeypatch.chdir(cwd)
    return ev.main(["--in", str(root / "data"), "--model", str(model), "--out", str(out / "reports/eval"),
                    "--metrics", str(out / "metrics/evaluate.json"), "--params", str(params)])


def test_stage_fits_on_validation_and_reports_on_test(data_and_model, tmp_path, monkeypatch):
    from domaintune.data.dataset import read_dataset
    from domaintune.predict.predictor import Predictor

    root, model = data_and_model
    (tmp_path / "labels/oos").mkdir(parents=True)
    (tmp_path / "labels/oos/known.txt").write_text("\n".join(OOS_TEXTS[:3]) + "\n")
    (tmp_path / "labels/oos/test.csv").write_text("text\n" + "\n".join(OOS_TEXTS[3:]) + "\n")
    params = write_params(tmp_path / "params.yaml", evaluate={"abstain": {
        "method": "auto", "in_scope_recall": 0.9, "oos_texts": "labels/oos/known.txt", "label": "out_of_scope",
        "oos_test": "labels/oos/test.csv"}})
    assert run_stage(root, model, tmp_path, params, tmp_path, monkeypatch) == 0
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    a = metrics["abstain"]
    fit = a["fit"]
    assert a["method"] == fit["chosen"] == max(fit["candidates"], key=lambda m: fit["candidates"][m]["validation_auroc"])
    # auto considers trained: its detector is fitted on 1 of the 3 oos_texts, every candidate scored on the other 2
    assert fit["oos_validation_rows"] == 2 and fit["oos_split"]["fit_rows"] == 1 and "trained" in fit["candidates"]
    assert a["oos_rows"] == 3 and fit["validation_rows"] == 60
    for key in ("threshold", "in_scope_accuracy", "abstain_rate", "oos_recall", "oos_precision", "auroc",
                "fpr_at_95tpr"):
        assert isinstance(a[key], float)
    assert a["in_scope_accuracy"] <= metrics["after"]["accuracy"]  # an abstention counts as an error
    out = tmp_path / "reports/eval"
    calib = json.loads((out / "calibration.json").read_text())
    assert calib["abstain"]["method"] == a["method"] and calib["abstain"]["threshold"] == a["threshold"]
    assert (out / "risk_coverage.png").read_bytes()[:4] == b"\x89PNG"
    curve = pd.read_csv(out / "plots/risk_coverage.csv")  # dvc.yaml's eval_risk_coverage: x coverage, y risk
    assert {"coverage", "risk"} <= set(curve.columns) and curve["coverage"].iloc[-1] == 1.0
    assert curve["risk"].iloc[-1] == pytest.approx(1 - metrics["after"]["accuracy"])
    assert "## Abstention (out of scope)" in (out / "report.md").read_text()
    # Predictor applies it (from the stage's calibration folder): the validation rows keep >= the stated share
    splits, _ = read_dataset(root / "data")
    p = Predictor.load(model, calibration=out)
    assert p.abstainer.method == a["method"]
    _, abstained = p.predict_with_abstention(splits["validation"]["text"].tolist())
    assert (~abstained).mean() >= 0.9


def test_mahalanobis_writes_its_arrays(data_and_model, tmp_path, monkeypatch):
    root, model = data_and_model
    params = write_params(tmp_path / "params.yaml", evaluate={"abstain": {"method": "mahalanobis"}})
    assert run_stage(root, model, tmp_path, params, tmp_path, monkeypatch) == 0
    a = json.loads((tmp_path / "metrics/evaluate.json").read_text())["abstain"]
    assert a["fit"]["train_rows"] == 15 and "Ledoit-Wolf" in a["fit"]["covariance"]
    assert "oos_recall" not in a  # no out-of-scope test texts given
    from safetensors.numpy import load_file

    arrays = load_file(str(tmp_path / "reports/eval" / ab.ARRAYS_FILE))
    assert arrays["means"].shape == (3, 64) and arrays["precision"].shape == (64, 64)


def test_method_none_changes_nothing(data_and_model, tmp_path, monkeypatch):
    root, model = data_and_model
    params = write_params(tmp_path / "params.yaml")  # the shipped params: method none
    assert run_stage(root, model, tmp_path, params, tmp_path, monkeypatch) == 0
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"test_rows", "temperature", "before", "after", "stage_seconds", "long_text"}
    out = tmp_path / "reports/eval"
    calib = json.loads((out / "calibration.json").read_text())
    assert "abstain" not in calib
    assert not (out / ab.ARRAYS_FILE).exists() and not (out / "risk_coverage.png").exists()
    assert not (out / "plots/risk_coverage.csv").exists() and "Abstention" not in (out / "report.md").read_text()


def test_a_bad_oos_texts_file_is_one_line_and_exit_2(data_and_model, tmp_path, monkeypatch, capsys):
    root, model = data_and_model
    (tmp_path / "labels/oos").mkdir(parents=True)
    (tmp_path / "labels/oos/known.csv").write_text("text\nwhat is the weather\n   \nplay jazz\n")
    params = write_params(tmp_path / "params.yaml", evaluate={"abstain": {
        "method": "auto", "oos_texts": "labels/oos/known.csv"}})
    assert run_stage(root, model, tmp_path, params, tmp_path, monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labels/oos/known.csv: row 2: field 'text'" in err[0], err
    assert not (tmp_path / "reports").exists() and not (tmp_path / "metrics").exists()
    (tmp_path / "labels/oos/known.csv").unlink()  # a file that is not there: named too
    assert run_stage(root, model, tmp_path, params, tmp_path, monkeypatch) == 2
    assert "labels/oos/known.csv" in capsys.readouterr().err


# ---------------------------------------------------------------- trained: a detector fitted on oos_texts
def near_domain(seed: int = 5):
    """In-scope classes and out-of-scope texts that sit among them, shifted along one direction of a high in-scope
    variance: logits say nothing, the distance to the class means little, a linear detector a lot."""
    rng = np.random.default_rng(seed)
    k, d = 3, 8
    centres = rng.normal(0, 5, size=(k, d))
    scale = np.r_[3.0, np.ones(d - 1)]

    def draw(n, shift=0.0):
        y = rng.integers(0, k, size=n)
        x = centres[y] + rng.normal(size=(n, d)) * scale
        x[:, 0] += shift
        return ab.Split(np.tile([[2.0, 0.0, 0.0]], (n, 1)), x, y)

    return k, draw(300), draw(400), draw(200, 9.0), draw(2000), draw(400, 9.0)


def test_trained_detector_keeps_the_recall_and_auto_picks_it_by_held_out_auroc():
    k, train, val, oos, fresh_in, fresh_oos = near_domain()
    recall = 0.95
    a, info = ab.fit_abstention("auto", recall, "out_of_scope", 1.0, k, train, val, oos)
    c = info["candidates"]
    assert a.method == info["chosen"] == "trained" == max(c, key=lambda m: c[m]["validation_auroc"])
    assert c["trained"]["validation_auroc"] > c["mahalanobis"]["validation_auroc"] + 0.05
    assert c["max_prob"]["validation_auroc"] == pytest.approx(0.5)
    # every candidate scored on the held-out half of oos_texts only, the compared detector fitted on the other
    assert info["oos_split"] == {**info["oos_split"], "fit_rows": 100, "held_out_rows": 100, "seed": ab.OOS_SPLIT_SEED}
    assert info["oos_validation_rows"] == 100 and "caveat" in info and info["oos_fit_rows"] == 200
    fit, held = ab.split_oos(200)
    assert not set(fit) & set(held) and len(fit) + len(held) == 200 and (fit == ab.split_oos(200)[0]).all()
    # the kept detector (refitted on all oos_texts): threshold keeps the recall on validation, and on new in-scope
    # rows within binomial noise; the score is minus the out-of-scope logit
    s_val = a.scores(val.logits, val.features)
    assert recall <= (s_val >= a.threshold).mean() <= recall + 1 / len(s_val) + 1e-12
    sigma = np.sqrt(recall * (1 - recall) / len(fresh_in.logits))
    assert abs((~a.abstained(fresh_in.logits, fresh_in.features)).mean() - recall) <= 3 * sigma
    np.testing.assert_allclose(s_val, -(val.features @ a.coef + a.intercept))
    assert a.abstained(fresh_oos.logits, fresh_oos.features).mean() > 0.8


def test_trained_needs_oos_texts_and_round_trips_through_safetensors(tmp_path):
    k, train, val, oos, fresh_in, _ = near_domain()
    with pytest.raises(ValueError, match="oos_texts"):
        ab.fit_abstention("trained", 0.95, "out_of_scope", 1.0, k, train, val, None)
    with pytest.raises(ParamsError, match="evaluate.abstain.method: trained fits a detector on known out-of-scope"):
        parse_section("evaluate", {"abstain": {"method": "trained"}})
    a, info = ab.fit_abstention("trained", 0.95, "out_of_scope", 1.0, k, train, val, oos)
    assert set(info["candidates"]) == {"trained"} and "LogisticRegression(class_weight='balanced'" in info["detector"]
    a.save_arrays(tmp_path)
    back = ab.Abstainer.from_json(a.to_json(), tmp_path, tmp_path / "model.json")
    assert back.method == "trained" and back.needs_features and a.to_json()["arrays"] == ab.ARRAYS_FILE
    assert (back.abstained(fresh_in.logits, fresh_in.features) == a.abstained(fresh_in.logits, fresh_in.features)).all()
    (tmp_path / ab.ARRAYS_FILE).unlink()
    with pytest.raises(DataError, match="missing: trained abstention needs its arrays"):
        ab.Abstainer.from_json(a.to_json(), tmp_path, tmp_path / "model.json")


def test_trained_without_oos_texts_stops_the_stage_at_its_start(data_and_model, tmp_path, monkeypatch, capsys):
    root, model = data_and_model
    params = write_params(tmp_path / "params.yaml", evaluate={"abstain": {"method": "trained"}})
    assert run_stage(root, model, tmp_path, params, tmp_path, monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluate.abstain.method: trained fits a detector" in err[0], err
    assert not (tmp_path / "reports").exists() and not (tmp_path / "metrics").exists()
