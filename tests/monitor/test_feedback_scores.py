"""Feedback scoring on hand-checked numbers, and the guard's paired comparison on feedback labels."""
from __future__ import annotations

import numpy as np
import pytest

from domaintune.monitor.feedback import compare_on_feedback, score_versions

# labels a, b; truth a b b b.  v1 says a .9, a .8, b .7, b .6   v2 says b .6, b .9, b .8, a .95
TRUTH = ["a", "b", "b", "b"]
V1 = [("a", 0.9), ("a", 0.8), ("b", 0.7), ("b", 0.6)]
V2 = [("b", 0.6), ("b", 0.9), ("b", 0.8), ("a", 0.95)]


def rows_of(version: str, answers, ids=None) -> list[dict]:
    out = []
    for i, ((pred, conf), true) in enumerate(zip(answers, TRUTH)):
        probs = [conf, 1 - conf] if pred == "a" else [1 - conf, conf]
        out.append({"id": (ids or [f"id{k}" for k in range(4)])[i], "version": version, "role": "served",
                    "label": true, "predicted": pred, "labels": ["a", "b"], "probabilities": probs,
                    "multi_label": False})
    return out


def test_scores_by_hand():
    got = score_versions(rows_of("v1", V1) + rows_of("v2", V2))
    # v1: right 3 of 4; F1(a) = 2/3 (P 1/2, R 1), F1(b) = 4/5 (P 1, R 2/3); one row per 15-bin confidence bin:
    # ECE = (|1-.9| + |0-.8| + |1-.7| + |1-.6|) / 4 = 0.4
    assert got["v1"]["rows"] == 4 and got["v1"]["accuracy"] == 0.75
    assert got["v1"]["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2) and got["v1"]["ece"] == pytest.approx(0.4)
    # v2: right 2 of 4; F1(a) = 0, F1(b) = 2/3; ECE = (.6 + .1 + .2 + .95) / 4
    assert got["v2"]["accuracy"] == 0.5 and got["v2"]["macro_f1"] == pytest.approx(1 / 3)
    assert got["v2"]["ece"] == pytest.approx(0.4625)


def test_compare_uses_only_ids_both_answered():
    rows = rows_of("v1", V1) + rows_of("v2", V2) + rows_of("v3", V2, ids=["x0", "x1", "x2", "x3"])
    c = compare_on_feedback(rows, "v1", "v2", resamples=2000, seed=1)
    assert c["rows"] == 4 and c["a"] == 0.75 and c["b"] == 0.5 and c["diff"] == -0.25
    assert c["low"] <= -0.25 <= c["high"] and c["low"] >= -1 and c["high"] <= 1
    assert compare_on_feedback(rows, "v1", "v2", resamples=2000, seed=1) == c  # seeded
    none = compare_on_feedback(rows, "v1", "v3")
    assert none["rows"] == 0 and none["diff"] is None and none["low"] is None


def test_the_interval_covers_a_known_difference_at_the_stated_rate():
    """Synthetic paired correctness with a known accuracy difference (b - a = -0.109): the 95% interval covers it
    in about 95% of 300 seeded draws (binomial sd 1.3 points: 90% is a 4-sd miss)."""
    rng = np.random.default_rng(0)
    n, covered = 400, 0
    for seed in range(300):
        a = rng.random(n) < 0.85
        b = np.where(rng.random(n) < 0.9, a, ~a) & (rng.random(n) < 0.95)  # correlated with a, a little worse
        true = 0.85 * (0.9 * 0.95) + 0.15 * 0.1 * 0.95 - 0.85
        rows = [{"id": str(i), "version": v, "label": "y", "predicted": "y" if ok else "n"}
                for v, arr in (("a", a), ("b", b)) for i, ok in enumerate(arr)]
        c = compare_on_feedback(rows, "a", "b", resamples=1000, seed=seed)
        covered += c["low"] <= true <= c["high"]
    assert 0.9 <= covered / 300 <= 0.99
