"""Calibration math: scoring rules, reliability bins, temperature scaling, thresholds.

Everything here is numpy over logits/probabilities, so it is exact, fast and
testable on constructed numbers without a model. Conventions:
- single-label: `probs` is [n, k] (rows sum to 1), `y` is [n] int class ids;
  confidence is the top probability, a prediction is correct when argmax == y.
- multi-label: `probs` is [n, k] independent sigmoid outputs, `Y` is [n, k] 0/1.
"""
from __future__ import annotations

import math

import numpy as np

# T is searched in [T_MIN, T_MAX]: a trained classifier is never calibrated by a
# temperature outside this (T=0.05 would be 20x sharper, T=20 near-uniform).
T_MIN, T_MAX = 0.05, 20.0
_EPS = 1e-12


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


# ---------------------------------------------------------------- scoring rules
def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(y)), y]
    return float(-np.log(np.clip(p, _EPS, 1.0)).mean())


def nll_from_logits(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Same as nll(softmax(logits / T)) but stable for very confident logits."""
    return float(-log_softmax(logits, temperature)[np.arange(len(y)), y].mean())


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of sum_k (p_k - [k == y])^2 (range 0..2)."""
    p = np.asarray(probs, dtype=np.float64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> list[dict]:
    """Equal-width confidence bins over [0, 1]: count, mean confidence, accuracy per bin.

    Bin b holds confidences in (b/B, (b+1)/B]; a confidence of exactly 0 goes to bin 0.
    Empty bins are kept (count 0, confidence/accuracy None) so plots show the gaps.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        out.append({
            "bin": b,
            "lower": b / bins,
            "upper": (b + 1) / bins,
            "count": n,
            "confidence": float(conf[m].mean()) if n else None,
            "accuracy": float(corr[m].mean()) if n else None,
        })
    return out


def ece_mce(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> tuple[float, float]:
    """Expected and maximum calibration error over equal-width bins.

    ECE = sum_b (n_b / N) |acc_b - conf_b|; MCE = max_b |acc_b - conf_b| over non-empty bins.
    """
    n = len(confidence)
    if n == 0:
        raise ValueError("ECE of zero predictions is undefined")
    ece, mce = 0.0, 0.0
    for b in reliability_bins(confidence, correct, bins):
        if b["count"]:
            gap = abs(b["accuracy"] - b["confidence"])
            ece += b["count"] / n * gap
            mce = max(mce, gap)
    return float(ece), float(mce)


# ---------------------------------------------------------------- temperature
def fit_temperature(logits: np.ndarray, y: np.ndarray) -> dict:
    """One scalar T minimising validation NLL of softmax(logits / T).

    NLL is convex in beta = 1/T (log-sum-exp is convex, the true-class term is
    linear), so it is unimodal in log T and a bounded Brent search on log T finds
    the global minimum deterministically: no learning rate, no init, no randomness.
    Returns temperature, NLL before/after on the fitting data and whether T hit a bound.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=int)
    if logits.ndim != 2 or len(logits) != len(y) or len(y) == 0:
        raise ValueError(f"fit_temperature needs [n, k] logits and n labels, got {logits.shape} and {y.shape}")
    res = minimize_scalar(lambda lt: nll_from_logits(logits, y, math.exp(lt)),
                          bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                          options={"xatol": 1e-6, "maxiter": 500})
    t = float(math.exp(res.x))
    nll_before = nll_from_logits(logits, y, 1.0)
    nll_after = nll_from_logits(logits, y, t)
    if nll_after > nll_before:  # never worse than doing nothing on the data it was fitted on
        t, nll_after = 1.0, nll_before
    return {
        "temperature": t,
        "nll_before": nll_before,
        "nll_after": nll_after,
        "at_bound": bool(t <= T_MIN * 1.001 or t >= T_MAX * 0.999),
        "rows": int(len(y)),
    }


# ---------------------------------------------------------------- classification metrics
def single_label_metrics(probs: np.ndarray, y: np.ndarray, num_labels: int, bins: int = 15) -> dict:
    from sklearn.metrics import f1_score

    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    e, m = ece_mce(conf, pred == y, bins)
    labels = list(range(num_labels))
    return {
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y, pred, labels=labels, average="weighted", zero_division=0)),
        "nll": nll(probs, y),
        "brier": brier(probs, y),
        "ece": e,
        "mce": m,
        "mean_confidence": float(conf.mean()),
    }


def entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)
    return -(p * np.log(p)).sum(axis=1)


# ---------------------------------------------------------------- multi-label
def tune_thresholds(probs: np.ndarray, Y: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per-label decision threshold maximising that label's F1 on validation.

    Ties go to the threshold closest to 0.5, and a label with no positive in
    validation keeps 0.5 (there is nothing to tune it on).
    """
    probs = np.asarray(probs, dtype=np.float64)
    Y = np.asarray(Y, dtype=int)
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2) if grid is None else np.asarray(grid)
    out = np.full(probs.shape[1], 0.5)
    for j in range(probs.shape[1]):
        pos = Y[:, j] == 1
        if not pos.any():
            continue
        best, best_f1 = 0.5, -1.0
        for t in sorted(grid, key=lambda g: abs(g - 0.5)):
            pred = probs[:, j] >= t
            tp = float((pred & pos).sum())
            f1 = 2 * tp / (pred.sum() + pos.sum()) if (pred.sum() + pos.sum()) else 0.0
            if f1 > best_f1 + 1e-12:
                best, best_f1 = float(t), f1
        out[j] = best
    return out


def multi_label_metrics(probs: np.ndarray, Y: np.ndarray, thresholds: np.ndarray, bins: int = 15) -> dict:
    """Subset accuracy, F1s at the given thresholds; NLL/Brier/ECE over every (row, label) probability."""
    from sklearn.metrics import f1_score

    probs = np.asarray(probs, dtype=np.float64)
    Y = np.asarray(Y, dtype=int)
    pred = (probs >= np.asarray(thresholds)[None, :]).astype(int)
    p = np.clip(probs, _EPS, 1 - _EPS)
    flat_p, flat_y = probs.ravel(), Y.ravel()
    # Binary reliability: in each bin, mean predicted P(label) vs observed frequency
    # of that label, i.e. ECE over every (row, label) pair.
    e, m = ece_mce(flat_p, flat_y, bins)
    return {
        "accuracy": float((pred == Y).all(axis=1).mean()),
        "macro_f1": float(f1_score(Y, pred, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(Y, pred, average="weighted", zero_division=0)),
        "micro_f1": float(f1_score(Y, pred, average="micro", zero_division=0)),
        "nll": float(-(Y * np.log(p) + (1 - Y) * np.log(1 - p)).mean()),
        "brier": float(((probs - Y) ** 2).mean()),
        "ece": float(e),
        "mce": float(m),
        "mean_confidence": float(np.maximum(probs, 1 - probs).mean()),
    }
