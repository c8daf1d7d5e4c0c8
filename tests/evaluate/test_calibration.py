"""Calibration math on constructed numbers with answers known by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from evalkit import calibrated_logits

from domaintune.evaluate import calibration as cal


def test_ece_mce_known_answer():
    # Bin (0.6, 0.8] (15 bins: 0.7 -> bin 10) holds 4 rows at 0.7 with 2 correct: gap 0.2.
    # Bin (0.8667, 0.9333] holds 6 rows at 0.9, all correct: gap 0.1.
    conf = np.array([0.7] * 4 + [0.9] * 6)
    correct = np.array([1, 1, 0, 0] + [1] * 6)
    ece, mce = cal.ece_mce(conf, correct, bins=15)
    assert ece == pytest.approx(0.4 * 0.2 + 0.6 * 0.1)
    assert mce == pytest.approx(0.2)


def test_ece_zero_when_confidence_equals_accuracy():
    conf = np.array([0.75] * 4)
    correct = np.array([1, 1, 1, 0])
    assert cal.ece_mce(conf, correct, 15) == pytest.approx((0.0, 0.0))


def test_reliability_bin_edges():
    bins = cal.reliability_bins(np.array([0.0, 0.5, 1.0, 1 / 3]), np.array([1, 0, 1, 1]), bins=3)
    # (0, 1/3] gets 0.0 and 1/3; (1/3, 2/3] gets 0.5; (2/3, 1] gets 1.0.
    assert [b["count"] for b in bins] == [2, 1, 1]
    assert bins[1]["accuracy"] == 0.0


def test_nll_brier_known_answer():
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    y = np.array([0, 2])
    assert cal.nll(probs, y) == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2)
    # row 0: .25+.0625+.0625=.375; row 1: .01+.64+.81=1.46
    assert cal.brier(probs, y) == pytest.approx((0.375 + 1.46) / 2)
    assert cal.nll_from_logits(np.log(probs), y) == pytest.approx(cal.nll(probs, y))


def test_temperature_recovers_three_and_ece_drops():
    logits, y = calibrated_logits(6000, 5, seed=0)
    fit = cal.fit_temperature(logits * 3.0, y)  # an overconfident model: logits scaled by 3
    assert fit["temperature"] == pytest.approx(3.0, rel=0.06)
    assert fit["nll_after"] < fit["nll_before"]
    test_logits, y_test = calibrated_logits(4000, 5, seed=1)
    before = cal.single_label_metrics(cal.softmax(test_logits * 3.0), y_test, 5)
    after = cal.single_label_metrics(cal.softmax(test_logits * 3.0, fit["temperature"]), y_test, 5)
    assert after["ece"] < before["ece"] / 3
    assert after["nll"] < before["nll"]
    # T > 0 cannot change the argmax: accuracy and F1s are identical.
    for k in ("accuracy", "macro_f1", "weighted_f1"):
        assert after[k] == before[k]


def test_temperature_of_calibrated_model_is_one_and_underconfident_is_sharpened():
    logits, y = calibrated_logits(6000, 4, seed=2)
    assert cal.fit_temperature(logits, y)["temperature"] == pytest.approx(1.0, abs=0.08)
    assert cal.fit_temperature(logits / 2.0, y)["temperature"] == pytest.approx(0.5, rel=0.08)


def test_fit_temperature_is_deterministic_and_rejects_bad_shapes():
    logits, y = calibrated_logits(500, 3, seed=3)
    assert cal.fit_temperature(logits, y) == cal.fit_temperature(logits, y)
    with pytest.raises(ValueError):
        cal.fit_temperature(logits, y[:-1])


def test_thresholds_maximise_f1():
    # Label 0 positives sit at 0.3-0.4, negatives at 0.1: the best threshold is in (0.1, 0.3].
    probs = np.array([[0.3, 0.9], [0.4, 0.8], [0.1, 0.2], [0.1, 0.1]])
    Y = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])
    thr = cal.tune_thresholds(probs, Y)
    assert 0.1 < thr[0] <= 0.3
    assert thr[1] == 0.5  # 0.5 already separates label 1 perfectly; ties go to the value nearest 0.5
    m = cal.multi_label_metrics(probs, Y, thr)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert cal.multi_label_metrics(probs, Y, np.array([0.5, 0.5]))["accuracy"] == 0.5
