"""Two-sample drift statistics with a null calibrated on resamples of the reference, and the
label-free accuracy estimate (CBPE-style) of a batch.

Every signal is a size-normalised two-sample statistic T whose distribution under "the batch
is drawn like the reference" does not depend on the batch size m (asymptotically):
  ks      n*m/(n+m) * D^2, D the Kolmogorov-Smirnov distance of the two empirical CDFs
  chi2    the 2 x K homogeneity chi-square of the predicted-label counts
  mmd     n*m/(n+m) * ||mean phi(ref) - mean phi(batch)||^2, phi random Fourier features of a
          Gaussian kernel on the L2-normalised embeddings (a linear-time MMD^2)
The null of T is measured, not assumed: at baseline time the reference is split at random into a
pseudo-batch of m rows and a pseudo-reference of the rest, for several m, and T is computed on
each split (a permutation null). A scaled chi-square a*chi2(nu) is fitted to each m's resamples
by their mean and variance; a batch's p-value is the LARGEST of those fits' tail probabilities
(the most conservative batch size), so it holds at any size. For the K-S signals the p-value is
also never below Kolmogorov's asymptotic tail P(K > sqrt(T)): exact for continuous features and
conservative under ties, it guards the tail that a two-moment fit understates for statistics that
are mostly zero (rates that are 0 for most texts). With K signals, each is tested at
false_alarm_rate / K (Bonferroni): an iid batch alarms with probability <= false_alarm_rate.

Effect sizes (drift.min_effect): a large enough batch makes any real difference significant, so a
signal also needs a practically relevant size. Each effect is on one scale, a lower bound on the
share of texts that would have to change for the batch to look like the reference (the total
variation distance TV, "one text in ten" at 0.1):
  ks      the K-S distance D (D <= TV)
  chi2    TV between the predicted-label mixes
  mmd     MMD / sqrt(1 + E_ref k(x, x')) (<= TV for a Gaussian kernel, see mmd_effect)
Plug-in distances are inflated by sampling noise, most at small batches; each is debiased by
subtracting its expected null value in quadrature (excess_distance, tv_effect).
Nothing here imports torch: arrays in, numbers out.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Batch sizes the null is resampled at (capped at half the reference).
CALIBRATION_SIZES = (100, 300, 1000, 3000)
RFF_FEATURES = 512


def ks_statistic(ref_sorted: np.ndarray, batch: np.ndarray) -> float:
    """Size-normalised K-S statistic n*m/(n+m) * D^2 (ref_sorted must be sorted)."""
    b = np.sort(np.asarray(batch, dtype=np.float64))
    n, m = len(ref_sorted), len(b)
    grid = np.concatenate([ref_sorted, b])
    d = np.abs(np.searchsorted(ref_sorted, grid, "right") / n - np.searchsorted(b, grid, "right") / m).max()
    return float(n * m / (n + m) * d * d)


def chi2_statistic(ref_counts: np.ndarray, batch_counts: np.ndarray) -> float:
    """2 x K homogeneity chi-square of two count vectors (categories empty in both are skipped)."""
    r, c = np.asarray(ref_counts, float), np.asarray(batch_counts, float)
    n, m = r.sum(), c.sum()
    tot = r + c
    keep = tot > 0
    r, c, tot = r[keep], c[keep], tot[keep]
    er, ec = n * tot / (n + m), m * tot / (n + m)
    return float(((r - er) ** 2 / er).sum() + ((c - ec) ** 2 / ec).sum())


def mmd_statistic(ref_mean: np.ndarray, n: int, batch_phi: np.ndarray) -> float:
    """Size-normalised linear-time MMD^2 on random Fourier features."""
    m = len(batch_phi)
    diff = ref_mean - batch_phi.mean(axis=0)
    return float(n * m / (n + m) * float(diff @ diff))


def normalise(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def fit_rff(ref_emb: np.ndarray, seed: int, n_features: int = RFF_FEATURES) -> dict[str, np.ndarray]:
    """Random Fourier features of a Gaussian kernel whose bandwidth is the median distance between
    reference embeddings (the usual heuristic)."""
    rng = np.random.default_rng(seed)
    x = normalise(ref_emb)
    sub = x[rng.permutation(len(x))[:500]]
    d2 = np.maximum((sub ** 2).sum(1)[:, None] + (sub ** 2).sum(1)[None, :] - 2 * sub @ sub.T, 0)
    med = float(np.sqrt(np.median(d2[np.triu_indices(len(sub), 1)]))) if len(sub) > 1 else 1.0
    sigma = med if med > 0 else 1.0
    w = rng.normal(0.0, 1.0 / sigma, size=(x.shape[1], n_features)).astype(np.float32)
    b = rng.uniform(0, 2 * math.pi, size=n_features).astype(np.float32)
    return {"rff_w": w, "rff_b": b, "rff_sigma": np.array([sigma], dtype=np.float32)}


def rff_map(emb: np.ndarray, rff: dict[str, np.ndarray]) -> np.ndarray:
    w, b = rff["rff_w"], rff["rff_b"]
    return (np.sqrt(2.0 / w.shape[1]) * np.cos(normalise(emb) @ w + b)).astype(np.float64)


def calibration_sizes(n: int) -> list[int]:
    """Pseudo-batch sizes for a reference of n rows: the grid capped at n // 2 (at least 2)."""
    cap = max(2, n // 2)
    return sorted({min(s, cap) for s in CALIBRATION_SIZES})


def fit_scaled_chi2(values: np.ndarray) -> dict[str, float]:
    """a * chi2(nu) with the mean and variance of the resampled statistics (Satterthwaite)."""
    mu, var = float(np.mean(values)), float(np.var(values, ddof=1)) if len(values) > 1 else 0.0
    if mu <= 0 or var <= 0:
        return {"a": 0.0, "nu": 0.0, "mean": mu, "var": var}
    return {"a": var / (2 * mu), "nu": 2 * mu * mu / var, "mean": mu, "var": var}


def kolmogorov_pvalue(t: float) -> float:
    """P(K > sqrt(T)) for Kolmogorov's limit K of sqrt(nm/(n+m)) * D: the asymptotic two-sample K-S
    p-value (conservative when the feature has ties)."""
    from scipy.stats import kstwobign

    return float(kstwobign.sf(math.sqrt(t))) if t > 0 else 1.0


def null_pvalue(t: float, fits: Sequence[dict], ks: bool = False) -> float:
    """The largest tail probability of T over the per-size null fits (conservative in the size);
    for a K-S statistic (ks=True) at least Kolmogorov's asymptotic p-value (module docstring).
    A degenerate fit (the statistic was 0 in every resample: e.g. a feature constant in the
    reference) falls back to the K-S/Kolmogorov bound 2*exp(-2T), which is conservative for ties."""
    from scipy.stats import chi2

    ps = []
    for f in fits:
        if f["a"] > 0 and f["nu"] > 0:
            ps.append(float(chi2.sf(t / f["a"], f["nu"])))
        else:
            ps.append(min(1.0, 2.0 * math.exp(-2.0 * t)) if t > 0 else 1.0)
    if ks:
        ps.append(kolmogorov_pvalue(t))
    return max(ps) if ps else 1.0


def null_mean(fits: Sequence[dict]) -> float:
    """E[T] under the null: the largest resampled mean over the batch sizes (0 without fits)."""
    return max((float(f["mean"]) for f in fits), default=0.0)


def excess_distance(t: float, mean_null: float, n: int, m: int) -> float:
    """The distance e behind a size-normalised T = nm/(n+m) * e^2 (the K-S D, the MMD), debiased:
    sqrt(max(0, e^2 - E_null[e^2])), E_null[e^2] = E_null[T] * (1/n + 1/m)."""
    return math.sqrt(max(0.0, (t - mean_null) * (1.0 / n + 1.0 / m)))


def mmd_effect(mmd: float, ref_phi_mean: np.ndarray) -> float:
    """MMD on the TV scale: for Q = (1 - e) P + e R, MMD(P, Q) = e MMD(P, R) and MMD(P, R)^2 =
    E_P k + E_R k - 2 E k(P, R) <= E_P k + 1 (Gaussian kernel: 0 <= k <= 1), so
    MMD / sqrt(1 + E_P k) <= e for every such mixture, hence <= TV. E_P k ~ |mean phi(ref)|^2."""
    return float(mmd / math.sqrt(1.0 + float(ref_phi_mean @ ref_phi_mean)))


def tv_effect(ref_counts: np.ndarray, batch_counts: np.ndarray, draws: int = 200, seed: int = 0) -> float:
    """Total variation distance between two count vectors' mixes, debiased in quadrature by its mean
    square when both are drawn from the pooled mix (multinomial simulation; exact at any size)."""
    r, c = np.asarray(ref_counts, float), np.asarray(batch_counts, float)
    n, m = int(r.sum()), int(c.sum())
    tv = 0.5 * float(np.abs(r / n - c / m).sum())
    pooled = (r + c) / (n + m)
    rng = np.random.default_rng(seed)
    null = 0.5 * np.abs(rng.multinomial(n, pooled, size=draws) / n - rng.multinomial(m, pooled, size=draws) / m)
    noise2 = float((null.sum(axis=1) ** 2).mean())
    return math.sqrt(max(0.0, tv * tv - noise2))


def resample_null(n: int, sizes: Sequence[int], resamples: int, seed: int, statistic) -> list[dict]:
    """Fit the null of `statistic(batch_idx, ref_idx) -> dict[signal, T]` per pseudo-batch size.
    Returns [{"size": m, "fits": {signal: fit}}]."""
    rng = np.random.default_rng(seed)
    out = []
    for m in sizes:
        draws: dict[str, list[float]] = {}
        for _ in range(resamples):
            perm = rng.permutation(n)
            for name, t in statistic(perm[:m], perm[m:]).items():
                draws.setdefault(name, []).append(t)
        out.append({"size": int(m), "fits": {k: fit_scaled_chi2(np.array(v)) for k, v in draws.items()}})
    return out


def estimated_performance(probs: np.ndarray, z: float = 1.96, boot: int = 100, seed: int = 0) -> dict:
    """CBPE-style estimate from calibrated probabilities [m, K] (no labels):
    expected accuracy = mean max probability, with a Poisson-binomial interval (the batch's
    correctness indicators are independent Bernoulli(max prob) if the model is calibrated);
    expected macro-F1 from the expected confusion matrix C[true j, predicted k] = sum_i p_ij
    over the texts predicted k, with a Poisson-bootstrap interval."""
    probs = np.asarray(probs, dtype=np.float64)
    m, k = probs.shape
    pred = probs.argmax(axis=1)
    conf = probs[np.arange(m), pred]
    acc = float(conf.mean())
    sd = float(math.sqrt(float((conf * (1 - conf)).sum())) / m)
    onehot = np.zeros_like(probs)
    onehot[np.arange(m), pred] = 1.0
    tp_rows = onehot * conf[:, None]          # the row's expected true positive, at its predicted class
    rows = np.hstack([tp_rows, onehot, probs])  # per-row contributions to TP_k, predicted_k, true_k

    total = rows.sum(axis=0)
    # Classes that count, as sklearn's macro average counts labels present in y_true or y_pred: predicted
    # at least once, or expected at least half a time (not the 1e-5 tails of every softmax).
    present = (total[k:2 * k] >= 1) | (total[2 * k:] >= 0.5)

    def macro_f1(sums: np.ndarray) -> np.ndarray:
        tp, npred, ntrue = sums[..., :k], sums[..., k:2 * k], sums[..., 2 * k:]
        denom = npred + ntrue          # = 2TP + FP + FN
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        return f1[..., present].mean(axis=-1)

    f1 = float(macro_f1(total))
    w = np.random.default_rng(seed).poisson(1.0, size=(boot, m)).astype(np.float64)
    f1_boot = macro_f1(w @ rows)
    lo, hi = np.quantile(f1_boot, [0.025, 0.975])
    return {"accuracy": acc, "accuracy_sd": sd, "accuracy_low": max(0.0, acc - z * sd),
            "accuracy_high": min(1.0, acc + z * sd), "macro_f1": f1, "macro_f1_low": float(lo),
            "macro_f1_high": float(hi)}


def one_sided_z(level: float) -> float:
    from scipy.stats import norm

    return float(norm.isf(level))


# ---------------------------------------------------------------- accuracy with calibration uncertainty
# The ridge that pulls the confidence -> P(correct) map towards the identity (trust the model's own
# calibrated confidence): as strong as about one validation row, so it only matters on tiny sets.
RECALIBRATION_PRIOR = 1.0
ACCURACY_BOOTSTRAP = 200
_CLIP = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _CLIP, 1.0 - _CLIP)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def fit_recalibration(confidence: np.ndarray, correct: np.ndarray, weights: np.ndarray | None = None,
                      prior: float = RECALIBRATION_PRIOR, iterations: int = 50) -> np.ndarray:
    """P(correct | confidence c) = sigmoid(a + b * logit(c)), fitted by penalised maximum likelihood
    (Newton; penalty prior/2 * (a^2 + (b - 1)^2), i.e. towards P = c) on validation rows.
    `weights` [B, n] fits B weighted copies at once (bootstrap counts); returns [B, 2] (a, b),
    or [2] without weights. With the intercept, sum_i w_i P(c_i) = sum_i w_i correct_i at the optimum
    (up to the prior): the map reproduces the validation accuracy it was fitted on."""
    x = _logit(confidence)
    y = np.asarray(correct, dtype=np.float64)
    single = weights is None
    w = np.ones((1, len(x))) if single else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    theta = np.tile([0.0, 1.0], (len(w), 1))
    for _ in range(iterations):
        p = _sigmoid(theta[:, :1] + theta[:, 1:] * x)
        r, h = w * (y - p), w * p * (1.0 - p)
        g0 = r.sum(1) - prior * theta[:, 0]
        g1 = (r * x).sum(1) - prior * (theta[:, 1] - 1.0)
        h00, h01, h11 = h.sum(1) + prior, (h * x).sum(1), (h * x * x).sum(1) + prior
        det = h00 * h11 - h01 * h01
        step = np.stack([(h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det], axis=1)
        theta = theta + step
        if np.abs(step).max() < 1e-9:
            break
    return theta[0] if single else theta


def recalibrated(confidence: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """P(correct) of each confidence under one map [2] -> [m], or under B maps [B, 2] -> [B, m]."""
    x = _logit(confidence)
    theta = np.asarray(theta, dtype=np.float64)
    if theta.ndim == 1:
        return _sigmoid(theta[0] + theta[1] * x)
    return _sigmoid(theta[:, :1] + theta[:, 1:] * x[None, :])


def batch_sampling_var(p: np.ndarray, groups: Sequence | np.ndarray | None = None) -> float:
    """Variance of a batch's measured accuracy given each text's P(correct) `p` [m]: the texts' outcomes are
    independent Bernoulli(p_i) (Poisson-binomial, sum p_i (1 - p_i) / m^2), except that texts of one group
    (`groups`: the same value for identical texts) share one outcome, since the same text gets the same
    prediction: a group of c copies adds c^2 p (1 - p). A batch that repeats its texts carries the information
    of its distinct texts only."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if groups is None:
        return float((p * (1.0 - p)).sum()) / (m * m)
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    count = np.bincount(inverse)
    share = np.bincount(inverse, weights=p) / count      # one P per group (identical texts: identical P)
    return float((count * count * share * (1.0 - share)).sum()) / (m * m)


def class_offsets(residual: np.ndarray, p: np.ndarray, classes: np.ndarray, k: int,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """Per-predicted-class calibration offsets, shrunk by empirical Bayes: [k], or [B, k] with `weights` [B, n].

    The confidence -> P(correct) map is one curve for every class; a class the model is over- or under-confident
    on at the same confidence leaves a mean residual r_k = mean(correct - P) over the n_k validation rows predicted
    k. Taken raw, r_k is mostly noise (a class has a handful of rows); each is treated as a random effect,
    r_k ~ (offset_k, s2 / n_k) with offset_k ~ (0, tau2), s2 the rows' mean P (1 - P) (the Bernoulli variance the
    map implies). tau2 is the method-of-moments (DerSimonian-Laird) estimate from the spread of the r_k around
    their weighted mean, floored at 0; the offset is the posterior mean r_k * n_k / (n_k + s2 / tau2): 0 for every
    class when the classes differ no more than noise would make them, r_k for a class with many rows that
    really differs. Classes with no validation rows get 0."""
    residual, p = np.asarray(residual, np.float64), np.asarray(p, np.float64)
    single = weights is None
    w = np.ones((1, residual.shape[-1])) if single else np.atleast_2d(np.asarray(weights, np.float64))
    r, pp = np.atleast_2d(residual), np.atleast_2d(p)
    onehot = np.zeros((len(classes), k))
    onehot[np.arange(len(classes)), classes] = 1.0
    total = w.sum(axis=1, keepdims=True)
    nk = w @ onehot                                              # [B, k] rows predicted k (bootstrap counts)
    present = nk > 0
    safe = np.where(present, nk, 1.0)
    rk = np.where(present, ((w * r) @ onehot) / safe, 0.0)
    s2 = (w * pp * (1.0 - pp)).sum(axis=1, keepdims=True) / total
    share = nk / total
    mean = (share * rk).sum(axis=1, keepdims=True)
    between = (share * (rk - mean) ** 2).sum(axis=1, keepdims=True)
    classes_seen = present.sum(axis=1, keepdims=True)
    # E[between] = tau2 * (1 - sum share^2) + s2 * (classes - 1) / n under the model above
    tau2 = np.maximum(0.0, between - s2 * (classes_seen - 1) / total) / np.maximum(1.0 - (share ** 2).sum(
        axis=1, keepdims=True), 1e-12)
    real = present & (tau2 > 0)
    shrink = np.where(real, nk * tau2 / np.where(real, nk * tau2 + s2, 1.0), 0.0)
    out = shrink * rk
    return out[0] if single else out


def _class_codes(predicted, ref_predicted) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """Integer codes of the batch's and the validation rows' predicted labels on one axis."""
    if predicted is None or ref_predicted is None:
        return None, None, 0
    ref = np.asarray(ref_predicted).astype(str)
    batch = np.asarray(predicted).astype(str)
    names, codes = np.unique(np.concatenate([ref, batch]), return_inverse=True)
    return codes[len(ref):], codes[:len(ref)], len(names)


def estimated_accuracy(confidence: np.ndarray, ref_confidence: np.ndarray, ref_correct: np.ndarray,
                       z: float = 1.96, boot: int = ACCURACY_BOOTSTRAP, seed: int = 0,
                       prior: float = RECALIBRATION_PRIOR, groups: Sequence | np.ndarray | None = None,
                       predicted: Sequence | np.ndarray | None = None,
                       ref_predicted: Sequence | np.ndarray | None = None) -> dict:
    """The label-free accuracy of a batch from its calibrated top probabilities `confidence` [m], with an
    interval that holds both sources of error:
      calibration  the confidence -> P(correct) map (fit_recalibration) is fitted on the n validation rows
                   the temperature was fitted on (`ref_confidence`, `ref_correct`); with the predicted labels
                   of the batch and of those rows (`predicted`, `ref_predicted`) each text's P also gets its
                   predicted class's offset (class_offsets: how much more or less often than the map says the
                   validation rows predicted that class were right, shrunk by empirical Bayes), so a batch whose
                   mix of predicted classes differs from validation's is judged by its own classes. Map and
                   offsets are refitted on `boot` bootstrap resamples of the validation rows, and the spread of
                   the batch's estimate over the refits is its calibration variance;
      sampling     given the map, the batch's correctness indicators are independent Bernoulli(P_i)
                   (Poisson-binomial variance sum P_i (1 - P_i) / m^2), identical texts (`groups`, e.g. the
                   texts themselves) sharing one outcome (batch_sampling_var).
    Interval: estimate +- z * sqrt(both). The reference's estimate is the same estimator on the validation
    rows (like with like), and the drop (reference estimate - batch estimate) gets its own standard error
    from the same refits (the calibration error the two share cancels) plus the batch's sampling variance."""
    conf = np.asarray(confidence, dtype=np.float64)
    ref_conf = np.asarray(ref_confidence, dtype=np.float64)
    ref_ok = np.asarray(ref_correct, dtype=np.float64)
    n = len(ref_conf)
    theta = fit_recalibration(ref_conf, ref_ok, prior=prior)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=boot).astype(np.float64)
    thetas = fit_recalibration(ref_conf, ref_ok, counts, prior=prior)
    p, p_b = recalibrated(conf, theta), recalibrated(conf, thetas)
    ref_p, ref_p_b = recalibrated(ref_conf, theta), recalibrated(ref_conf, thetas)
    batch_class, ref_class, k = _class_codes(predicted, ref_predicted)
    if k:
        offset = class_offsets(ref_ok - ref_p, ref_p, ref_class, k)
        offset_b = class_offsets(ref_ok[None, :] - ref_p_b, ref_p_b, ref_class, k, counts)
        p = np.clip(p + offset[batch_class], 0, 1)
        ref_p = np.clip(ref_p + offset[ref_class], 0, 1)
        for have, extra in ((p_b, offset_b[:, batch_class]), (ref_p_b, offset_b[:, ref_class])):
            have += extra                               # in place: [boot, m] arrays of large batches
            np.clip(have, 0, 1, out=have)
    acc = float(p.mean())
    ref_acc = float(ref_p.mean())
    sampling_var = batch_sampling_var(p, groups)
    acc_b = p_b.mean(axis=1)
    ref_b = (ref_p_b * counts).sum(axis=1) / n
    calibration_var = float(np.var(acc_b, ddof=1))
    sd = math.sqrt(sampling_var + calibration_var)
    drop_sd = math.sqrt(sampling_var + float(np.var(ref_b - acc_b, ddof=1)))
    return {"accuracy": acc, "accuracy_sd": sd, "accuracy_low": max(0.0, acc - z * sd),
            "accuracy_high": min(1.0, acc + z * sd), "sampling_sd": math.sqrt(sampling_var),
            "calibration_sd": math.sqrt(calibration_var), "reference_accuracy": ref_acc,
            "drop": ref_acc - acc, "drop_sd": drop_sd, "calibration_rows": n,
            "calibration_errors": int(n - ref_ok.sum()), "recalibration": [float(theta[0]), float(theta[1])],
            "class_offsets": bool(k)}
