"""The guard's and the shadow judge's statistics on synthetic shadow logs with a known truth."""
from __future__ import annotations

import numpy as np

from domaintune.monitor import guard


def _log(n: int, acc_served: float, acc_shadow: float, seed: int, labelled: int = 0):
    """Shadow-log rows of two calibrated models on n requests: each is right with its accuracy, and its confidence
    is drawn so that it is calibrated (P(right | conf) = conf); labels for the first `labelled` ids."""
    rng = np.random.default_rng(seed)
    rows, labels = [], {}
    for i in range(n):
        truth = "a"
        side = {}
        for name, acc in (("served", acc_served), ("shadow", acc_shadow)):
            conf = float(np.clip(rng.normal(acc, 0.05), 0.34, 0.999))
            right = rng.random() < conf
            side[name] = {"version": name, "label": truth if right else rng.choice(["b", "c"]), "confidence": conf}
        rows.append({"id": str(i), **side})
        if i < labelled:
            labels[str(i)] = truth
    return rows, labels


def test_a_same_quality_pair_rolls_back_at_most_once_in_20_seeded_runs():
    worse = sum(guard.judge(*_log(600, 0.85, 0.85, seed)[:1], new="served", max_regression=0.005,
                            seed=seed)["worse"] for seed in range(20))
    assert worse <= 1


def test_a_clearly_worse_new_champion_is_caught_by_estimate_and_by_feedback():
    rows, labels = _log(800, 0.60, 0.90, seed=1, labelled=300)  # served (new) is 30 points worse
    est = guard.judge(rows, new="served", max_regression=0.005)
    assert est["basis"] == "estimate" and est["worse"] and est["high"] < -0.1
    fed = guard.judge(rows, new="served", max_regression=0.005, labels=labels)
    assert fed["basis"] == "feedback" and fed["labelled"] == 300 and fed["worse"]
    assert -0.4 < fed["diff"] < -0.2


def test_few_labels_leave_the_estimate_in_charge_and_agreement_is_exact_zero():
    rows, labels = _log(200, 0.8, 0.8, seed=2, labelled=guard.MIN_LABELS - 1)
    d, basis, n = guard.differences(rows, "shadow", labels)
    assert basis == "estimate" and n == guard.MIN_LABELS - 1
    agree = np.array([r["served"]["label"] == r["shadow"]["label"] for r in rows])
    assert (d[agree] == 0).all() and agree.sum() > 0


def test_a_better_challenger_is_not_worse_and_the_bootstrap_is_seeded():
    rows, _ = _log(800, 0.80, 0.92, seed=3)
    a = guard.judge(rows, new="shadow", max_regression=0.005, seed=7)
    assert a["not_worse"] and not a["worse"] and a["diff"] > 0
    assert a == guard.judge(rows, new="shadow", max_regression=0.005, seed=7)
    assert guard.pair_rows(rows, "served", "shadow") == rows and guard.pair_rows(rows, "v1", "shadow") == []
