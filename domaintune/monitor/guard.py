"""Two models on the same live requests: is the new one worse than the old one? (shadow promotion, the guard)

The evidence is the shadow log (domaintune/serve/shadow.py): per request text, both models' label and
calibrated confidence, under one id. The difference judged is new minus old accuracy, per text:
  with a feedback label   correct(new) - correct(old)                       (measured)
  without one             0 where they agree, conf(new) - conf(old) where they disagree   (estimated)
Where the two agree they are right or wrong together, so only disagreements can separate them, and on a
disagreement each model's calibrated confidence in its own label estimates its chance of being right
(this assumes calibration carries over to live traffic: labels, where they exist, are used instead).
Labelled rows are used alone once there are `min_labels` of them: estimates are not mixed with measurements.

A seeded bootstrap of the mean difference gives a 95% interval:
  a challenger in shadow is promoted when the interval's lower bound is above -max_regression
  (non-inferiority, as for the offline comparison), and rejected otherwise;
  a newly promoted champion is rolled back when the interval's upper bound is below -max_regression
  (worse, at 95%): a same-quality pair rolls back in at most ~2.5% of judgements.
"""
from __future__ import annotations

import numpy as np

MIN_LABELS = 30  # labelled rows needed before feedback alone decides (fewer: too noisy to beat the estimate)


def bootstrap_mean(d: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of `d` with a percentile bootstrap interval (seeded, vectorised in chunks)."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("no rows to judge")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 2_000_000 // n)
    for start in range(0, resamples, step):
        k = min(step, resamples - start)
        means[start:start + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "rows": n,
            "resamples": resamples, "level": level}


def pair_rows(rows: list[dict], served: str, shadow: str) -> list[dict]:
    """The shadow-log rows where `served` answered and `shadow` ran beside it."""
    return [r for r in rows if r["served"].get("version") == served and r["shadow"].get("version") == shadow]


def differences(rows: list[dict], new: str, labels: dict | None = None) -> tuple[np.ndarray, str, int]:
    """(per-row new-minus-old differences, basis "feedback" | "estimate", labelled rows) for rows of one pair;
    `new` names the side ("served" or "shadow") of the model being judged."""
    old = "shadow" if new == "served" else "served"
    labels = labels or {}
    labelled = [r for r in rows if str(r.get("id")) in labels]
    if len(labelled) >= MIN_LABELS:
        d = [(r[new]["label"] == labels[str(r["id"])]) - (r[old]["label"] == labels[str(r["id"])]) for r in labelled]
        return np.asarray(d, dtype=np.float64), "feedback", len(labelled)
    d = [0.0 if r[new]["label"] == r[old]["label"] else float(r[new]["confidence"]) - float(r[old]["confidence"])
         for r in rows]
    return np.asarray(d, dtype=np.float64), "estimate", len(labelled)


def judge(rows: list[dict], new: str, max_regression: float, labels: dict | None = None, resamples: int = 1000,
          seed: int = 0) -> dict:
    """The evidence on one pair's rows: difference (new - old) with its interval, its basis, agreement, and the
    two verdicts: `not_worse` (lower bound > -max_regression) and `worse` (upper bound < -max_regression)."""
    d, basis, labelled = differences(rows, new, labels)
    out = bootstrap_mean(d, resamples, seed)
    agree = float(np.mean([r["served"]["label"] == r["shadow"]["label"] for r in rows]))
    out.update(basis=basis, labelled=labelled, agreement=agree, requests=len(rows), max_regression=max_regression,
               not_worse=out["low"] > -max_regression, worse=out["high"] < -max_regression)
    return out
