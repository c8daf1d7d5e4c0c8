"""Drift baseline (stage), calibrated tests, label-free accuracy estimate, on tiny models and synthetic data."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from driftkit import DRIFT_YAML, TEMPLATES, german, save_tiny_classifier, tiny_splits  # noqa: F401

from domaintune.core.io import OUTPUT_MARKER, read_json
from domaintune.data.dataset import write_dataset
from domaintune.tasks import load_predictor


@pytest.fixture(scope="module")
def drift_setup(tmp_path_factory, tiny_bert):
    """A tiny project: audited data, an exported tiny classifier, the baseline the drift stage builds."""
    root = tmp_path_factory.mktemp("drift")
    splits, labels = tiny_splits(40)
    write_dataset(root / "audited", splits, labels)
    save_tiny_classifier(tiny_bert, root / "models" / "export", labels)
    (root / "params.yaml").write_text(DRIFT_YAML)
    from stages.drift import main

    rc = main(["--params", str(root / "params.yaml"), "--in", str(root / "audited"), "--model",
               str(root / "models" / "export"), "--out", str(root / "models" / "drift_baseline"),
               "--metrics", str(root / "metrics" / "drift.json")])
    assert rc == 0
    return root, splits, labels


def test_baseline_is_an_honest_reference_and_records_its_rows(drift_setup):
    """Model outputs come from validation (the old baseline took them from train), text features
    from train + validation, and the rows used are recorded."""
    from domaintune.monitor.drift import Baseline, reference_accuracy


    root, splits, labels = drift_setup
    out = root / "models" / "drift_baseline"
    assert sorted(p.name for p in out.iterdir()) == sorted([*Baseline.FILES, OUTPUT_MARKER])
    b = Baseline(out)
    train, val = splits["train"], splits["validation"]
    assert b.out_ref["id"].tolist() == val["id"].tolist()
    assert b.out_ref["label"].tolist() == val["label"].tolist()
    assert b.text_ref["id"].tolist() == train["id"].tolist() + val["id"].tolist()
    assert b.text_ref["split"].tolist() == ["train"] * len(train) + ["validation"] * len(val)
    assert b.text_ref["n_chars"].tolist() == [float(len(t)) for t in pd.concat([train, val])["text"]]
    # oov_rate against train's own vocabulary is 0 on train by construction: only validation counts.
    assert b.text_ref.loc[b.text_ref["split"] == "train", "oov_rate"].isna().all()
    assert b.out_ref["oov_rate"].notna().all()
    pred = load_predictor(root / "models" / "export").predict(val["text"].tolist())
    assert b.out_ref["pred_label"].tolist() == pred
    prof = b.profile
    assert prof["reference_rows"]["model_outputs"] == {"validation": len(val)}
    assert prof["reference_rows"]["text_features"] == {"train": len(train), "validation": len(val)}
    assert prof["reference_measured"] == reference_accuracy(val["label"], pred, labels)
    assert prof["dataset_hash"] == read_json(root / "audited" / "hashes.json")["dataset"]
    np.testing.assert_allclose(b.arrays["pca_components"] @ b.arrays["pca_components"].T, np.eye(3), atol=1e-4)
    # The null of every signal was resampled at sizes capped at half its reference.
    sizes = {g: [e["size"] for e in entries] for g, entries in prof["null"].items()}
    assert sizes == {"text": [(len(train) + len(val)) // 2], "heldout": [len(val) // 2]}
    signals = set(prof["null"]["text"][0]["fits"]) | set(prof["null"]["heldout"][0]["fits"])
    assert signals == {"n_chars", "n_words", "n_tokens", "truncated", "unk_rate", "non_ascii_rate", "digit_rate", "upper_rate", "oov_rate",
                       "pc1", "pc2", "pc3", "confidence", "pred_label", "embeddings_mmd"}
    metrics = json.loads((root / "metrics" / "drift.json").read_text())
    assert metrics["output_reference_rows"] == len(val) and metrics["signals"] == 16
    # document length in tokens and the share the model does not read whole (short templates: none)
    assert prof["length_tokens"]["truncated_share"] == 0.0 and prof["length_tokens"]["max"] < 32
    assert prof["long_text"]["mode"] == "truncate"


def test_judge_same_vs_other_domain(drift_setup):
    from domaintune.core.params import DriftParams
    from domaintune.monitor.drift import Baseline, judge


    root, splits, _ = drift_setup
    b = Baseline(root / "models" / "drift_baseline")
    predictor = load_predictor(root / "models" / "export")
    params = DriftParams(pca_components=3)
    same = judge(b, b.profile_batch(predictor, splits["test"]["text"].tolist()), params)
    assert same["drift"] is False and same["reasons"] == []
    assert same["tests"] == 16 and same["per_test_level"] == pytest.approx(0.01 / 16)
    moved = judge(b, b.profile_batch(predictor, german(30)), params)
    assert moved["drift"] is True
    assert {"n_chars", "n_words", "oov_rate", "digit_rate", "non_ascii_rate"} <= set(moved["drifted_columns"])
    assert moved["signals"]["embeddings_mmd"]["drifted"]
    ps = list(moved["p_values"].values())
    assert ps == sorted(ps)                                  # signals most drifted first
    assert len(moved["most_atypical"]) == 10 and len(moved["least_confident"]) == 10
    confs = [e["confidence"] for e in moved["least_confident"]]
    assert confs == sorted(confs)


def test_a_shift_to_longer_documents_shows_in_tokens_and_truncated_share(drift_setup):
    """Documents longer than the model reads move n_tokens and `truncated` (the share not read whole); the
    verdict names both with their batch and reference means, and the monitor history carries them."""
    from domaintune.core.params import DriftParams
    from domaintune.monitor.drift import Baseline, judge
    from domaintune.monitor.monitoring import append_history

    root, splits, _ = drift_setup
    b = Baseline(root / "models" / "drift_baseline")
    predictor = load_predictor(root / "models" / "export")
    texts = splits["test"]["text"].tolist()
    # same words, 30x as long: past the model's max_length 64; a batch of 120 (a share of 0/1 values needs some rows to test)
    long = [" ".join([t] * 30) for t in pd.concat(splits.values())["text"]]
    moved = judge(b, b.profile_batch(predictor, long), DriftParams(pca_components=3))
    assert {"n_tokens", "truncated"} <= set(moved["drifted_columns"])
    assert moved["signals"]["truncated"]["batch_mean"] == 1.0 and moved["signals"]["truncated"]["reference_mean"] == 0
    assert moved["length_tokens"]["truncated_share"] == 1.0 and moved["length_tokens"]["p50"] > 64
    assert moved["length_tokens"]["reference"]["truncated_share"] == 0.0
    same = judge(b, b.profile_batch(predictor, texts), DriftParams(pca_components=3))
    assert same["signals"]["truncated"]["batch_mean"] == 0.0 and not same["signals"]["n_tokens"]["drifted"]
    append_history(root / "history.csv", moved, "long.txt", "abc")
    row = pd.read_csv(root / "history.csv").iloc[0]
    assert row["truncated_share"] == 1.0 and row["tokens_p50"] == moved["length_tokens"]["p50"]


def test_bf16_choice_is_recorded_in_the_baseline_and_followed_by_batches(drift_setup, tmp_path, monkeypatch):
    """drift.bf16 is resolved when the baseline is built and recorded in profile.json; a batch is profiled
    on the same numeric path. bf16 probabilities stay close to float32 ones."""
    from domaintune.core.params import DriftParams
    from domaintune.monitor import drift as d

    root, splits, labels = drift_setup
    predictor = load_predictor(root / "models" / "export")
    assert d.wants_bf16(predictor, "off") is False and d.wants_bf16(predictor, "on") is True
    for mode in ("off", "on"):
        d.build_baseline(splits, labels, predictor, DriftParams(pca_components=3, calibration_resamples=20, bf16=mode),
                         tmp_path / mode)
    seen = []
    real = d.model_outputs
    monkeypatch.setattr(d, "model_outputs", lambda p, t, bf16=False: seen.append(bf16) or real(p, t, bf16))
    texts = splits["test"]["text"].tolist()
    off, on = (d.Baseline(tmp_path / m) for m in ("off", "on"))
    assert (off.profile["bf16"], on.profile["bf16"]) == (False, True)
    p_off, p_on = off.profile_batch(predictor, texts), on.profile_batch(predictor, texts)
    assert seen == [False, True]
    np.testing.assert_allclose(p_on.probs, p_off.probs, atol=0.03)


def test_missing_model_fails_cleanly_without_output(tmp_path, drift_setup, capsys):
    from stages.drift import main

    root, _, _ = drift_setup
    out = tmp_path / "baseline"
    rc = main(["--params", str(root / "params.yaml"), "--in", str(root / "audited"), "--model",
               str(tmp_path / "nope"), "--out", str(out), "--metrics", str(tmp_path / "m.json")])
    assert rc == 2
    assert "model.json" in capsys.readouterr().err
    assert [p for p in tmp_path.iterdir()] == []  # no output, no temporary leftovers either


def test_statistics_match_scipy():
    from scipy.stats import chi2_contingency, ks_2samp

    from domaintune.monitor import stats as dt

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(0.2, size=120).round(1)
    d = ks_2samp(a, b).statistic
    assert dt.ks_statistic(np.sort(a), b) == pytest.approx(300 * 120 / 420 * d * d)
    r, c = np.array([30, 0, 50, 20]), np.array([10, 0, 5, 25])
    assert dt.chi2_statistic(r, c) == pytest.approx(chi2_contingency(np.array([r[r + c > 0], c[r + c > 0]]),
                                                                     correction=False)[0])


def synthetic(n: int, rng: np.random.Generator, shift: float = 0.0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Rows shaped like real features: skewed lengths, integer word counts, zero-inflated rates,
    a mostly-zero unk rate, confidences piled near 1, 6 labels, 16-dim embeddings."""
    from domaintune.monitor.drift import TEXT_FEATURES

    words = rng.poisson(10 + 10 * shift, n) + 1
    f = pd.DataFrame({"n_chars": words * rng.uniform(4, 6, n), "n_words": words.astype(float),
                      "n_tokens": (words * 1.3).round(), "truncated": 0.0,  # no draws: the rng stream is as before
                      "unk_rate": np.where(rng.random(n) < 0.01, 0.1, 0.0),
                      "oov_rate": np.where(rng.random(n) < 0.3, rng.uniform(0, 0.3, n), 0.0),
                      "non_ascii_rate": 0.0, "digit_rate": np.where(rng.random(n) < 0.2, 0.05, 0.0),
                      "upper_rate": rng.beta(1, 30, n)})[list(TEXT_FEATURES)]
    emb = rng.normal(size=(n, 16)) + shift
    k = 6
    pred = rng.choice(k, n, p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.1])
    conf = np.clip(rng.beta(9, 1, n), 1 / k + 0.01, 1.0)
    probs = np.tile(((1 - conf) / (k - 1))[:, None], (1, k))
    probs[np.arange(n), pred] = conf
    return f, emb, probs


def synthetic_baseline(n_text: int, n_val: int, rng, resamples: int = 200, template=None):
    """A Baseline built by the library's own calibration on synthetic reference rows. With a template
    baseline, fresh reference rows reuse its random features and calibrated nulls (the null of a
    size-normalised statistic is a property of the distribution, not of one reference sample)."""
    from domaintune.monitor import drift as d
    from domaintune.monitor import stats as dt

    labels = [f"l{i}" for i in range(6)]
    text, _, _ = synthetic(n_text, rng)
    text.insert(0, "split", ["train"] * (n_text - n_val) + ["validation"] * n_val)
    text.loc[text["split"] == "train", "oov_rate"] = np.nan
    f, emb, probs = synthetic(n_val, rng)
    out = pd.DataFrame(emb[:, :3], columns=["pc1", "pc2", "pc3"])
    out["pred_label"] = [labels[i] for i in probs.argmax(1)]
    out["confidence"] = probs.max(1)
    # gold labels of a calibrated model: right with probability = confidence (own generator: the caller's
    # stream of draws stays as it was)
    right = np.random.default_rng(n_val).random(n_val) < out["confidence"].to_numpy()
    out["label"] = np.where(right, out["pred_label"], [labels[(labels.index(p) + 1) % 6] for p in out["pred_label"]])
    out.insert(0, "oov_rate", text.loc[text["split"] != "train", "oov_rate"].to_numpy())
    rff = dt.fit_rff(emb, 0, 128) if template is None else {k: template.arrays[k] for k in ("rff_w", "rff_b")}
    phi = dt.rff_map(emb, rff)
    b = object.__new__(d.Baseline)
    b.text_ref, b.out_ref, b.labels = text, out, labels
    b.arrays = {**rff, "phi_mean": phi.mean(0), "ref_embeddings": dt.normalise(emb),
                "pca_mean": np.zeros(16, np.float32), "pca_components": np.eye(16, dtype=np.float32)[:3]}
    null = d.calibrate(text, out, phi, labels, 3, resamples, 0) if template is None else template.profile["null"]
    b.profile = {"null": null, "mean_confidence": out["confidence"].mean(),
                 "prediction_distribution": d.distribution(out["pred_label"].tolist(), labels),
                 "reference_measured": {"accuracy": float(out["confidence"].mean()), "macro_f1": 0.8}}
    return b


def synthetic_batch(b, m: int, rng, shift: float = 0.0):
    from domaintune.monitor.drift import BatchProfile

    f, emb, probs = synthetic(m, rng, shift)
    frame = pd.concat([f, pd.DataFrame(emb[:, :3], columns=["pc1", "pc2", "pc3"])], axis=1)
    frame["pred_label"] = [b.labels[i] for i in probs.argmax(1)]
    frame["confidence"] = probs.max(1)
    return BatchProfile([f"t{i}" for i in range(m)], frame, probs, emb)


def test_iid_batches_alarm_at_most_at_the_stated_rate_at_any_size():
    """The old rule (per-feature p < 0.05, alarm at half the features; a fixed confidence drop) had no
    error rate; now 16 signals with resampled nulls, Bonferroni at false_alarm_rate. The p-values alone
    (min_effect 0) are checked: at a generous 0.2 the rate is measurable with 20-40 draws per size, from
    100 to 100,000 texts; a small shift is caught. Each draw is a fresh reference and a fresh batch (the
    rate holds over both: with one fixed reference, large batches all see that reference's own chance
    deviation)."""
    from domaintune.core.params import DriftParams
    from domaintune.monitor.drift import judge

    rng = np.random.default_rng(0)
    b = synthetic_baseline(4000, 1000, rng, resamples=100)
    params = DriftParams(false_alarm_rate=0.2, max_accuracy_drop=0.05, min_effect=0.0)
    for m, draws in ((100, 40), (3000, 40), (20_000, 20), (100_000, 6)):
        alarms = sum(judge(synthetic_baseline(4000, 1000, rng, template=b), synthetic_batch(b, m, rng), params)["drift"]
                     for _ in range(draws))
        assert alarms <= 0.2 * draws + 2 * np.sqrt(draws * 0.2 * 0.8), (m, alarms)
    p_only = DriftParams(min_effect=0.0)  # false_alarm_rate 0.01
    caught = [judge(b, synthetic_batch(b, 1000, rng, shift=0.15), p_only) for _ in range(5)]
    assert all(v["drift"] for v in caught)
    assert all(v["signals"]["embeddings_mmd"]["drifted"] for v in caught)


def test_a_tiny_real_shift_does_not_alarm_at_large_batches_and_a_big_one_does():
    """At 20,000 texts a 5% longer text length is highly significant (p ~ 1e-9) but a tiny effect
    (K-S distance ~0.06): with the default min_effect 0.1 it does not alarm, with p-values only it does.
    The debiased effect estimates the population distance. A big shift alarms at 100 and 20,000 texts."""
    from scipy.stats import poisson

    from domaintune.core.params import DriftParams
    from domaintune.monitor.drift import judge

    rng = np.random.default_rng(5)
    b = synthetic_baseline(4000, 1000, rng, resamples=60)
    tiny = synthetic_batch(b, 20_000, rng, shift=0.05)
    v, v_p = judge(b, tiny, DriftParams()), judge(b, tiny, DriftParams(min_effect=0.0))
    words = v["signals"]["n_words"]
    assert words["significant"] and words["p_value"] < 1e-6 and not words["drifted"]
    assert v_p["drift"] and v_p["signals"]["n_words"]["drifted"]
    assert not v["drift"], v["reasons"]
    ks = np.arange(60)
    true_d = np.abs(poisson.cdf(ks, 10) - poisson.cdf(ks, 10.5)).max()  # words = Poisson(10 (1 + shift)) + 1
    assert words["effect"] == pytest.approx(true_d, abs=0.02)
    for m in (100, 20_000):
        big = judge(b, synthetic_batch(b, m, rng, shift=0.5), DriftParams())
        assert big["drift"] and big["signals"]["n_words"]["drifted"] and big["signals"]["n_words"]["effect"] > 0.3
        assert "effect" in big["reasons"][0]


def test_effect_sizes_are_on_the_total_variation_scale():
    """TV of the label mix: ~0 for two draws of one mix, the exact TV for disjoint/known mixes once
    noise is removed. Normalised MMD of an e-contamination by a far cluster is at most e (a lower bound
    on the share of changed texts). Kolmogorov's tail is scipy's asymptotic K-S p-value, and a K-S
    signal's p-value is never below it."""
    from scipy.stats import ks_2samp, kstwobign

    from domaintune.monitor import stats as dt

    rng = np.random.default_rng(2)
    mix = np.array([0.5, 0.3, 0.2, 0.0])
    same = dt.tv_effect(rng.multinomial(1000, mix), rng.multinomial(300, mix))
    assert same < 0.05
    shifted = dt.tv_effect(rng.multinomial(100_000, mix), rng.multinomial(100_000, [0.3, 0.3, 0.2, 0.2]))
    assert shifted == pytest.approx(0.2, abs=0.01)
    assert dt.tv_effect(np.array([50, 50, 0, 0]), np.array([0, 0, 30, 70])) == pytest.approx(1.0, abs=0.05)
    ref = rng.normal(size=(3000, 8))
    rff = dt.fit_rff(ref, 0, 256)
    phi_mean = dt.rff_map(ref, rff).mean(0)
    for share in (0.1, 0.3):
        batch = np.vstack([rng.normal(size=(int(3000 * (1 - share)), 8)),
                           rng.normal(size=(int(3000 * share), 8)) * 0.05 + 10])
        t = dt.mmd_statistic(phi_mean, 3000, dt.rff_map(batch, rff))
        e = dt.mmd_effect(dt.excess_distance(t, 0.0, 3000, len(batch)), phi_mean)
        assert 0.3 * share < e <= share + 0.02, (share, e)
    a, c = rng.normal(size=2000), rng.normal(0.1, size=500)
    t = dt.ks_statistic(np.sort(a), c)
    res = ks_2samp(a, c, method="asymp")
    assert dt.kolmogorov_pvalue(t) == pytest.approx(kstwobign.sf(np.sqrt(2000 * 500 / 2500) * res.statistic))
    assert dt.kolmogorov_pvalue(t) == pytest.approx(res.pvalue, rel=0.1)  # scipy adds a small-sample correction
    optimistic = [{"a": 0.01, "nu": 1.0, "mean": 0.01, "var": 0.0002}]  # a fit that understates the tail
    assert dt.null_pvalue(t, optimistic, ks=True) == pytest.approx(dt.kolmogorov_pvalue(t))
    assert dt.null_pvalue(t, optimistic) < dt.kolmogorov_pvalue(t)


def test_estimated_accuracy_tracks_true_accuracy_of_calibrated_probabilities():
    """CBPE: with labels drawn from the probabilities (a calibrated model), the estimate's 95% interval
    covers the realised accuracy about 95% of the time, and the expected macro-F1 is close."""
    from sklearn.metrics import f1_score

    from domaintune.monitor.stats import estimated_performance

    rng = np.random.default_rng(1)
    covered, f1_err = 0, []
    for _ in range(40):
        logits = rng.normal(size=(2000, 5)) * 2
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        y = np.array([rng.choice(5, p=p) for p in probs])
        pred = probs.argmax(1)
        est = estimated_performance(probs)
        acc = (y == pred).mean()
        covered += est["accuracy_low"] <= acc <= est["accuracy_high"]
        f1_err.append(abs(est["macro_f1"] - f1_score(y, pred, average="macro")))
    assert covered >= 34
    assert np.mean(f1_err) < 0.015


def test_expected_macro_f1_ignores_the_softmax_tails_of_absent_classes():
    """A batch of 2 of 50 classes: the 48 others hold ~1e-4 probability each and must not count as
    classes with F1 = 0 (sklearn's macro average counts only labels present in y_true or y_pred)."""
    from domaintune.monitor.stats import estimated_performance

    probs = np.full((200, 50), 1e-4)
    probs[:100, 0] = probs[100:, 1] = 1 - 49e-4
    est = estimated_performance(probs)
    assert est["macro_f1"] == pytest.approx(0.995, abs=0.005)
    assert est["macro_f1_low"] <= est["macro_f1"] <= est["macro_f1_high"]


def test_an_estimated_accuracy_drop_is_a_reason():
    """Same features, but the model is far less sure: the CBPE estimate falls well below the
    reference's measured accuracy, and that alone is a reason in the verdict."""
    from domaintune.core.params import DriftParams
    from domaintune.monitor.drift import judge

    rng = np.random.default_rng(3)
    b = synthetic_baseline(2000, 500, rng, resamples=40)
    batch = synthetic_batch(b, 400, rng)
    k = batch.probs.shape[1]
    top = batch.probs.argmax(1)
    batch.probs[:] = 0.4 / (k - 1)
    batch.probs[np.arange(len(top)), top] = 0.6
    v = judge(b, batch, DriftParams(max_accuracy_drop=0.05))
    acc = v["accuracy"]
    assert acc["estimated"] < acc["reference_estimated"] - 0.15 and acc["drop_significant"]
    assert any(r.startswith(f"estimated accuracy {acc['estimated']:.3f}") and "is significant" in r
               for r in v["reasons"])
    assert v["drift"] is True


def _underconfident(conf: np.ndarray, rng) -> np.ndarray:
    """Right or wrong, for a model that is right more often than its calibrated confidence says (what the
    issue saw on the example: validation measured 0.929, mean confidence 0.884)."""
    c = np.clip(conf, 1e-6, 1 - 1e-6)
    return rng.random(len(c)) < 1 / (1 + np.exp(-(1.2 + 1.2 * np.log(c / (1 - c)))))


def _underconfident_reference(b, rng) -> None:
    out = b.out_ref
    right = _underconfident(out["confidence"].to_numpy(), rng)
    out["label"] = np.where(right, out["pred_label"], [b.labels[(b.labels.index(p) + 1) % 6] for p in out["pred_label"]])
    b.profile["reference_measured"] = {"accuracy": float(right.mean()), "macro_f1": 0.8}
    b.profile["reference_expected"] = {"accuracy": float(out["confidence"].mean()), "macro_f1": 0.8}


def test_the_accuracy_interval_holds_the_truth_when_confidence_is_miscalibrated():
    """The reference (validation) rows are right more often than their confidence says; an iid batch's
    estimated accuracy must still cover its measured accuracy (the map from confidence to P(correct) is
    fitted on the validation rows, and its uncertainty is in the interval), and the comparison is with the
    reference's estimate, not its measured accuracy. The mean-confidence estimate missed in every batch."""
    from domaintune.core.params import DriftParams
    from domaintune.monitor.drift import judge

    rng = np.random.default_rng(5)
    b = synthetic_baseline(2000, 600, rng, resamples=30)
    _underconfident_reference(b, rng)
    covered, old_covered = 0, 0
    for _ in range(12):
        batch = synthetic_batch(b, 400, rng)
        truth = _underconfident(batch.probs.max(1), rng).mean()
        acc = judge(b, batch, DriftParams())["accuracy"]
        covered += acc["ci_low"] <= truth <= acc["ci_high"]
        conf = batch.probs.max(1)
        sd = np.sqrt((conf * (1 - conf)).sum()) / len(conf)
        old_covered += conf.mean() - 1.96 * sd <= truth <= conf.mean() + 1.96 * sd
        assert acc["reference_estimated"] == pytest.approx(b.profile["reference_measured"]["accuracy"], abs=0.01)
        assert 0 < acc["sampling_sd"] and 0 < acc["calibration_sd"]
        assert acc["ci_high"] - acc["ci_low"] == pytest.approx(
            2 * 1.96 * np.hypot(acc["sampling_sd"], acc["calibration_sd"]))
        assert not acc["drop_significant"] and "is not significant" in acc["significance"]
    assert covered >= 11 and old_covered == 0


def test_calibration_uncertainty_widens_the_interval_as_validation_shrinks():
    """The same batch, calibrated on 2,000 and on 100 validation rows: the calibration term (bootstrap refits
    over the validation rows) is several times larger on the small set, the sampling term is the same."""
    from domaintune.monitor.stats import estimated_accuracy

    rng = np.random.default_rng(0)
    ref = np.clip(rng.beta(8, 1.5, 2000), 0.2, 0.999)
    ok = _underconfident(ref, rng)
    batch = np.clip(rng.beta(8, 1.5, 500), 0.2, 0.999)
    big, small = estimated_accuracy(batch, ref, ok), estimated_accuracy(batch, ref[:100], ok[:100])
    assert small["calibration_sd"] > 3 * big["calibration_sd"]
    assert small["sampling_sd"] == pytest.approx(big["sampling_sd"], rel=0.2)
    assert small["calibration_rows"] == 100 and big["calibration_rows"] == 2000
    assert big["accuracy"] == pytest.approx(_underconfident(batch, np.random.default_rng(1)).mean(), abs=0.04)


def test_a_batch_that_repeats_its_texts_gets_the_interval_of_its_distinct_texts():
    """bench/results/drift.json saw the example's interval cover only 0.81 of batches of 3,000 texts drawn from
    its 177 test rows: identical texts get the same prediction, so they are right or wrong together, and the
    batch knows only as much as its distinct texts. The sampling term counts a text repeated c times as one
    outcome of weight c (c^2 p (1 - p)); the monitor groups the batch by text. A batch of 60 texts each sent
    20 times covers its measured accuracy as often as the 60 texts alone would; the old per-row term did not."""
    from domaintune.core.params import DriftParams
    from domaintune.monitor.drift import judge
    from domaintune.monitor.stats import batch_sampling_var

    p = np.array([0.9, 0.6, 0.8])
    assert batch_sampling_var(p) == pytest.approx((p * (1 - p)).sum() / 9)
    assert batch_sampling_var(np.repeat(p, 4), np.repeat(["a", "b", "c"], 4)) == pytest.approx(
        batch_sampling_var(p))  # four copies of each: the variance of the three texts alone
    rng = np.random.default_rng(11)
    b = synthetic_baseline(2000, 600, rng, resamples=30)
    _underconfident_reference(b, rng)
    covered, per_row_covered = 0, 0
    for _ in range(30):
        distinct = synthetic_batch(b, 60, rng)
        batch = distinct.take(np.repeat(np.arange(60), 20))
        truth = np.repeat(_underconfident(distinct.probs.max(1), rng), 20).mean()
        acc = judge(b, batch, DriftParams())["accuracy"]
        alone = judge(b, distinct, DriftParams())["accuracy"]
        assert acc["sampling_sd"] == pytest.approx(alone["sampling_sd"], rel=1e-9)
        covered += acc["ci_low"] <= truth <= acc["ci_high"]
        half = 1.96 * np.hypot(alone["sampling_sd"] / np.sqrt(20), acc["calibration_sd"])  # per-row term
        per_row_covered += abs(acc["estimated"] - truth) <= half
    assert covered >= 27 and per_row_covered <= 24


def test_the_verdict_says_why_a_drop_is_or_is_not_significant_and_when_the_estimate_is_unreliable():
    """An estimated drop whose 95% interval lies under the alarm threshold can still be no alarm: the test
    runs at the Bonferroni-corrected level, and the verdict says so in one sentence. A baseline calibrated on
    fewer than MIN_CALIBRATION_ROWS validation rows says its estimate is unreliable, in the verdict, the report
    and the summary line."""
    from domaintune.core.params import DriftParams
    from domaintune.monitor.drift import MIN_CALIBRATION_ERRORS, MIN_CALIBRATION_ROWS, judge
    from domaintune.monitor.monitoring import summary_line
    from domaintune.monitor.report import verdict_section

    rng = np.random.default_rng(3)
    b = synthetic_baseline(2000, 500, rng, resamples=30)
    batch = synthetic_batch(b, 200, rng)
    k = batch.probs.shape[1]
    top = batch.probs.argmax(1)
    batch.probs[:] = 0.34 / (k - 1)
    batch.probs[np.arange(len(top)), top] = 0.66
    params = DriftParams(max_accuracy_drop=0.05)
    v = judge(b, batch, params)
    acc = v["accuracy"]
    threshold = acc["reference_estimated"] - params.max_accuracy_drop
    assert acc["ci_high"] < threshold and not acc["drop_significant"]  # 95% CI under it, yet no alarm
    level = params.false_alarm_rate / v["tests"]
    assert acc["level"] == pytest.approx(level)
    assert acc["significance"] == (
        f"the drop of {acc['drop']:.3f} is not significant: at the Bonferroni-corrected level {level:.2g} "
        f"(drift.false_alarm_rate {params.false_alarm_rate:g} over {v['tests']} tests) its one-sided lower bound "
        f"is {acc['drop_lower_bound']:.3f}, not above drift.max_accuracy_drop 0.05 (a stricter bound than the "
        "95% interval's 2.5% per side)")
    assert acc["reliable"] and acc["calibration_rows"] == 500 >= MIN_CALIBRATION_ROWS
    html = verdict_section(v)
    assert "The drop of" in html and "Bonferroni-corrected level" in html and "estimated the same way" in html
    line = summary_line({**v, "batch": "b.csv"})
    assert f"vs {acc['reference_estimated']:.3f} estimated the same way on the reference" in line

    small = synthetic_baseline(2000, MIN_CALIBRATION_ROWS - 1, rng, template=b)
    v = judge(small, batch, params)
    acc = v["accuracy"]
    note = f"estimate unreliable: calibrated on {MIN_CALIBRATION_ROWS - 1} rows"
    assert not acc["reliable"] and acc["reliability"].startswith(note)
    assert note in verdict_section(v) and note in summary_line({**v, "batch": "b.csv"})
    # enough rows, but too few wrong predictions to fit P(correct | confidence) on
    few_wrong = synthetic_baseline(2000, 400, rng, template=b)
    out = few_wrong.out_ref
    out["label"] = out["pred_label"]
    out.loc[: MIN_CALIBRATION_ERRORS - 2, "label"] = "l0-other"
    acc = judge(few_wrong, batch, params)["accuracy"]
    assert not acc["reliable"]
    assert acc["reliability"].startswith(f"estimate unreliable: calibrated on 400 rows, {MIN_CALIBRATION_ERRORS - 1} "
                                         "of them wrong")


def _class_dependent(conf: np.ndarray, cls: np.ndarray, rng) -> np.ndarray:
    """Right or wrong at the same confidence, by predicted class: class 0 is 0.15 less often right than its
    confidence says, the others 0.05 more (capped)."""
    return rng.random(len(conf)) < np.clip(np.where(cls == 0, conf - 0.15, conf + 0.05), 0, 0.99)


def test_the_accuracy_interval_holds_when_the_batch_predicts_another_mix_of_classes():
    """Validation and batch differ only in the mix of predicted classes (a batch of mostly one intent), and the
    model is overconfident on that class at the same confidence: one confidence -> P(correct) map, fitted on the
    validation mix, overstates the batch's accuracy by ~0.1 and its interval misses in every batch; with each
    class's empirical-Bayes offset (stats.class_offsets) the interval holds. On a batch whose classes do not
    differ, the offsets shrink to ~0 and the estimate is the one-map estimate."""
    from domaintune.monitor.stats import class_offsets, estimated_accuracy

    rng = np.random.default_rng(11)
    ref_cls = rng.integers(0, 4, 2000)
    ref = rng.uniform(0.7, 0.97, 2000)
    ref_ok = _class_dependent(ref, ref_cls, rng)
    old_held = new_held = 0
    for _ in range(10):
        cls = np.where(rng.random(800) < 0.9, 0, rng.integers(1, 4, 800))
        conf = rng.uniform(0.7, 0.97, 800)
        truth = _class_dependent(conf, cls, rng).mean()
        old = estimated_accuracy(conf, ref, ref_ok, boot=50)
        new = estimated_accuracy(conf, ref, ref_ok, boot=50, predicted=cls, ref_predicted=ref_cls)
        old_held += old["accuracy_low"] <= truth <= old["accuracy_high"]
        new_held += new["accuracy_low"] <= truth <= new["accuracy_high"]
        assert new["reference_accuracy"] == pytest.approx(ref_ok.mean(), abs=0.01) and new["class_offsets"]
    assert old_held == 0 and new_held >= 9
    same = rng.random(2000) < ref                       # calibrated alike in every class: nothing to correct
    p = np.clip(ref, 0, 1)
    assert np.abs(class_offsets(same - p, p, ref_cls, 4)).max() < 0.01
    flat = estimated_accuracy(conf, ref, same, boot=50, predicted=cls, ref_predicted=ref_cls)
    assert flat["accuracy"] == pytest.approx(estimated_accuracy(conf, ref, same, boot=50)["accuracy"], abs=0.01)


def test_the_monitor_estimates_a_batch_of_one_predicted_class_by_that_class():
    """drift.judge passes the batch's and the validation rows' predicted labels to the estimator: a batch of the
    one class the model is overconfident on gets that class's accuracy, not the validation mix's."""
    from domaintune.core.params import DriftParams
    from domaintune.monitor.drift import BatchProfile, judge

    rng = np.random.default_rng(4)
    b = synthetic_baseline(2000, 800, rng, resamples=20)
    out = b.out_ref
    cls = (out["pred_label"] != "l0").to_numpy().astype(int)
    right = _class_dependent(out["confidence"].to_numpy(), cls, rng)  # l0 is class 0: overconfident
    out["label"] = np.where(right, out["pred_label"], [b.labels[(b.labels.index(p) + 1) % 6] for p in out["pred_label"]])
    big = synthetic_batch(b, 6000, rng)
    keep = np.flatnonzero(big.frame["pred_label"].to_numpy() == "l0")[:400]
    batch = BatchProfile([big.texts[i] for i in keep], big.frame.iloc[keep].reset_index(drop=True), big.probs[keep],
                         big.emb[keep])
    truth = np.clip(batch.probs.max(1) - 0.15, 0, 0.99).mean()
    acc = judge(b, batch, DriftParams())["accuracy"]
    assert acc["ci_low"] <= truth <= acc["ci_high"], (acc["estimated"], truth)
    assert acc["estimated"] < acc["reference_estimated"] - 0.1
