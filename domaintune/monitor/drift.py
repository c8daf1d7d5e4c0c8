"""Drift profiles and batch comparison: the library behind the drift stage and `domaintune monitor`.

A baseline (build_baseline, written by stages/drift.py) holds an honest reference:
  reference_text.parquet     text features of the train + validation rows (id, split recorded).
                             oov_rate only on validation: the vocabulary is train's, so a train
                             text's OOV rate is 0 by construction
  reference_outputs.parquet  the served model on the VALIDATION rows it did not train on: gold
                             label, predicted label, calibrated confidence, PCA coordinates
  arrays.safetensors         PCA axes, the random Fourier features of the MMD test, the reference's
                             mean feature vector and (a sample of) its normalised embeddings
  vocab.json                 the train word vocabulary
  profile.json               rows used, measured and expected reference accuracy, the resampled null
                             of every signal (domaintune.drifttests) and the error rate it holds
A batch is profiled (profile_batch: one forward pass) and judged (judge): every signal gets a
p-value from the calibrated null, Bonferroni over the signals gives one verdict whose false-alarm
rate is drift.false_alarm_rate, and the CBPE accuracy estimate is set against the reference's.
A significant signal counts only with an effect size of at least drift.min_effect (on the
total-variation scale, domaintune.drifttests): at large batches every real difference is
significant, and the floor keeps the tiny ones (a few points of text length) from alarming.
Nothing is pickled: arrays are safetensors, the rest JSON and Parquet.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from domaintune.core.device import use_bf16
from domaintune.core.errors import DataError
from domaintune.core.io import read_json, write_json
from domaintune.modeling.chunks import LongText, content_ids, tokens_read
from domaintune.monitor import stats as dt

TEXT_FEATURES = ("n_chars", "n_words", "n_tokens", "truncated", "unk_rate", "oov_rate", "non_ascii_rate",
                 "digit_rate", "upper_rate")
HELDOUT_TEXT_FEATURES = ("oov_rate",)  # compared with validation rows only (see the module docstring)
PRED_COLUMN = "pred_label"
CONF_COLUMN = "confidence"
MMD_SIGNAL = "embeddings_mmd"
MAX_REFERENCE_EMBEDDINGS = 2000
# The estimated accuracy's 95% interval held the measured accuracy in at least 90% of iid batches of 100, 500
# and 3,000 texts from 150 calibration rows on, which held 11 wrong predictions on average (0.93-0.95; at
# 100 rows and 8 wrong: 0.85-0.92; bench/drift_coverage.py, bench/results/drift.json accuracy_coverage):
# a baseline calibrated on fewer rows, or on fewer wrong predictions, says "estimate unreliable".
MIN_CALIBRATION_ROWS = 150
MIN_CALIBRATION_ERRORS = 10
_WORD = re.compile(r"\w+", re.UNICODE)
EXPLAIN = {
    "n_chars": "length of the text in characters",
    "n_words": "length of the text in words (short chat messages move this)",
    "n_tokens": "length of the text in model tokens (special tokens not counted)",
    "truncated": "share of texts the model does not read whole: longer than max_length tokens (truncate, "
                 "head_tail) or than max_chunks windows (chunks); longer documents move this",
    "unk_rate": "share of tokenizer pieces that are [UNK]: characters the model cannot represent",
    "oov_rate": "share of words never seen in the training texts: new names, jargon, typos, another language",
    "non_ascii_rate": "share of non-ASCII characters: accents, other scripts, emoji",
    "digit_rate": "share of digit characters: numbers, ids, amounts",
    "upper_rate": "share of upper-case characters: shouting, codes, acronyms",
    CONF_COLUMN: "the model's calibrated top probability: lower means it is less sure",
    PRED_COLUMN: "the mix of predicted labels (chi-square test over the label counts)",
    MMD_SIGNAL: "the model's text embeddings as a whole (MMD test): what the texts are about",
}


def explain(name: str) -> str:
    if re.fullmatch(r"pc\d+", name):
        return (f"{name}: coordinate on principal axis {name[2:]} of the reference embeddings "
                "(a direction of topic variation)")
    return EXPLAIN.get(name, name)


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def build_vocab(texts: Sequence[str]) -> list[str]:
    return sorted({w for t in texts for w in words(t)})


def text_features(texts: Sequence[str], tokenizer, vocab: set[str], max_length: int,
                  long_text: LongText | None = None) -> pd.DataFrame:
    """Cheap per-text statistics that move when the input domain moves; n_tokens and truncated (1.0: the model
    does not read the whole text under `long_text`, modeling.chunks.tokens_read) show a shift to longer texts."""
    all_ids = content_ids(tokenizer, list(texts))
    read = tokens_read(tokenizer, max_length, long_text)
    unk = tokenizer.unk_token_id
    rows = []
    for text, full in zip(texts, all_ids):
        ids = full[:max_length]  # unk_rate: over the first max_length tokens, as before
        ws = words(text)
        n = max(len(text), 1)
        rows.append((float(len(text)), float(len(ws)), float(len(full)), float(len(full) > read),
                     float(sum(i == unk for i in ids) / max(len(ids), 1)),
                     float(sum(w not in vocab for w in ws) / max(len(ws), 1)),
                     float(sum(ord(c) > 127 for c in text) / n), float(sum(c.isdigit() for c in text) / n),
                     float(sum(c.isupper() for c in text) / n)))
    return pd.DataFrame(rows, columns=list(TEXT_FEATURES), dtype=np.float64)


def fit_pca(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-k principal axes [k, hidden] by SVD (deterministic sign: largest loading positive)."""
    mean = emb.mean(axis=0)
    k = max(1, min(k, emb.shape[0] - 1 if emb.shape[0] > 1 else 1, emb.shape[1]))
    _, _, vt = np.linalg.svd(emb - mean, full_matrices=False)
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1.0
    return mean.astype(np.float32), (comps * signs[:, None]).astype(np.float32)


def pca_columns(k: int) -> list[str]:
    return [f"pc{i + 1}" for i in range(k)]


@dataclass
class BatchProfile:
    """What one forward pass tells about a batch: features + model outputs, row-aligned with texts."""
    texts: list[str]
    frame: pd.DataFrame      # text features, pcs, pred_label, confidence
    probs: np.ndarray        # calibrated probabilities [m, K]
    emb: np.ndarray          # mean-pooled embeddings [m, hidden]
    abstained: np.ndarray | None = None  # where the model abstains (evaluate.abstain); None if it never does

    def take(self, idx: Sequence[int]) -> "BatchProfile":
        idx = np.asarray(idx)
        return BatchProfile([self.texts[i] for i in idx], self.frame.iloc[idx].reset_index(drop=True),
                            self.probs[idx], self.emb[idx], None if self.abstained is None else self.abstained[idx])


def model_outputs(predictor, texts: Sequence[str], bf16: bool = False):
    """Calibrated probabilities, mean-pooled embeddings and where the model abstains (evaluate.abstain; None
    if it never does), in input order (one forward pass, under bf16 autocast when asked: the baseline and
    every batch take the same numeric path)."""
    if not bf16 or predictor.model is None:
        logits, emb = predictor.logits(list(texts), mean_pooled=True)
    else:
        import torch

        with torch.autocast(next(predictor.model.parameters()).device.type, dtype=torch.bfloat16):
            logits, emb = predictor.logits(list(texts), mean_pooled=True)
    abstained = predictor.abstained(logits, emb) if getattr(predictor, "abstainer", None) is not None else None
    return predictor.proba_from_logits(logits), emb, abstained


def wants_bf16(predictor, mode: str) -> bool:
    """drift.bf16 resolved for where the predictor's model sits (domaintune.core.device.use_bf16)."""
    if predictor.model is None:
        return False

    return use_bf16(mode, str(next(predictor.model.parameters()).device))


def output_frame(predictor, probs: np.ndarray, emb: np.ndarray, pca_mean, pca_comps) -> pd.DataFrame:
    pcs = (emb - pca_mean) @ pca_comps.T
    frame = pd.DataFrame(pcs.astype(np.float64), columns=pca_columns(pca_comps.shape[0]))
    frame[PRED_COLUMN] = predictor.labels_from_proba(probs)
    frame[CONF_COLUMN] = probs.max(axis=1).astype(np.float64)
    return frame


def distribution(values: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    counts = Counter(values)
    n = max(len(values), 1)
    return {lab: counts.get(lab, 0) / n for lab in labels}


def label_counts(values: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    index = {lab: i for i, lab in enumerate(labels)}
    counts = np.zeros(len(labels) + 1)  # last slot: a prediction outside the label set (multi-label combos)
    for v in values:
        counts[index.get(v, len(labels))] += 1
    return counts


class Baseline:
    """A saved reference profile, ready to compare batches against."""

    FILES = ("profile.json", "reference_text.parquet", "reference_outputs.parquet", "arrays.safetensors",
             "vocab.json")

    def __init__(self, folder: str | Path):
        from safetensors.numpy import load_file

        self.folder = Path(folder)
        for name in self.FILES:
            if not (self.folder / name).exists():
                raise DataError(self.folder / name, None, None, "drift baseline incomplete; run the drift stage first")
        self.profile = read_json(self.folder / "profile.json")
        self.text_ref = pd.read_parquet(self.folder / "reference_text.parquet")
        self.out_ref = pd.read_parquet(self.folder / "reference_outputs.parquet")
        self.arrays = load_file(str(self.folder / "arrays.safetensors"))
        self.vocab = set(read_json(self.folder / "vocab.json"))
        self.labels = list(self.profile["labels"])

    def profile_batch(self, predictor, texts: Sequence[str]) -> BatchProfile:
        """Features and model outputs of a batch on the baseline's axes (and its bf16 choice)."""
        texts = list(texts)
        feats = text_features(texts, predictor.tokenizer, self.vocab, predictor.max_length,
                              getattr(predictor, "long_text", None))
        probs, emb, abstained = model_outputs(predictor, texts, bool(self.profile.get("bf16", False)))
        out = output_frame(predictor, probs, emb, self.arrays["pca_mean"], self.arrays["pca_components"])
        return BatchProfile(texts, pd.concat([feats, out], axis=1), probs, emb, abstained)


def _text_group(frame: pd.DataFrame) -> list[str]:
    return [c for c in TEXT_FEATURES if c not in HELDOUT_TEXT_FEATURES and c in frame.columns]


def _heldout_ks(k: int) -> list[str]:
    return list(HELDOUT_TEXT_FEATURES) + pca_columns(k) + [CONF_COLUMN]


def group_statistics(ref: pd.DataFrame, batch: pd.DataFrame, ks_columns: Sequence[str], labels=None,
                     ref_phi=None, batch_phi=None) -> dict[str, float]:
    """T of each signal of one reference group: K-S per column, chi-square of the predicted labels
    (when labels are given), MMD on the feature vectors (when ref_phi is given)."""
    out = {c: dt.ks_statistic(np.sort(ref[c].to_numpy(np.float64)), batch[c].to_numpy(np.float64))
           for c in ks_columns}
    if labels is not None:
        out[PRED_COLUMN] = dt.chi2_statistic(label_counts(ref[PRED_COLUMN], labels),
                                             label_counts(batch[PRED_COLUMN], labels))
    if ref_phi is not None:
        out[MMD_SIGNAL] = dt.mmd_statistic(ref_phi.mean(axis=0), len(ref_phi), batch_phi)
    return out


def calibrate(text_ref: pd.DataFrame, out_ref: pd.DataFrame, phi: np.ndarray, labels: list[str], k: int,
              resamples: int, seed: int) -> dict:
    """The resampled null of every signal (see domaintune.drifttests), per pseudo-batch size."""
    text_cols, held_cols = _text_group(text_ref), _heldout_ks(k)

    def text_stat(b, r):
        return group_statistics(text_ref.iloc[r], text_ref.iloc[b], text_cols)

    def held_stat(b, r):
        return group_statistics(out_ref.iloc[r], out_ref.iloc[b], held_cols, labels, phi[r], phi[b])

    groups = {"text": (len(text_ref), text_stat), "heldout": (len(out_ref), held_stat)}
    null = {}
    for gi, (name, (n, fn)) in enumerate(groups.items()):
        null[name] = dt.resample_null(n, dt.calibration_sizes(n), resamples, seed + gi, fn)
    return null


def _fits(null: dict) -> dict[str, list[dict]]:
    """signal -> its fitted nulls, one per resampled size."""
    fits: dict[str, list[dict]] = {}
    for group in null.values():
        for entry in group:
            for signal, fit in entry["fits"].items():
                fits.setdefault(signal, []).append(fit)
    return fits


def reference_accuracy(labels_true: Sequence[str], labels_pred: Sequence[str], labels: list[str]) -> dict:
    from sklearn.metrics import f1_score

    y, p = np.asarray(labels_true, dtype=object), np.asarray(labels_pred, dtype=object)
    present = sorted(set(y) | set(p))
    return {"accuracy": float((y == p).mean()),
            "macro_f1": float(f1_score(y, p, labels=present, average="macro", zero_division=0))}


def build_baseline(splits: dict[str, pd.DataFrame], labels: list[str], predictor, params, out: Path,
                   dataset_hash: str | None = None) -> dict:
    """Write the reference profile of `predictor` (opened by domaintune.tasks.load_predictor: a Predictor or a
    GenerationPredictor) into `out` (a fresh folder); return the metrics."""
    train, val = splits["train"], splits.get("validation")
    if val is None or len(val) < 4:
        raise DataError("validation.parquet", None, "text", "the drift reference needs at least 4 validation rows "
                        "(model outputs are taken on rows the model did not train on), got "
                        f"{0 if val is None else len(val)}")
    vocab_list = build_vocab(train["text"].tolist())
    vocab = set(vocab_list)
    both = pd.concat([train, val], ignore_index=True)
    text_ref = text_features(both["text"].tolist(), predictor.tokenizer, vocab, predictor.max_length,
                             getattr(predictor, "long_text", None))
    text_ref.insert(0, "id", both["id"].astype(str).to_numpy())
    text_ref.insert(1, "split", both["split"].astype(str).to_numpy() if "split" in both else
                    ["train"] * len(train) + ["validation"] * len(val))
    text_ref.loc[text_ref["split"] == "train", "oov_rate"] = np.nan
    bf16 = wants_bf16(predictor, params.bf16)
    probs, emb, _ = model_outputs(predictor, val["text"].tolist(), bf16)
    pca_mean, pca_comps = fit_pca(emb, params.pca_components)
    out_ref = output_frame(predictor, probs, emb, pca_mean, pca_comps)
    out_ref.insert(0, "id", val["id"].astype(str).to_numpy())
    out_ref.insert(1, "label", val["label"].astype(str).to_numpy())
    out_ref.insert(2, "oov_rate", text_ref.loc[text_ref["split"] != "train", "oov_rate"].to_numpy())
    rff = dt.fit_rff(emb, params.seed)
    phi = dt.rff_map(emb, rff)
    null = calibrate(text_ref, out_ref, phi, predictor.labels or None, pca_comps.shape[0],
                     params.calibration_resamples, params.seed)
    keep = np.random.default_rng(params.seed).permutation(len(emb))[:MAX_REFERENCE_EMBEDDINGS]
    arrays = {"pca_mean": pca_mean, "pca_components": pca_comps, **rff,
              "phi_mean": phi.mean(axis=0), "ref_embeddings": dt.normalise(emb[np.sort(keep)])}
    # no label set (base.task generation): no accuracy to measure or estimate
    measured = reference_accuracy(out_ref["label"], out_ref[PRED_COLUMN], predictor.labels) \
        if predictor.labels and predictor.problem_type != "token_classification" else None  # a tagger: no row label
    expected = dt.estimated_performance(probs) if has_accuracy(predictor.problem_type) else None
    profile = _profile(predictor, train, val, text_ref, out_ref, null, measured, expected, params, dataset_hash)
    profile["bf16"] = bf16  # the batches' forward pass follows it (Baseline.profile_batch)
    out.mkdir(parents=True, exist_ok=True)
    text_ref.to_parquet(out / "reference_text.parquet", index=False)
    out_ref.to_parquet(out / "reference_outputs.parquet", index=False)
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out / "arrays.safetensors"))
    write_json(out / "vocab.json", vocab_list)
    write_json(out / "profile.json", profile)
    return {"text_reference_rows": len(text_ref), "output_reference_rows": len(out_ref),
            "reference_accuracy": (measured or {}).get("accuracy"),
            "reference_macro_f1": (measured or {}).get("macro_f1"),
            "reference_expected_accuracy": None if expected is None else expected["accuracy"],
            "mean_confidence": float(out_ref[CONF_COLUMN].mean()), "signals": len(_fits(null)) + 1,
            "pca_components": int(pca_comps.shape[0])}


def has_accuracy(problem_type: str) -> bool:
    """CBPE estimates accuracy for single-label classifiers; multi-label, generation and token-tagging models
    have none (a tagger's per-text entity-type mix is drift's label mix, not a calibrated class)."""
    return problem_type not in ("multi_label", "generation", "token_classification")


def _profile(predictor, train, val, text_ref, out_ref, null, measured, expected, params, dataset_hash) -> dict:
    numeric = [c for c in TEXT_FEATURES] + pca_columns(params_k(out_ref)) + [CONF_COLUMN]
    return {
        "explanations": {CONF_COLUMN: getattr(predictor, "confidence_explanation", EXPLAIN[CONF_COLUMN])},
        "dataset_hash": dataset_hash,
        "labels": list(predictor.labels),
        "problem_type": predictor.problem_type,
        "temperature": predictor.temperature,
        "max_length": predictor.max_length,
        # documents: their length in tokens and the share the model does not read whole (monitor compares both)
        "long_text": getattr(predictor, "long_text", LongText()).as_meta(),
        "length_tokens": {"p50": float(text_ref["n_tokens"].median()),
                          "p95": float(text_ref["n_tokens"].quantile(0.95)), "max": float(text_ref["n_tokens"].max()),
                          "truncated_share": float(text_ref["truncated"].mean())},
        "reference_rows": {"text_features": {"train": int(len(train)), "validation": int(len(val))},
                           "model_outputs": {"validation": int(len(val))},
                           "note": "ids in reference_text.parquet / reference_outputs.parquet; oov_rate and all "
                                   "model outputs on validation only (rows the model did not train on)"},
        "numeric_features": numeric,
        "feature_means": {c: float(pd.concat([text_ref.get(c, pd.Series(dtype=float)),
                                              out_ref.get(c, pd.Series(dtype=float))]).mean()) for c in numeric},
        "prediction_distribution": distribution(out_ref[PRED_COLUMN].tolist(), predictor.labels),
        "mean_confidence": float(out_ref[CONF_COLUMN].mean()),
        "reference_measured": measured,
        "reference_expected": expected,
        "null": null,
        "calibration": {"resamples_per_size": params.calibration_resamples, "seed": params.seed,
                        "method": "random splits of the reference into pseudo-batch and pseudo-reference; "
                                  "scaled chi-square fitted per size; largest tail probability over sizes"},
    }


def params_k(out_ref: pd.DataFrame) -> int:
    return sum(1 for c in out_ref.columns if re.fullmatch(r"pc\d+", c))


def batch_statistics(baseline: Baseline, batch: BatchProfile) -> dict[str, float]:
    """T of every signal for a batch against the full reference."""
    k = params_k(baseline.out_ref)
    stats = group_statistics(baseline.text_ref, batch.frame, _text_group(baseline.text_ref))
    held = group_statistics(baseline.out_ref, batch.frame, _heldout_ks(k), baseline.labels or None)
    held[MMD_SIGNAL] = dt.mmd_statistic(baseline.arrays["phi_mean"].astype(np.float64), len(baseline.out_ref),
                                        dt.rff_map(batch.emb, baseline.arrays))
    return {**stats, **held}


def atypicality(baseline: Baseline, emb: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """1 - cosine similarity to the nearest reference embedding (0: a reference text's twin)."""
    ref = baseline.arrays["ref_embeddings"]
    x = dt.normalise(emb)
    out = np.empty(len(x))
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = 1.0 - (x[s:s + chunk] @ ref.T).max(axis=1)
    return out


def signal_effect(baseline: Baseline, batch: BatchProfile, name: str, t: float, fits: list[dict]) -> float:
    """The effect size of one signal on the TV scale (domaintune.drifttests: K-S distance D, TV of the
    label mix, normalised MMD), debiased for sampling noise."""
    m = len(batch.texts)
    if name == PRED_COLUMN:
        return dt.tv_effect(label_counts(baseline.out_ref[PRED_COLUMN], baseline.labels),
                            label_counts(batch.frame[PRED_COLUMN], baseline.labels))
    ref = baseline.out_ref if name == MMD_SIGNAL or name in baseline.out_ref.columns else baseline.text_ref
    n = len(ref) if name == MMD_SIGNAL else int(ref[name].notna().sum())
    e = dt.excess_distance(t, dt.null_mean(fits), n, m)
    return dt.mmd_effect(e, baseline.arrays["phi_mean"].astype(np.float64)) if name == MMD_SIGNAL else e


def judge(baseline: Baseline, batch: BatchProfile, params, examples: int = 10) -> dict:
    """The verdict on a profiled batch: a signal drifts when its calibrated p-value is below
    params.false_alarm_rate / tests (Bonferroni) AND its effect size is at least params.min_effect;
    the estimated accuracy against the reference; example texts."""
    if len(batch.texts) < 2:
        raise DataError("batch", None, "text", f"need at least 2 texts to test for drift, got {len(batch.texts)}")
    fits = _fits(baseline.profile["null"])
    stats = batch_statistics(baseline, batch)
    estimate = has_accuracy(baseline.profile.get("problem_type"))
    n_tests = len(stats) + estimate
    level, floor = params.false_alarm_rate / n_tests, params.min_effect
    signals = {}
    for name, t in stats.items():
        p = dt.null_pvalue(t, fits.get(name, []), ks=name not in (PRED_COLUMN, MMD_SIGNAL))
        effect = signal_effect(baseline, batch, name, t, fits.get(name, []))
        why = baseline.profile.get("explanations", {}).get(name) or explain(name)
        signals[name] = {"statistic": t, "p_value": p, "effect": effect, "significant": p < level,
                         "drifted": bool(p < level and effect >= floor), "explanation": why,
                         **_means(baseline, batch, name)}
    order = sorted(signals, key=lambda s: (not signals[s]["drifted"], signals[s]["p_value"], -signals[s]["statistic"]))
    accuracy = _accuracy_section(baseline, batch, params, level, n_tests) if estimate else None
    reasons = [_reason(name, signals[name], level, floor) for name in order if signals[name]["drifted"]]
    if accuracy is not None and accuracy["drop_significant"]:
        reasons.append(f"estimated accuracy {accuracy['estimated']:.3f} (95% CI {accuracy['ci_low']:.3f}-"
                       f"{accuracy['ci_high']:.3f}) is {accuracy['drop']:.3f} below the reference's estimate "
                       f"{accuracy['reference_estimated']:.3f}: {accuracy['significance']}"
                       + ("" if accuracy["reliable"] else f" ({accuracy['reliability']})"))
    features = [s for s in order if s not in (PRED_COLUMN, MMD_SIGNAL)]
    conf = batch.frame[CONF_COLUMN].to_numpy()
    atyp = atypicality(baseline, batch.emb)
    drifted = [s for s in features if signals[s]["drifted"]]
    return {
        "drift": bool(reasons), "reasons": reasons, "rows": len(batch.texts),
        "false_alarm_rate": params.false_alarm_rate, "tests": n_tests, "per_test_level": level,
        "min_effect": floor,
        "error_rate_note": (f"{n_tests} tests, each at {params.false_alarm_rate}/{n_tests} (Bonferroni): a batch "
                            f"drawn like the reference alarms with probability <= {params.false_alarm_rate}. A "
                            f"signal also needs an effect of at least drift.min_effect {floor} (a share of the "
                            "texts, total-variation scale), so a real but tiny difference does not alarm"),
        "signals": {s: signals[s] for s in order},
        "p_values": {s: signals[s]["p_value"] for s in order},
        "drifted_columns": drifted, "drifted_share": len(drifted) / max(len(features), 1),
        "accuracy": accuracy,
        "mean_confidence_reference": float(baseline.profile["mean_confidence"]),
        "mean_confidence_current": float(conf.mean()),
        "confidence_drop": float(baseline.profile["mean_confidence"] - conf.mean()),
        "prediction_distribution": distribution(batch.frame[PRED_COLUMN].tolist(), baseline.labels),
        "prediction_distribution_reference": baseline.profile["prediction_distribution"],
        "length_tokens": _lengths(baseline, batch),
        "most_atypical": _examples(batch, np.argsort(-atyp, kind="stable")[:examples], atyp),
        "least_confident": _examples(batch, np.argsort(conf, kind="stable")[:examples], atyp),
    }


def _lengths(baseline: Baseline, batch: BatchProfile) -> dict | None:
    """The batch's document lengths in tokens and the share the model does not read whole, beside the
    reference's (a baseline built before these features were recorded has none)."""
    f = batch.frame
    if "n_tokens" not in f.columns:
        return None
    return {"p50": float(f["n_tokens"].median()), "p95": float(f["n_tokens"].quantile(0.95)),
            "max": float(f["n_tokens"].max()), "truncated_share": float(f["truncated"].mean()),
            "reference": baseline.profile.get("length_tokens"), "long_text": baseline.profile.get("long_text")}


def _means(baseline: Baseline, batch: BatchProfile, name: str) -> dict:
    if name in (PRED_COLUMN, MMD_SIGNAL):
        return {}
    ref = baseline.out_ref if name in baseline.out_ref.columns else baseline.text_ref
    return {"reference_mean": float(ref[name].mean()), "batch_mean": float(batch.frame[name].mean())}


def _reason(name: str, s: dict, level: float, floor: float) -> str:
    where = f"p={s['p_value']:.3g} < {level:.2g}, effect {s['effect']:.2f} >= {floor:g}"
    if name == MMD_SIGNAL:
        return f"embeddings drifted (MMD, {where})"
    if name == PRED_COLUMN:
        return f"prediction mix shifted (chi-square, {where})"
    return f"{name} drifted: batch mean {s['batch_mean']:.4g} vs reference {s['reference_mean']:.4g} ({where})"


def reference_correct(baseline: Baseline) -> tuple[np.ndarray, np.ndarray]:
    """The validation rows' calibrated top probability and whether the prediction was right: the rows the
    temperature was fitted on, which the accuracy estimate is calibrated on (stats.estimated_accuracy)."""
    ref = baseline.out_ref
    return (ref[CONF_COLUMN].to_numpy(np.float64),
            (ref["label"].astype(str).to_numpy() == ref[PRED_COLUMN].astype(str).to_numpy()).astype(np.float64))


def _accuracy_section(baseline: Baseline, batch: BatchProfile, params, level: float, n_tests: int) -> dict:
    """The batch's estimated accuracy beside the reference's estimate (the same estimator on the validation
    rows: like with like; the measured reference accuracy is shown beside it, measured with measured), and
    the one-sided test of a drop larger than drift.max_accuracy_drop at the Bonferroni-corrected level."""
    ref_conf, ref_ok = reference_correct(baseline)
    est = dt.estimated_accuracy(batch.probs.max(axis=1), ref_conf, ref_ok, groups=batch.texts,
                                predicted=batch.frame[PRED_COLUMN].astype(str).to_numpy(),
                                ref_predicted=baseline.out_ref[PRED_COLUMN].astype(str).to_numpy())
    f1 = dt.estimated_performance(batch.probs)
    measured = baseline.profile["reference_measured"]
    expected = baseline.profile.get("reference_expected") or {}
    lower = est["drop"] - dt.one_sided_z(level) * est["drop_sd"]
    significant = bool(lower > params.max_accuracy_drop)
    tests = (f"the Bonferroni-corrected level {level:.2g} (drift.false_alarm_rate {params.false_alarm_rate:g} over "
             f"{n_tests} tests)")
    significance = (f"the drop of {est['drop']:.3f} is {'' if significant else 'not '}significant: at {tests} its "
                    f"one-sided lower bound is {lower:.3f}, {'above' if significant else 'not above'} "
                    f"drift.max_accuracy_drop {params.max_accuracy_drop:g}"
                    + ("" if significant else " (a stricter bound than the 95% interval's 2.5% per side)"))
    rows, wrong = est["calibration_rows"], est["calibration_errors"]
    reliable = rows >= MIN_CALIBRATION_ROWS and wrong >= MIN_CALIBRATION_ERRORS
    reliability = (f"calibrated on {rows} validation rows ({wrong} wrong)" if reliable else
                   f"estimate unreliable: calibrated on {rows} rows, {wrong} of them wrong (the 95% interval held "
                   f"the measured accuracy in at least 90% of iid batches only from {MIN_CALIBRATION_ROWS} "
                   f"validation rows and {MIN_CALIBRATION_ERRORS} wrong predictions on, bench/results/drift.json)")
    return {"estimated": est["accuracy"], "ci_low": est["accuracy_low"], "ci_high": est["accuracy_high"],
            "sampling_sd": est["sampling_sd"], "calibration_sd": est["calibration_sd"],
            "estimated_macro_f1": f1["macro_f1"], "macro_f1_ci_low": f1["macro_f1_low"],
            "macro_f1_ci_high": f1["macro_f1_high"],
            "reference_estimated": est["reference_accuracy"],
            "reference_estimated_macro_f1": expected.get("macro_f1"),
            "reference_measured": measured["accuracy"], "reference_measured_macro_f1": measured["macro_f1"],
            "reference_expected": expected.get("accuracy"),
            "drop": est["drop"], "drop_sd": est["drop_sd"], "drop_lower_bound": lower, "level": level,
            "max_accuracy_drop": params.max_accuracy_drop, "drop_significant": significant,
            "significance": significance, "calibration_rows": rows, "calibration_errors": est["calibration_errors"],
            "reliable": reliable, "reliability": reliability,
            "method": "CBPE with calibration uncertainty: each text's calibrated top probability is mapped to "
                      "P(correct) by a logistic fit on the validation rows (those the temperature was fitted on), "
                      "plus its predicted class's offset (how much more or less often that class's validation "
                      "rows were right than the map says, shrunk by empirical Bayes); 95% CI from the batch's "
                      "Poisson-binomial variance (identical texts share one outcome) plus the spread of the "
                      f"estimate over {dt.ACCURACY_BOOTSTRAP} refits (map and offsets) on bootstrap resamples of "
                      "those rows. Macro-F1 from the expected confusion matrix, Poisson-bootstrap CI (sampling "
                      "only)"}


def _examples(batch: BatchProfile, idx: np.ndarray, atyp: np.ndarray) -> list[dict]:
    f = batch.frame
    return [{"row": int(i) + 1, "text": batch.texts[i], "predicted": str(f[PRED_COLUMN].iat[i]),
             "confidence": float(f[CONF_COLUMN].iat[i]), "atypicality": float(atyp[i])} for i in idx]


def validation_frame(baseline: Baseline) -> pd.DataFrame:
    """The validation rows with every feature (text features + model outputs), for side-by-side views."""
    text = baseline.text_ref[baseline.text_ref["split"] != "train"].reset_index(drop=True)
    extra = [c for c in baseline.out_ref.columns if c not in text.columns]
    return pd.concat([text, baseline.out_ref[extra].reset_index(drop=True)], axis=1)
