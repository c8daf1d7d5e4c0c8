"""Champion vs challenger statistics: the paired bootstrap's coverage on synthetic models with a known
population difference, its exact cases, and the rows a fair comparison may use."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score

from domaintune.data.textnorm import row_key
from domaintune.evaluate.compare import fair_rows, paired_bootstrap


def simulate(rng, n: int, priors: np.ndarray, pa: float, pb: float, rho: float):
    """Rows with labels drawn from `priors`; model a is right with probability pa, b with pb, on the same
    rows with correlated luck (b reuses a's uniform draw with probability rho: marginals stay pa, pb);
    a wrong answer is uniform over the other labels."""
    k = len(priors)
    y = rng.choice(k, size=n, p=priors)
    u = rng.random(n)
    v = np.where(rng.random(n) < rho, u, rng.random(n))
    a = np.where(u < pa, y, (y + rng.integers(1, k, n)) % k)
    b = np.where(v < pb, y, (y + rng.integers(1, k, n)) % k)
    return y, a, b


def population_macro_f1(priors: np.ndarray, p: float) -> float:
    """Macro-F1 of such a model on the population: per class TP = pi p, predicted = pi p + (1 - pi)(1 - p)/(k-1)."""
    k = len(priors)
    predicted = priors * p + (1 - priors) * (1 - p) / (k - 1)
    return float(np.mean(2 * priors * p / (priors + predicted)))


SIMULATIONS = 200


@settings(max_examples=2, deadline=None, derandomize=True)
@given(k=st.integers(2, 6), weights=st.lists(st.floats(0.4, 1.0), min_size=6, max_size=6),
       pa=st.floats(0.6, 0.95), gap=st.floats(-0.1, 0.1), rho=st.floats(0.0, 0.95))
@example(k=4, weights=[1.0] * 6, pa=0.85, gap=-0.03, rho=0.9)  # strongly paired: an unpaired bootstrap over-covers
@example(k=2, weights=[1.0, 0.4, 1, 1, 1, 1], pa=0.7, gap=0.05, rho=0.0)
def test_interval_covers_the_population_difference_at_the_stated_rate(k, weights, pa, gap, rho):
    pb = min(max(pa + gap, 0.55), 0.97)
    priors = np.array(weights[:k]) / sum(weights[:k])
    truth = {"accuracy": pb - pa, "macro_f1": population_macro_f1(priors, pb) - population_macro_f1(priors, pa)}
    covered = {m: 0 for m in truth}
    for sim in range(SIMULATIONS):
        rng = np.random.default_rng(1000 + sim)
        y, a, b = simulate(rng, 400, priors, pa, pb, rho)
        res = paired_bootstrap(y, a, b, k, resamples=400, seed=sim)
        for m in truth:
            covered[m] += res[m]["low"] <= truth[m] <= res[m]["high"]
    for m, c in covered.items():
        assert 0.90 <= c / SIMULATIONS <= 0.99, (m, c / SIMULATIONS, truth[m])


def test_full_sample_values_are_evaluates_metrics_and_diff_is_b_minus_a():
    rng = np.random.default_rng(0)
    y, a, b = simulate(rng, 2000, np.full(5, 0.2), 0.8, 0.75, 0.5)
    res = paired_bootstrap(y, a, b, 7, resamples=200)  # labels 5 and 6 absent: not averaged in
    for name, pred in (("a", a), ("b", b)):
        assert res["accuracy"][name] == pytest.approx((pred == y).mean())
        assert res["macro_f1"][name] == pytest.approx(f1_score(y, pred, labels=np.unique(y), average="macro"))
    for m in ("accuracy", "macro_f1"):
        assert res[m]["diff"] == pytest.approx(res[m]["b"] - res[m]["a"])
        assert res[m]["low"] < res[m]["diff"] < res[m]["high"] < 0  # b is 5 points worse on 2,000 rows
    assert (res["rows"], res["resamples"], res["level"]) == (2000, 200, 0.95)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(2, 9), seed=st.integers(0, 2**32 - 1))
def test_identical_models_differ_by_exactly_zero_and_a_seeded_call_repeats(n, k, seed):
    rng = np.random.default_rng(seed)
    y, a, b = rng.integers(0, k, n), rng.integers(0, k, n), rng.integers(0, k, n)
    same = paired_bootstrap(y, a, a.copy(), k, resamples=100, seed=seed)
    for m in ("accuracy", "macro_f1"):
        assert same[m]["diff"] == same[m]["low"] == same[m]["high"] == 0.0
    first = paired_bootstrap(y, a, b, k, resamples=100, seed=seed)
    assert paired_bootstrap(y, a, b, k, resamples=100, seed=seed) == first
    swapped = paired_bootstrap(y, b, a, k, resamples=100, seed=seed)  # same resamples: the mirror interval
    for m in ("accuracy", "macro_f1"):
        assert swapped[m]["diff"] == pytest.approx(-first[m]["diff"])
        assert swapped[m]["low"] == pytest.approx(-first[m]["high"])


def test_bad_inputs_are_refused():
    y = np.array([0, 1, 1])
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap(y, y, y[:2], 2)
    with pytest.raises(ValueError, match=r"label ids in \[0, 2\)"):
        paired_bootstrap(y, y, np.array([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="no rows"):
        paired_bootstrap(y[:0], y[:0], y[:0], 2)


def test_row_key_is_dedupes_normal_form_hashed():
    assert row_key("Card  LOST\u00a0again ") == row_key("card lost again")  # case, no-break space, runs of space
    assert row_key("ﬁle") == row_key("FILE")  # NFKC ligature, casefold
    assert row_key("card lost") != row_key("card lost!")
    assert row_key("x") == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"  # sha256(b"x")


def test_fair_rows_leave_out_rows_seen_by_id_or_by_text():
    test = pd.DataFrame({"id": ["t1", "t2", "t3", "t4"], "label": ["a", "b", "a", "b"],
                         "text": ["refund please", "LOGIN broken", "where is my parcel", "new one"]})
    mask, excluded = fair_rows(test, seen_ids={"t1"}, seen_keys={row_key("login  broken")})
    assert mask.tolist() == [False, False, True, True] and excluded == 2
    mask, excluded = fair_rows(test, set(), set())
    assert mask.all() and excluded == 0
