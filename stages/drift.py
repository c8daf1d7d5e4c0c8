"""Drift stage: a reference profile of the training data and of the served model's behaviour.

The profile is what later batches are compared against (pipelines/monitor.py):
  reference.parquet   one row per train text: text features (length in chars and
                      words, unknown-token rate of the model's tokenizer, rate of
                      words never seen in train, non-ASCII / digit / upper-case
                      shares), the gold label, the exported model's predicted
                      label and calibrated confidence, and the first PCA
                      components of its mean-pooled embedding
  pca.safetensors     mean and components of that PCA (fitted on train), so a new
                      batch is projected onto exactly the same axes
  vocab.json          the train word vocabulary (for the out-of-vocabulary rate)
  profile.json        summary statistics, label and prediction distributions, the
                      model's temperature, dataset hash, feature list
  report.html         evidently DataDriftPreset of validation against train: a
                      sanity baseline (two samples of one distribution should
                      show little drift)
Nothing is pickled: arrays are safetensors, the rest JSON and Parquet.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from domaintune.data import DataError, atomic_output, read_dataset, read_hashes, read_json, write_json
from domaintune.stage import stage_parser, run_stage

# Numeric text features every batch gets, in report order.
TEXT_FEATURES = ("n_chars", "n_words", "unk_rate", "oov_rate", "non_ascii_rate", "digit_rate", "upper_rate")
PRED_COLUMN = "pred_label"
CONF_COLUMN = "confidence"
_WORD = re.compile(r"\w+", re.UNICODE)
# Features are compared at this many decimals (all are rates, counts, PCA coordinates or
# probabilities of order 1): below it lies float rounding, not drift.
ROUND_DECIMALS = 9


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def build_vocab(texts: Sequence[str]) -> list[str]:
    return sorted({w for t in texts for w in words(t)})


def text_features(texts: Sequence[str], tokenizer, vocab: set[str], max_length: int) -> pd.DataFrame:
    """Cheap per-text statistics that move when the input domain moves."""
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)
    unk = tokenizer.unk_token_id
    rows = []
    for text, ids in zip(texts, enc["input_ids"]):
        ws = words(text)
        n = max(len(text), 1)
        rows.append({
            "n_chars": float(len(text)),
            "n_words": float(len(ws)),
            # [UNK] pieces: characters the tokenizer cannot represent at all.
            "unk_rate": float(sum(i == unk for i in ids) / max(len(ids), 1)),
            # Words never seen in train: new product names, new jargon, another language.
            "oov_rate": float(sum(w not in vocab for w in ws) / max(len(ws), 1)),
            "non_ascii_rate": float(sum(ord(c) > 127 for c in text) / n),
            "digit_rate": float(sum(c.isdigit() for c in text) / n),
            "upper_rate": float(sum(c.isupper() for c in text) / n),
        })
    return pd.DataFrame(rows, columns=list(TEXT_FEATURES))


def fit_pca(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top-k principal axes [k, hidden] by SVD (deterministic sign: largest loading positive)."""
    mean = emb.mean(axis=0)
    k = max(1, min(k, emb.shape[0] - 1 if emb.shape[0] > 1 else 1, emb.shape[1]))
    _, _, vt = np.linalg.svd(emb - mean, full_matrices=False)
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1.0
    return mean.astype(np.float32), (comps * signs[:, None]).astype(np.float32)


def project(emb: np.ndarray, mean: np.ndarray, comps: np.ndarray) -> np.ndarray:
    return (emb - mean) @ comps.T


def pca_columns(k: int) -> list[str]:
    return [f"pc{i + 1}" for i in range(k)]


def load_served_model(model_dir: str | Path, device: str = "cpu"):
    """The exported classifier with its calibration (domaintune.predict.Predictor reads model.json), on `device`."""
    from domaintune.device import place_for_inference
    from domaintune.predict import Predictor

    model_dir = Path(model_dir)
    if not (model_dir / "model.json").exists():
        raise DataError(model_dir / "model.json", None, None, "exported model missing; run the export stage first")
    predictor = Predictor.load(model_dir)  # validates the temperature, naming model.json
    place_for_inference(predictor.model, device)
    source = "model.json" if "temperature" in predictor.meta else "none recorded in model.json (uncalibrated)"
    return predictor, source


def model_outputs(predictor, texts: Sequence[str], batch_size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Predicted label, calibrated confidence and mean-pooled embedding of each text, in input order
    (one forward pass, at the model's own max_length)."""
    predictor.batch_size = batch_size
    logits, emb = predictor.logits(texts, mean_pooled=True)
    probs = predictor.proba_from_logits(logits)
    return predictor.labels_from_proba(probs), probs.max(axis=1).astype(np.float64), emb


def profile_frame(texts: Sequence[str], predictor, vocab: set[str], mean: np.ndarray | None,
                  comps: np.ndarray | None, batch_size: int, k: int | None = None):
    """Features + model behaviour for a batch. With mean/comps None the PCA is fitted here (on this batch)."""
    feats = text_features(texts, predictor.tokenizer, vocab, predictor.max_length)
    pred, conf, emb = model_outputs(predictor, texts, batch_size)
    if mean is None:
        mean, comps = fit_pca(emb, k or 1)
    pcs = project(emb, mean, comps)
    for j, name in enumerate(pca_columns(comps.shape[0])):
        feats[name] = pcs[:, j].astype(np.float64)
    feats[PRED_COLUMN] = pred
    feats[CONF_COLUMN] = conf
    return feats, mean, comps


def _distribution(values: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    counts = Counter(values)
    n = max(len(values), 1)
    return {lab: counts.get(lab, 0) / n for lab in labels}


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, numeric: Sequence[str], threshold: float,
                 drift_share: float, html_path: Path | None = None) -> dict:
    """Evidently DataDriftPreset of current vs reference: per-column p-values and the drifted share.

    K-S for numeric columns and chi-square for the predicted label, fixed rather than
    evidently's size-dependent choice, so small and large batches are judged alike.
    Values are compared at ROUND_DECIMALS: a confident model's calibrated confidences are
    1.0 give or take float rounding (0.9999999999999885), noise no test should read as
    drift and on which evidently's histogram fails ("Too many bins for data range").
    A numeric column that is then constant in either frame (e.g. no non-ASCII text at all)
    has zero standard deviation, and evidently's correlation matrix would divide by it
    (NaNs and a RuntimeWarning); such columns get the same two-sample K-S test from
    scipy instead, so a batch that moves off the constant is still caught.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    reference = reference.assign(**{c: reference[c].astype(float).round(ROUND_DECIMALS) for c in numeric})
    current = current.assign(**{c: current[c].astype(float).round(ROUND_DECIMALS) for c in numeric})
    constant = [c for c in numeric if reference[c].nunique() < 2 or current[c].nunique() < 2]
    varying = [c for c in numeric if c not in constant]
    cols = varying + [PRED_COLUMN]
    definition = DataDefinition(numerical_columns=varying, categorical_columns=[PRED_COLUMN])
    report = Report([DataDriftPreset(columns=cols, num_method="ks", cat_method="chisquare",
                                     threshold=threshold, drift_share=drift_share)])
    snap = report.run(Dataset.from_pandas(current[cols].copy(), data_definition=definition),
                      Dataset.from_pandas(reference[cols].copy(), data_definition=definition))
    if html_path is not None:
        snap.save_html(str(html_path))
    columns: dict[str, float] = {}
    for m in snap.dict()["metrics"]:
        cfg = m["config"]
        if cfg["type"].endswith("ValueDrift"):
            columns[cfg["column"]] = float(m["value"])
    constant_p = constant_column_pvalues(reference, current, constant)
    columns.update(constant_p)
    columns = {c: columns[c] for c in list(numeric) + [PRED_COLUMN] if c in columns}  # report order
    if html_path is not None and constant:
        _append_constant_section(Path(html_path), reference, current, constant_p, threshold)
    drifted = sorted(c for c, p in columns.items() if p < threshold)
    return {"p_values": columns, "drifted_columns": drifted,
            "drifted_share": len(drifted) / max(len(columns), 1), "constant_columns": constant}


def _append_constant_section(html_path: Path, reference: pd.DataFrame, current: pd.DataFrame,
                             p_values: dict[str, float], threshold: float) -> None:
    """List the constant features in the HTML report too (evidently's part cannot show them)."""
    from html import escape

    def values(col: pd.Series) -> str:
        return f"{col.iloc[0]:g}" if col.nunique() < 2 else f"{col.min():g} to {col.max():g}"

    rows = "".join(f"<tr><td>{escape(c)}</td><td>{values(reference[c])}</td><td>{values(current[c])}</td>"
                   f"<td>{p:.4g}</td><td>{'drifted' if p < threshold else 'no drift'}</td></tr>"
                   for c, p in p_values.items())
    section = ("<section style='font-family:sans-serif;margin:2em'><h2>Features constant in the reference or the "
               "batch</h2><p>Tested with the same two-sample Kolmogorov-Smirnov test (scipy), outside the report "
               "above, whose correlation view cannot take a zero-variance column.</p><table border='1' "
               "cellpadding='4'><tr><th>feature</th><th>reference</th><th>current</th><th>K-S p-value</th>"
               f"<th>verdict</th></tr>{rows}</table></section>")
    text = html_path.read_text(encoding="utf-8")
    cut = text.rfind("</body>")
    html_path.write_text(text[:cut] + section + text[cut:] if cut >= 0 else text + section, encoding="utf-8")


def constant_column_pvalues(reference: pd.DataFrame, current: pd.DataFrame, columns: Sequence[str]) -> dict:
    """Two-sample K-S p-value per column (as evidently's "ks"): 1.0 when both hold the same constant."""
    from scipy.stats import ks_2samp

    return {c: float(ks_2samp(reference[c].to_numpy(float), current[c].to_numpy(float)).pvalue) for c in columns}


def build_baseline(splits: dict[str, pd.DataFrame], labels: list[str], model_dir: str | Path, params,
                   out: Path, dataset_hash: str | None = None, device: str = "cpu") -> dict:
    """Write the reference profile into `out` (a fresh folder); return the metrics."""
    train = splits["train"]
    if len(train) < 2:
        raise DataError("train.parquet", None, "text", f"need at least 2 train rows for a reference profile, got {len(train)}")
    predictor, t_source = load_served_model(model_dir, device)
    temperature = predictor.temperature
    vocab_list = build_vocab(train["text"].tolist())
    vocab = set(vocab_list)
    ref, mean, comps = profile_frame(train["text"].tolist(), predictor, vocab, None, None, params.batch_size,
                                     k=params.pca_components)
    ref.insert(0, "id", train["id"].astype(str).values)
    ref.insert(1, "label", train["label"].astype(str).values)
    numeric = list(TEXT_FEATURES) + pca_columns(comps.shape[0]) + [CONF_COLUMN]

    out.mkdir(parents=True, exist_ok=True)
    ref.to_parquet(out / "reference.parquet", index=False)
    from safetensors.numpy import save_file

    save_file({"mean": mean, "components": comps}, str(out / "pca.safetensors"))
    write_json(out / "vocab.json", vocab_list)

    sanity = None
    val = splits.get("validation")
    if val is not None and len(val) >= 2:
        cur, _, _ = profile_frame(val["text"].tolist(), predictor, vocab, mean, comps, params.batch_size)
        sanity = drift_report(ref, cur, numeric, params.stattest_threshold, params.drift_share, out / "report.html")
    else:
        # Still ship a report: the reference against itself documents the features.
        drift_report(ref, ref, numeric, params.stattest_threshold, params.drift_share, out / "report.html")

    pred_dist = _distribution(ref[PRED_COLUMN].tolist(), predictor.labels)
    label_dist = _distribution(ref["label"].tolist(), labels)
    profile = {
        "rows": int(len(ref)),
        "dataset_hash": dataset_hash,
        "labels": list(predictor.labels),
        "temperature": temperature,
        "temperature_source": t_source,
        "max_length": predictor.max_length,
        "numeric_features": numeric,
        "categorical_features": [PRED_COLUMN],
        "pca_components": int(comps.shape[0]),
        "feature_means": {c: float(ref[c].mean()) for c in numeric},
        "feature_stds": {c: float(ref[c].std(ddof=0)) for c in numeric},
        "label_distribution": label_dist,
        "prediction_distribution": pred_dist,
        "mean_confidence": float(ref[CONF_COLUMN].mean()),
        "train_accuracy": float((ref[PRED_COLUMN] == ref["label"]).mean()),
        "params": {"stattest_threshold": params.stattest_threshold, "drift_share": params.drift_share,
                   "max_confidence_drop": params.max_confidence_drop},
        "sanity_validation_vs_train": sanity,
    }
    write_json(out / "profile.json", profile)
    metrics = {
        "reference_rows": profile["rows"],
        "mean_confidence": profile["mean_confidence"],
        "train_accuracy": profile["train_accuracy"],
        "mean_chars": profile["feature_means"]["n_chars"],
        "mean_unk_rate": profile["feature_means"]["unk_rate"],
        "pca_components": profile["pca_components"],
    }
    if sanity is not None:
        metrics["validation_drifted_share"] = sanity["drifted_share"]
        metrics["validation_drifted_columns"] = len(sanity["drifted_columns"])
    return metrics


class Baseline:
    """A saved reference profile, ready to compare batches against."""

    def __init__(self, folder: str | Path):
        from safetensors.numpy import load_file

        self.folder = Path(folder)
        for name in ("profile.json", "reference.parquet", "pca.safetensors", "vocab.json"):
            if not (self.folder / name).exists():
                raise DataError(self.folder / name, None, None, "drift baseline incomplete; run the drift stage first")
        self.profile = read_json(self.folder / "profile.json")
        self.reference = pd.read_parquet(self.folder / "reference.parquet")
        arrays = load_file(str(self.folder / "pca.safetensors"))
        self.mean, self.components = arrays["mean"], arrays["components"]
        self.vocab = set(read_json(self.folder / "vocab.json"))


def compare_batch(baseline: Baseline, texts: Sequence[str], model_dir: str | Path, params, batch_size: int = 64,
                  html_path: Path | None = None, device: str = "cpu") -> dict:
    """Profile a new batch with the served model and test it against the baseline -> verdict dict."""
    if len(texts) < 2:
        raise DataError("batch", None, "text", f"need at least 2 texts to test for drift, got {len(texts)}")
    predictor, _ = load_served_model(model_dir, device)
    if predictor.labels != baseline.profile["labels"]:
        raise DataError(Path(model_dir) / "model.json", None, "labels",
                        "served model's labels differ from the baseline's; rebuild the baseline (drift stage)")
    cur, _, _ = profile_frame(list(texts), predictor, baseline.vocab, baseline.mean, baseline.components,
                              batch_size)
    numeric = baseline.profile["numeric_features"]
    rep = drift_report(baseline.reference, cur, numeric, params.stattest_threshold, params.drift_share, html_path)
    conf_ref = float(baseline.profile["mean_confidence"])
    conf_cur = float(cur[CONF_COLUMN].mean())
    conf_drop = conf_ref - conf_cur
    pred_p = rep["p_values"].get(PRED_COLUMN, 1.0)
    reasons = []
    if rep["drifted_share"] >= params.drift_share:
        reasons.append(f"{rep['drifted_share']:.0%} of features drifted (>= {params.drift_share:.0%}): "
                       + ", ".join(rep["drifted_columns"]))
    if pred_p < params.stattest_threshold:
        reasons.append(f"prediction distribution shifted (chi-square p={pred_p:.3g})")
    if conf_drop > params.max_confidence_drop:
        reasons.append(f"mean confidence dropped {conf_drop:.3f} (> {params.max_confidence_drop})")
    return {
        "drift": bool(reasons),
        "reasons": reasons,
        "rows": int(len(cur)),
        "drifted_share": rep["drifted_share"],
        "drifted_columns": rep["drifted_columns"],
        "p_values": rep["p_values"],
        "mean_confidence_reference": conf_ref,
        "mean_confidence_current": conf_cur,
        "confidence_drop": conf_drop,
        "prediction_distribution": _distribution(cur[PRED_COLUMN].tolist(), predictor.labels),
        "prediction_distribution_reference": baseline.profile["prediction_distribution"],
    }


def summary_line(metrics: dict) -> str:
    line = (f"reference profile of {metrics['reference_rows']} train rows, mean confidence "
            f"{metrics['mean_confidence']:.3f}, train accuracy {metrics['train_accuracy']:.3f}")
    if "validation_drifted_share" in metrics:
        line += (f"; validation vs train: {metrics['validation_drifted_columns']} columns drifted "
                 f"({metrics['validation_drifted_share']:.0%}, a sanity check: expect few)")
    return line


def main(argv=None) -> int:
    ap = stage_parser("drift", __doc__.splitlines()[0], inp="audited dataset folder", out="baseline folder to write")
    ap.add_argument("--model", required=True, help="exported model folder")

    def run(args) -> None:
        from domaintune.modeling import set_threads
        from domaintune.params import load_params

        from domaintune.device import stage_device

        base, params = load_params(args.params, "base", "drift")
        device = stage_device(base)
        if base.task == "generation":
            from domaintune.generation import run_drift

            return run_drift(args, params, device)
        splits, labels = read_dataset(args.in_dir)
        dataset_hash = read_hashes(args.in_dir, splits, labels)["dataset"]
        set_threads()
        with atomic_output(args.out) as tmp, atomic_output(args.metrics) as tmp_metrics:
            metrics = build_baseline(splits, labels, args.model, params, tmp, dataset_hash, device)
            write_json(tmp_metrics, metrics)
        return summary_line(metrics)

    return run_stage("drift", run, ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
