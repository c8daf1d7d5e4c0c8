"""Calibrated abstention (out-of-scope detection): the scores, their fitting, the threshold, the metrics.

Every score is an *in-scope score*: higher means more like the training labels, and the model abstains
(answers `evaluate.abstain.label`, "out_of_scope" by default) on a text whose score is below the threshold.
- max_prob     the top calibrated probability, max softmax(logits / T) (Hendrycks & Gimpel 2017)
- energy       minus the energy of the calibrated logits: T * logsumexp(logits / T) (Liu et al. 2020)
- mahalanobis  minus the smallest Mahalanobis distance of the fine-tuned encoder's mean-pooled text vector to
               a class mean, with one covariance shared by the classes (Lee et al. 2018; Podolskiy et al. 2021
               on fine-tuned transformers). Class means and the covariance are fitted on the *train* split's
               vectors; the covariance is Ledoit-Wolf shrunk (sklearn.covariance.LedoitWolf), since with a few
               rows per class and a 384-wide vector the plain estimate is singular or near it.
- trained      minus the out-of-scope logit of a class-balanced logistic-regression detector on the same vectors,
               fitted to separate the *train* split's rows from `oos_texts` (the "oos-train" baselines of CLINC150,
               Larson et al. 2019). It needs `oos_texts`, and it detects the kinds of foreign text it was shown:
               its numbers on out-of-scope texts of the same kinds are no estimate for unseen kinds (the
               unsupervised scores above are). The vectors are standardised for the fit and the scaling folded
               into the stored weights, so the score is one affine map of the vector: -(x @ coef + intercept).
The threshold is fitted on the *validation* split only (never test): the largest one that keeps at least
`in_scope_recall` of the validation rows (abstentions on them are the price of the out-of-scope ones caught).
`auto` picks the method with the best validation AUROC (validation rows vs `oos_texts`), else max_prob. With
`trained` among the candidates, `oos_texts` is split once, seeded (OOS_SPLIT_SEED): the detector compared is fitted
on one half, and every candidate's AUROC is measured on the other (held-out) half, so that no candidate is scored on
texts it was fitted on; the chosen detector is then refitted on all of `oos_texts` (its threshold, like every
method's, depends on the in-scope validation rows only).

The fitted abstention travels with the model: its JSON part (method, threshold, temperature, label) in
calibration.json and the export's model.json / ONNX config.json, the Mahalanobis arrays (class means,
precision matrix; the trained detector's coef and intercept) in abstain.safetensors beside them.
`Abstainer` applies it from logits (and vectors).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domaintune.core.errors import DataError
from domaintune.data.sources import read_file, read_lines
from domaintune.evaluate.calibration import softmax

METHODS = ("none", "max_prob", "energy", "mahalanobis", "trained", "auto")
SCORES = ("max_prob", "energy", "mahalanobis", "trained")  # the methods that are a score (auto picks one of them)
FEATURE_METHODS = ("mahalanobis", "trained")  # the scores measured on the text vector (the ONNX `pooled` output)
OOS_SPLIT_SEED = 0  # the split of oos_texts into the detector's fit half and the held-out half (auto, trained)
DETECTOR_C = 1.0  # inverse L2 strength of the trained detector (sklearn's default), on standardised vectors
ARRAYS_FILE = "abstain.safetensors"
FEATURES = "mean-pooled text vector of the fine-tuned encoder"


# ---------------------------------------------------------------- scores
def logsumexp(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def max_prob_score(logits: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(logits, temperature).max(axis=1)


def energy_score(logits: np.ndarray, temperature: float) -> np.ndarray:
    """-E(x) = T * logsumexp(logits / T): the free energy's negative (higher = in scope)."""
    return float(temperature) * logsumexp(np.asarray(logits, dtype=np.float64) / float(temperature))


def fit_mahalanobis(features: np.ndarray, y: np.ndarray, num_labels: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(class means [k, d], shared precision matrix [d, d], Ledoit-Wolf shrinkage) from train vectors.
    A class without train rows keeps a mean of NaN and is never the nearest."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=int)
    means = np.full((num_labels, x.shape[1]), np.nan)
    for c in np.unique(y):
        means[c] = x[y == c].mean(axis=0)
    lw = LedoitWolf(assume_centered=True).fit(x - means[y])
    return means, np.asarray(lw.precision_, dtype=np.float64), float(lw.shrinkage_)


def mahalanobis_score(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """-min_c (x - mu_c)^T P (x - mu_c)."""
    x = np.asarray(features, dtype=np.float64)
    mu = np.asarray(means, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    xp = x @ p
    d = (xp * x).sum(axis=1)[:, None] - 2 * xp @ np.nan_to_num(mu).T + ((mu @ p) * mu).sum(axis=1)[None, :]
    d = np.where(np.isnan(d), np.inf, d)
    return -d.min(axis=1)


def fit_detector(in_features: np.ndarray, oos_features: np.ndarray, seed: int = OOS_SPLIT_SEED,
                 ) -> tuple[np.ndarray, float]:
    """(coef [d], intercept) of a class-balanced logistic regression telling out-of-scope vectors (class 1)
    from in-scope ones (class 0), on standardised vectors with the scaling folded back in: the out-of-scope
    logit is x @ coef + intercept on the raw vector. Rounded to float32, as abstain.safetensors stores them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.r_[np.asarray(in_features, dtype=np.float64), np.asarray(oos_features, dtype=np.float64)]
    y = np.r_[np.zeros(len(in_features), dtype=int), np.ones(len(oos_features), dtype=int)]
    if len(in_features) == 0 or len(oos_features) == 0:
        raise ValueError("the trained detector needs in-scope train vectors and out-of-scope (oos_texts) vectors")
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(C=DETECTOR_C, class_weight="balanced", max_iter=5000, random_state=seed)
    lr.fit(scaler.transform(x), y)
    coef = lr.coef_[0] / scaler.scale_
    intercept = float(lr.intercept_[0] - coef @ scaler.mean_)
    return coef.astype(np.float32).astype(np.float64), float(np.float32(intercept))


def trained_score(features: np.ndarray, coef: np.ndarray, intercept: float) -> np.ndarray:
    """-(x @ coef + intercept): minus the detector's out-of-scope logit (higher = in scope)."""
    return -(np.asarray(features, dtype=np.float64) @ np.asarray(coef, dtype=np.float64) + float(intercept))


def split_oos(n: int, seed: int = OOS_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows) of n out-of-scope texts: a seeded permutation cut in half (held-out gets the
    odd one); both non-empty, so n >= 2."""
    if n < 2:
        raise ValueError(f"evaluate.abstain.oos_texts has {n} text(s): the trained detector needs at least 2 (one "
                         "to fit on, one held out to score it)")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


# ---------------------------------------------------------------- threshold and metrics
def fit_threshold(scores: np.ndarray, in_scope_recall: float) -> float:
    """A threshold t with share(scores >= t) >= in_scope_recall that abstains on as many of `scores` as that
    allows: halfway between the last score it abstains on and the first it keeps, so that float rounding of
    another runtime (ONNX, another batch padding) does not move a row across it."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("no validation scores to fit an abstention threshold on")
    k = min(int(math.floor(len(s) * (1.0 - in_scope_recall) + 1e-9)), len(s) - 1)  # rows allowed below
    if k == 0:
        return float(s[0] - 1e-6 * max(1.0, abs(s[0])))
    return float((s[k - 1] + s[k]) / 2)


def auroc(in_scores: np.ndarray, oos_scores: np.ndarray) -> float:
    """Probability that an in-scope text scores above an out-of-scope one (ties count half)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(in_scores)), np.zeros(len(oos_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, oos_scores]))


def fpr_at_95tpr(in_scores: np.ndarray, oos_scores: np.ndarray) -> float:
    """Share of out-of-scope texts accepted at the threshold that keeps 95% of the in-scope ones."""
    return float((np.asarray(oos_scores) >= fit_threshold(in_scores, 0.95)).mean())


def risk_coverage(scores: np.ndarray, correct: np.ndarray) -> list[dict]:
    """Selective risk (error rate of the answered rows) against coverage (share answered), most confident
    first: one point per distinct score."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s, c = np.asarray(scores, dtype=np.float64)[order], np.asarray(correct, dtype=bool)[order]
    n = len(s)
    answered = np.arange(1, n + 1)
    risk = 1.0 - np.cumsum(c) / answered
    last = np.r_[s[1:] != s[:-1], True]  # a point after the last row of each tied score
    step = max(1, int(last.sum()) // 200)  # at most ~200 points
    idx = np.flatnonzero(last)[::step]
    if len(idx) and idx[-1] != n - 1:
        idx = np.r_[idx, n - 1]
    return [{"coverage": float(answered[i] / n), "risk": float(risk[i]), "threshold": float(s[i])} for i in idx]


# ---------------------------------------------------------------- the applied abstention
@dataclass
class Abstainer:
    """A fitted abstention: `abstained(logits, features)` is True where the model answers `label`."""

    method: str
    threshold: float
    temperature: float = 1.0
    label: str = "out_of_scope"
    means: np.ndarray | None = None
    precision: np.ndarray | None = None
    coef: np.ndarray | None = None  # trained: the detector's out-of-scope weights [d] and intercept
    intercept: float | None = None

    @property
    def needs_features(self) -> bool:
        return self.method in FEATURE_METHODS

    def scores(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        if self.method == "max_prob":
            return max_prob_score(logits, self.temperature)
        if self.method == "energy":
            return energy_score(logits, self.temperature)
        if self.method == "mahalanobis":
            if features is None:
                raise ValueError("mahalanobis abstention needs the text vectors (mean_pooled) of the same pass")
            return mahalanobis_score(features, self.means, self.precision)
        if self.method == "trained":
            if features is None:
                raise ValueError("trained abstention needs the text vectors (mean_pooled) of the same pass")
            return trained_score(features, self.coef, self.intercept)
        raise ValueError(f"unknown abstention method {self.method!r}")

    def abstained(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        return self.scores(logits, features) < self.threshold

    def to_json(self) -> dict:
        return {"method": self.method, "threshold": float(self.threshold), "temperature": float(self.temperature),
                "label": self.label, "score": SCORE_TEXT[self.method],
                "rule": "abstain when score < threshold",
                **({"arrays": ARRAYS_FILE, "features": FEATURES} if self.needs_features else {})}

    def save_arrays(self, folder: str | Path) -> None:
        """abstain.safetensors: float32 class means [k, d] and precision [d, d] (mahalanobis), or the detector's
        coef [d] and intercept [1] (trained); nothing for the logit scores."""
        if not self.needs_features:
            return
        from safetensors.numpy import save_file

        arrays = ({"means": self.means, "precision": self.precision} if self.method == "mahalanobis"
                  else {"coef": self.coef, "intercept": np.array([self.intercept])})
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
                  str(Path(folder) / ARRAYS_FILE))

    @classmethod
    def from_json(cls, info: dict | None, folder: str | Path, source: str | Path) -> "Abstainer | None":
        """The abstention stored in `info` (a calibration.json / model.json "abstain" entry), arrays read from
        `folder`; None for no entry or method none. A broken entry is a DataError naming `source`."""
        if not info or info.get("method", "none") == "none":
            return None
        method, thr = info.get("method"), info.get("threshold")
        if method not in SCORES:
            raise DataError(source, None, "abstain.method", f"must be one of {list(SCORES)}, got {method!r}")
        if not isinstance(thr, (int, float)) or not math.isfinite(thr):
            raise DataError(source, None, "abstain.threshold", f"must be a finite number, got {thr!r}")
        out = cls(method, float(thr), float(info.get("temperature") or 1.0), str(info.get("label", "out_of_scope")))
        if out.needs_features:
            path = Path(folder) / ARRAYS_FILE
            if not path.is_file():
                raise DataError(path, None, None, f"missing: {method} abstention needs its arrays (class means and "
                                "precision, or the detector's coef and intercept; the evaluate stage writes them, "
                                "export copies them)")
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
            want = ("means", "precision") if method == "mahalanobis" else ("coef", "intercept")
            if missing := [k for k in want if k not in arrays]:
                raise DataError(path, None, missing[0], f"missing: {method} abstention needs arrays {list(want)}")
            if method == "mahalanobis":
                out.means, out.precision = arrays["means"].astype(np.float64), arrays["precision"].astype(np.float64)
            else:
                out.coef, out.intercept = arrays["coef"].astype(np.float64), float(arrays["intercept"][0])
        return out


SCORE_TEXT = {"max_prob": "max(softmax(logits / temperature))",
              "energy": "temperature * logsumexp(logits / temperature)",
              "mahalanobis": "-min over classes c of (x - means[c]) @ precision @ (x - means[c]), x the pooled "
                             "output",
              "trained": "-(x @ coef + intercept), x the pooled output: minus the out-of-scope logit of a "
                         "logistic-regression detector fitted on train rows against evaluate.abstain.oos_texts"}


# ---------------------------------------------------------------- out-of-scope text files
def read_texts(path: str | Path, key: str, text_column: str = "text") -> list[str]:
    """The texts of an out-of-scope file: .txt one per line, or a csv/tsv/jsonl/parquet `text` column.
    A bad file or row is one DataError naming file, row and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, f"{key}: no such file" if not path.exists() else f"{key}: not a file")
    if path.suffix.lower() == ".txt":
        texts = read_lines(path, key)
        rows = list(range(1, len(texts) + 1))
        field = "line"
    else:
        table = read_file(path)
        if text_column not in table.frame.columns:
            raise DataError(path, None, text_column, f"{key}: no column {text_column!r} "
                            f"(columns: {', '.join(map(str, table.frame.columns))})")
        for i, problems in sorted(table.bad.items()):
            for fld, _, detail in problems:
                if fld in (None, text_column):
                    raise DataError(path, table.rows[i], fld or text_column, detail)
        texts, rows, field = table.frame[text_column].tolist(), table.rows, text_column
    out = []
    for text, row in zip(texts, rows):
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, row, field, f"{key}: empty or missing text")
        out.append(text)
    if not out:
        raise DataError(path, None, field, f"{key}: no texts")
    return out


# ---------------------------------------------------------------- fitting and reporting
@dataclass
class Split:
    """The model's outputs on one set of texts."""

    logits: np.ndarray
    features: np.ndarray | None = None
    y: np.ndarray | None = None  # label ids (in-scope splits)


def method_scores(method: str, split: Split, temperature: float, maha: tuple | None,
                  detector: tuple | None = None) -> np.ndarray:
    if method == "mahalanobis":
        return mahalanobis_score(split.features, maha[0], maha[1])
    if method == "trained":
        return trained_score(split.features, *detector)
    return max_prob_score(split.logits, temperature) if method == "max_prob" else energy_score(split.logits,
                                                                                                temperature)


def fit_abstention(method: str, in_scope_recall: float, label: str, temperature: float, num_labels: int,
                   train: Split | None, val: Split, oos_val: Split | None = None) -> tuple[Abstainer, dict]:
    """The abstention of `method` (auto: chosen by validation AUROC against `oos_val`, else max_prob), its
    threshold fitted on `val`. Returns (abstainer, what was chosen and on which numbers).
    `trained` (alone or among auto's candidates) needs `oos_val` (the oos_texts): every candidate's validation
    AUROC is then measured on the held-out half of them (split_oos), the detector compared being fitted on the
    other half; the detector kept is refitted on all of them."""
    candidates = [method] if method != "auto" else (list(SCORES) if oos_val is not None else ["max_prob"])
    maha = shrinkage = detector = None
    for m in set(candidates) & set(FEATURE_METHODS):
        if train is None or train.features is None or val.features is None:
            raise ValueError(f"{m} needs the train and validation text vectors")
    if "mahalanobis" in candidates:
        means, precision, shrinkage = fit_mahalanobis(train.features, train.y, num_labels)
        maha = (means, precision)
    oos_scored, held = oos_val, None
    if "trained" in candidates:
        if oos_val is None or oos_val.features is None:
            raise ValueError("trained abstention needs evaluate.abstain.oos_texts (known out-of-scope texts)")
        fit_rows, held = split_oos(len(oos_val.logits))
        detector = fit_detector(train.features, oos_val.features[fit_rows])
        oos_scored = Split(oos_val.logits[held], oos_val.features[held])
    fitted = {}
    for m in candidates:
        s_val = method_scores(m, val, temperature, maha, detector)
        row = {"threshold": fit_threshold(s_val, in_scope_recall)}
        if oos_scored is not None:
            s_oos = method_scores(m, oos_scored, temperature, maha, detector)
            row.update(validation_auroc=auroc(s_val, s_oos), validation_fpr_at_95tpr=fpr_at_95tpr(s_val, s_oos),
                       validation_oos_recall=float((s_oos < row["threshold"]).mean()))
        fitted[m] = row
    if method == "auto" and oos_val is not None:
        chosen = max(candidates, key=lambda m: (fitted[m]["validation_auroc"], -candidates.index(m)))
        why = "best validation AUROC against evaluate.abstain.oos_texts"
    else:
        chosen = candidates[0]
        why = ("no evaluate.abstain.oos_texts to compare methods on: max_prob" if method == "auto"
               else "evaluate.abstain.method")
    ab = Abstainer(chosen, fitted[chosen]["threshold"], float(temperature), label,
                   *(maha if chosen == "mahalanobis" else (None, None)))
    info = {"requested": method, "chosen": chosen, "why": why, "in_scope_recall": in_scope_recall,
            "validation_rows": int(len(val.logits)), "candidates": fitted,
            "oos_validation_rows": int(len(oos_scored.logits)) if oos_scored is not None else 0}
    if held is not None:
        info["oos_split"] = {"seed": OOS_SPLIT_SEED, "fit_rows": int(len(oos_val.logits) - len(held)),
                             "held_out_rows": int(len(held)),
                             "rule": "the detector compared is fitted on the fit rows; every candidate's validation "
                                     "numbers are on the held-out rows"}
    if chosen == "trained":
        ab.coef, ab.intercept = fit_detector(train.features, oos_val.features)
        ab.threshold = fit_threshold(trained_score(val.features, ab.coef, ab.intercept), in_scope_recall)
        info.update(features=FEATURES, detector="sklearn LogisticRegression(class_weight='balanced', "
                    f"C={DETECTOR_C}) on standardised vectors, train rows (in scope) vs oos_texts (out of scope); "
                    "refitted on all oos_texts after the choice", train_rows=int(len(train.logits)),
                    oos_fit_rows=int(len(oos_val.logits)), threshold_refit=ab.threshold,
                    caveat="fitted on examples of out-of-scope text: it detects texts like those, not arbitrary "
                           "foreign ones; its out-of-scope numbers hold for the kinds of text in oos_texts")
    if chosen == "mahalanobis":
        info.update(features=FEATURES, covariance="shared, Ledoit-Wolf shrinkage (sklearn.covariance.LedoitWolf)",
                    shrinkage=shrinkage, train_rows=int(len(train.logits)))
    return ab, info


def abstain_metrics(ab: Abstainer, test: Split, oos_test: Split | None = None) -> tuple[dict, list[dict]]:
    """Test metrics of a fitted abstention (in-scope accuracy counts an abstention as an error) and the
    risk-coverage curve of its score on the in-scope test rows."""
    s_in = ab.scores(test.logits, test.features)
    keep = s_in >= ab.threshold
    correct = np.asarray(test.logits).argmax(axis=1) == test.y
    m = {"method": ab.method, "threshold": float(ab.threshold), "label": ab.label,
         "in_scope_accuracy": float((correct & keep).mean()), "abstain_rate": float((~keep).mean()),
         "in_scope_recall": float(keep.mean()),
         "accuracy_answered": float(correct[keep].mean()) if keep.any() else None, "test_rows": int(len(s_in))}
    if oos_test is not None:
        s_oos = ab.scores(oos_test.logits, oos_test.features)
        caught = s_oos < ab.threshold
        m.update(oos_rows=int(len(s_oos)), oos_recall=float(caught.mean()),
                 oos_precision=float(caught.sum() / max(int(caught.sum() + (~keep).sum()), 1)),
                 auroc=auroc(s_in, s_oos), fpr_at_95tpr=fpr_at_95tpr(s_in, s_oos))
    return m, risk_coverage(s_in, correct)
