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


def load_served_model(model_dir: str | Path):
    """The exported classifier with its calibration (domaintune.predict.Predictor reads model.json)."""
    from domaintune.predict import Predictor

    model_dir = Path(model_dir)
    if not (model_dir / "model.json").exists():
        raise DataError(model_dir / "model.json", None, None, "exported model missing; run the export stage first")
    predictor = Predictor.load(model_dir)  # validates the temperature, naming model.json
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
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    cols = list(numeric) + [PRED_COLUMN]
    definition = DataDefinition(numerical_columns=list(numeric), categorical_columns=[PRED_COLUMN])
    report = Report([DataDriftPreset(columns=cols, num_method="ks", cat_method="chisquare",
                                     threshold=threshold, drift_share=drift_share)])
    # Round away float noise: a feature whose values differ only in the last bits (a saturated confidence,
    # say) makes numpy's histogram inside evidently fail ("Cannot create 10 finite-sized bins").
    cur, ref = current[cols].copy(), reference[cols].copy()
    cur[list(numeric)] = cur[list(numeric)].round(9)
    ref[list(numeric)] = ref[list(numeric)].round(9)
    snap = report.run(Dataset.from_pandas(cur, data_definition=definition),
                      Dataset.from_pandas(ref, data_definition=definition))
    if html_path is not None:
        snap.save_html(str(html_path))
    columns: dict[str, float] = {}
    share = None
    for m in snap.dict()["metrics"]:
        cfg = m["config"]
        if cfg["type"].endswith("ValueDrift"):
            columns[cfg["column"]] = float(m["value"])
        elif cfg["type"].endswith("DriftedColumnsCount"):
            share = float(m["value"]["share"])
    drifted = sorted(c for c, p in columns.items() if p < threshold)
    return {"p_values": columns, "drifted_columns": drifted,
            "drifted_share": share if share is not None else len(drifted) / max(len(columns), 1)}


def build_baseline(splits: dict[str, pd.DataFrame], labels: list[str], model_dir: str | Path, params,
                   out: Path, dataset_hash: str | None = None) -> dict:
    """Write the reference profile into `out` (a fresh folder); return the metrics."""
    train = splits["train"]
    if len(train) < 2:
        raise DataError("train.parquet", None, "text", f"need at least 2 train rows for a reference profile, got {len(train)}")
    predictor, t_source = load_served_model(model_dir)
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
                  html_path: Path | None = None) -> dict:
    """Profile a new batch with the served model and test it against the baseline -> verdict dict."""
    if len(texts) < 2:
        raise DataError("batch", None, "text", f"need at least 2 texts to test for drift, got {len(texts)}")
    predictor, _ = load_served_model(model_dir)
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


def main(argv=None) -> int:
    ap = stage_parser("drift", __doc__.splitlines()[0], inp="audited dataset folder", out="baseline folder to write")
    ap.add_argument("--model", required=True, help="exported model folder")

    def run(args) -> None:
        from domaintune.modeling import set_threads
        from domaintune.params import load_params

        params = load_params(args.params, "drift")
        splits, labels = read_dataset(args.in_dir)
        dataset_hash = read_hashes(args.in_dir, splits, labels)["dataset"]
        set_threads()
        with atomic_output(args.out) as tmp, atomic_output(args.metrics) as tmp_metrics:
            metrics = build_baseline(splits, labels, args.model, params, tmp, dataset_hash)
            write_json(tmp_metrics, metrics)

    return run_stage("drift", run, ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
