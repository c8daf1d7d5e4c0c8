"""Evaluation of a classifier, the evaluate stage's work: calibrate the fine-tuned classifier on validation,
score it on test, gate it.

Temperature scaling (one scalar T minimising validation NLL; per-label decision
thresholds for multi-label models) is fitted on the validation split only and
saved as calibration.json for export/predict. On the test split we report
accuracy, macro/weighted F1, NLL, Brier, ECE and MCE before and after
calibration, plots (DVC-renderable CSVs + PNGs) and an error analysis a person
can act on. A failed quality gate raises before anything is written, so
`dvc repro` stops and no version is made from a bad retrain.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from domaintune.core import device as devices
from domaintune.core.device import stage_device
from domaintune.core.errors import DataError, StageError
from domaintune.core.io import atomic_output, read_json, write_json
from domaintune.core.params import EvaluateParams, load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import encode_labels, read_dataset, split_labels
from domaintune.evaluate import abstain as ab
from domaintune.evaluate import calibration as cal
from domaintune.evaluate import report as rp
from domaintune.evaluate.calibration import entropy
from domaintune.evaluate.report import md_table, metrics_table
from domaintune.modeling.chunks import LongText, document_report
from domaintune.modeling.encoders import load_classifier, load_tokenizer, predict_logits, set_threads

log = logging.getLogger("domaintune")

METRIC_KEYS = ("accuracy", "macro_f1", "weighted_f1", "nll", "brier", "ece", "mce")


@dataclass
class EvalResult:
    """Everything the stage writes, computed in memory first (so a gate failure writes nothing)."""

    problem_type: str
    labels: list[str]
    calibration: dict
    before: dict
    after: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    plot_data: dict[str, pd.DataFrame] = field(default_factory=dict)
    reliability: dict[str, list[dict]] = field(default_factory=dict)
    confidence: dict[str, np.ndarray] = field(default_factory=dict)
    confusion: np.ndarray | None = None
    abstainer: ab.Abstainer | None = None  # evaluate.abstain (None: method none)
    abstain: dict | None = None            # its test metrics (metrics/evaluate.json "abstain")
    risk_coverage: list[dict] | None = None


# ---------------------------------------------------------------- input checks
def check_labels(model_labels: list[str], data_labels: list[str], splits: dict[str, pd.DataFrame],
                 in_dir: str | Path, problem_type: str = "single_label") -> None:
    """The model's label list must be the dataset's, and every class it knows must be in test."""
    in_dir = Path(in_dir)
    known = set(model_labels)
    if problem_type == "multi_label":
        data_set = {p for lab in data_labels for p in split_labels(lab)}
    else:
        data_set = set(data_labels)
    if data_set != known:
        raise DataError(in_dir / "labels.json", None, "labels",
                        f"model labels do not match the dataset's: only in model {sorted(known - data_set)}, "
                        f"only in data {sorted(data_set - known)} (was the model trained on another dataset version?)")
    for name in ("validation", "test"):
        df = splits[name]
        for i, (rid, lab) in enumerate(zip(df["id"], df["label"])):
            parts = split_labels(lab) if problem_type == "multi_label" else [lab]
            bad = [p for p in parts if p not in known]
            if bad:
                raise DataError(in_dir / f"{name}.parquet", f"{i} (id {rid})", "label",
                                f"label {bad[0]!r} is not one the model knows {sorted(known)}")
    if problem_type == "single_label":
        missing = sorted(known - set(splits["test"]["label"]))
        if missing:
            raise DataError(in_dir / "test.parquet", None, "label",
                            f"test split has no rows of class(es) {missing} that the model predicts; "
                            "per-class metrics and the gate would be meaningless (re-split with more test data)")


def check_calibration_rows(val: pd.DataFrame, params: EvaluateParams, in_dir: str | Path) -> None:
    if len(val) < params.min_calibration_rows:
        raise DataError(Path(in_dir) / "validation.parquet", None, None,
                        f"{len(val)} rows, fewer than evaluate.min_calibration_rows={params.min_calibration_rows}: "
                        "too few to fit a temperature")


# ---------------------------------------------------------------- core
def evaluate_logits(val: pd.DataFrame, test: pd.DataFrame, val_logits: np.ndarray, test_logits: np.ndarray,
                    labels: list[str], params: EvaluateParams, problem_type: str = "single_label") -> EvalResult:
    """Pure core: calibrate on validation logits, score and analyse test logits."""
    if problem_type == "multi_label":
        return _evaluate_multi_label(val, test, val_logits, test_logits, labels, params)

    y_val = encode_labels(val, labels, "single_label", "validation")
    y_test = encode_labels(test, labels, "single_label", "test")
    fit = cal.fit_temperature(val_logits, y_val)
    T = fit["temperature"]
    p_before = cal.softmax(test_logits, 1.0)
    p_after = cal.softmax(test_logits, T)
    before = cal.single_label_metrics(p_before, y_test, len(labels), params.bins)
    after = cal.single_label_metrics(p_after, y_test, len(labels), params.bins)
    calibration = {"problem_type": "single_label", "method": "temperature", "temperature": T,
                   "labels": list(labels),
                   "validation_rows": fit["rows"], "validation_nll_before": fit["nll_before"],
                   "validation_nll_after": fit["nll_after"], "at_bound": fit["at_bound"], "bins": params.bins}
    res = EvalResult("single_label", list(labels), calibration, before, after)
    pred = p_after.argmax(axis=1)  # T > 0 never changes the argmax
    conf_after, conf_before = p_after.max(axis=1), p_before.max(axis=1)
    res.confidence = {"before calibration": conf_before, "after calibration": conf_after}
    res.reliability = {"before calibration": cal.reliability_bins(conf_before, pred == y_test, params.bins),
                       "after calibration": cal.reliability_bins(conf_after, pred == y_test, params.bins)}
    res.confusion = _confusion(y_test, pred, len(labels))
    res.tables = _error_analysis(test, labels, y_test, pred, p_after, res.confusion, params)
    res.plot_data = _plot_data(test, labels, y_test, pred, res)
    return res


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, pred), 1)
    return cm


def _error_analysis(test: pd.DataFrame, labels: list[str], y: np.ndarray, pred: np.ndarray, probs: np.ndarray,
                    cm: np.ndarray, params: EvaluateParams) -> dict[str, pd.DataFrame]:
    from sklearn.metrics import precision_recall_fscore_support


    lab = np.asarray(labels, dtype=object)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=list(range(len(labels))), zero_division=0)
    per_class = pd.DataFrame({"class": labels, "precision": p, "recall": r, "f1": f, "support": s.astype(int),
                              "predicted": cm.sum(axis=0).astype(int)})
    conf = probs.max(axis=1)
    ent = entropy(probs)
    rows = pd.DataFrame({"id": test["id"].to_numpy(), "text": test["text"].to_numpy(), "label": lab[y],
                         "predicted": lab[pred], "confidence": conf, "entropy": ent,
                         "p_true": probs[np.arange(len(y)), y]})
    wrong = rows[pred != y]
    # Stable sorts with id as tie-break: the same inputs always give the same report.
    confident_errors = wrong.sort_values(["confidence", "id"], ascending=[False, True],
                                         kind="stable").head(params.top_k)
    uncertain = rows.sort_values(["entropy", "id"], ascending=[False, True], kind="stable").head(params.top_k)
    pairs = [(labels[i], labels[j], int(cm[i, j]), float(cm[i, j] / max(cm[i].sum(), 1)))
             for i in range(len(labels)) for j in range(len(labels)) if i != j and cm[i, j] > 0]
    confused = pd.DataFrame(pairs, columns=["actual", "predicted", "count", "fraction_of_actual"])
    confused = confused.sort_values(["count", "actual", "predicted"], ascending=[False, True, True],
                                    kind="stable").head(params.top_k)
    words = test["text"].astype(str).str.split().str.len().to_numpy()
    by_len = _length_buckets(words, pred == y, params.length_buckets)
    return {"per_class": per_class.reset_index(drop=True), "confident_errors": confident_errors.reset_index(drop=True),
            "uncertain": uncertain.reset_index(drop=True), "confused_pairs": confused.reset_index(drop=True),
            "by_length": by_len}


def _length_buckets(words: np.ndarray, correct: np.ndarray, n: int) -> pd.DataFrame:
    """Accuracy per text-length bucket; quantile edges so each bucket has a similar row count."""
    edges = np.unique(np.quantile(words, np.linspace(0, 1, n + 1)).round())
    if len(edges) < 2:
        edges = np.array([words.min(), words.max()])
    idx = np.clip(np.searchsorted(edges, words, side="right") - 1, 0, max(len(edges) - 2, 0))
    out = []
    for b in range(max(len(edges) - 1, 1)):
        m = idx == b
        if not m.any():
            continue
        lo, hi = int(words[m].min()), int(words[m].max())
        out.append({"words": f"{lo}-{hi}", "min_words": lo, "max_words": hi, "rows": int(m.sum()),
                    "accuracy": float(correct[m].mean())})
    return pd.DataFrame(out)


def _plot_data(test, labels, y, pred, res: EvalResult) -> dict[str, pd.DataFrame]:
    """CSV data for `dvc plots show` (templates declared in dvc.yaml; series named in a `series` column)."""
    lab = np.asarray(labels, dtype=object)
    data = {"confusion": pd.DataFrame({"actual": lab[y], "predicted": lab[pred]}),
            "reliability": reliability_frame(res.reliability, ece_by_series(res))}
    data["confidence_hist"] = pd.DataFrame([
        {"confidence_bin": f"{b['lower']:.2f}-{b['upper']:.2f}", "rows": b["count"], "series": name}
        for name, bins in res.reliability.items() for b in bins])
    data["per_class_f1"] = res.tables["per_class"][["class", "f1"]]
    return data


def ece_by_series(res: EvalResult) -> dict[str, float]:
    """The test ECE of each reliability series (single-label: before/after calibration)."""
    if res.problem_type == "multi_label":
        return {name: float(res.after["ece"]) for name in res.reliability}
    return {"before calibration": float(res.before["ece"]), "after calibration": float(res.after["ece"])}


def reliability_frame(reliability: dict[str, list[dict]], ece: dict[str, float]) -> pd.DataFrame:
    """One row per non-empty bin of each series, plus the diagonal; series named with their ECE."""
    rows = [{"confidence": c, "accuracy": c, "count": 0, "series": "perfectly calibrated"} for c in (0.0, 1.0)]
    for name, bins in reliability.items():
        label = f"{name} (ECE {ece[name]:.3f})" if name in ece else name
        rows += [{"confidence": b["confidence"], "accuracy": b["accuracy"], "count": b["count"], "series": label}
                 for b in bins if b["count"]]
    return pd.DataFrame(rows, columns=["confidence", "accuracy", "count", "series"])


def _evaluate_multi_label(val, test, val_logits, test_logits, labels, params) -> EvalResult:
    """Multi-label: probabilities are per-label sigmoids; calibration = per-label thresholds on validation."""
    from sklearn.metrics import precision_recall_fscore_support


    Y_val = encode_labels(val, labels, "multi_label", "validation").astype(int)
    Y_test = encode_labels(test, labels, "multi_label", "test").astype(int)
    p_val, p_test = cal.sigmoid(val_logits), cal.sigmoid(test_logits)
    thr = cal.tune_thresholds(p_val, Y_val)
    before = cal.multi_label_metrics(p_test, Y_test, np.full(len(labels), 0.5), params.bins)
    after = cal.multi_label_metrics(p_test, Y_test, thr, params.bins)
    calibration = {"problem_type": "multi_label", "method": "thresholds", "temperature": 1.0,
                   "labels": list(labels),
                   "thresholds": {lab: float(t) for lab, t in zip(labels, thr)},
                   "validation_rows": int(len(val)), "bins": params.bins}
    res = EvalResult("multi_label", list(labels), calibration, before, after)
    pred = (p_test >= thr[None, :]).astype(int)
    p, r, f, s = precision_recall_fscore_support(Y_test, pred, zero_division=0)
    per_class = pd.DataFrame({"class": labels, "precision": p, "recall": r, "f1": f, "support": s.astype(int),
                              "predicted": pred.sum(axis=0).astype(int), "threshold": thr})
    flat_conf, flat_y = p_test.ravel(), Y_test.ravel()
    res.reliability = {"probabilities": cal.reliability_bins(flat_conf, flat_y, params.bins)}
    res.confidence = {"probabilities": flat_conf}
    lab = np.asarray(labels, dtype=object)
    join = lambda m: ["|".join(lab[row.astype(bool)]) for row in m]  # noqa: E731
    # The "confidence" of a multi-label decision: the least certain of its per-label calls.
    margin = np.abs(p_test - thr[None, :]).min(axis=1)
    wrong = (pred != Y_test).any(axis=1)
    rows = pd.DataFrame({"id": test["id"].to_numpy(), "text": test["text"].to_numpy(),
                         "label": join(Y_test), "predicted": join(pred), "min_margin": margin,
                         "wrong_labels": (pred != Y_test).sum(axis=1)})
    conf_err = rows[wrong].assign(worst_p=np.abs(p_test - Y_test).max(axis=1)[wrong])
    conf_err = conf_err.sort_values(["worst_p", "id"], ascending=[False, True], kind="stable").head(params.top_k)
    uncertain = rows.sort_values(["min_margin", "id"], kind="stable").head(params.top_k)
    words = test["text"].astype(str).str.split().str.len().to_numpy()
    res.tables = {"per_class": per_class, "confident_errors": conf_err.reset_index(drop=True),
                  "uncertain": uncertain.reset_index(drop=True),
                  "by_length": _length_buckets(words, ~wrong, params.length_buckets)}
    res.plot_data = {"reliability": reliability_frame(res.reliability, ece_by_series(res)),
                     "per_class_f1": per_class[["class", "f1"]]}
    return res


def check_gate(after: dict, gate: dict) -> None:
    """Raise StageError listing every failed threshold of evaluate.gate."""
    fails = []
    if "min_accuracy" in gate and after["accuracy"] < gate["min_accuracy"]:
        fails.append(f"accuracy {after['accuracy']:.4f} < evaluate.gate.min_accuracy {gate['min_accuracy']}")
    if "min_macro_f1" in gate and after["macro_f1"] < gate["min_macro_f1"]:
        fails.append(f"macro_f1 {after['macro_f1']:.4f} < evaluate.gate.min_macro_f1 {gate['min_macro_f1']}")
    if "max_ece" in gate and after["ece"] > gate["max_ece"]:
        fails.append(f"ece (after calibration) {after['ece']:.4f} > evaluate.gate.max_ece {gate['max_ece']}")
    if fails:
        raise StageError("quality gate failed: " + "; ".join(fails) + " (nothing written)")


def seed_summary(per_seed: dict[str, dict]) -> dict:
    """Mean and (population) std over seeds of each before/after metric."""
    out: dict = {"n": len(per_seed), "per_seed": per_seed, "mean": {}, "std": {}}
    for phase in ("before", "after"):
        keys = list(next(iter(per_seed.values()))[phase])
        out["mean"][phase] = {k: float(np.mean([s[phase][k] for s in per_seed.values()])) for k in keys}
        out["std"][phase] = {k: float(np.std([s[phase][k] for s in per_seed.values()])) for k in keys}
    return out


# ---------------------------------------------------------------- writing
def write_report(out: Path, res: EvalResult, metrics: dict, model_meta: dict, seeds: dict | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plots = out / "plots"
    plots.mkdir()
    write_json(out / "calibration.json", res.calibration)
    write_json(out / "metrics.json", metrics)  # a copy beside calibration.json for export's model card
    for name, df in res.tables.items():
        df.to_csv(out / f"{name}.csv", index=False)
    write_json(out / "error_analysis.json",
               {name: df.to_dict(orient="records") for name, df in res.tables.items()})
    for name, df in res.plot_data.items():
        df.to_csv(plots / f"{name}.csv", index=False)
    write_json(out / "reliability.json", res.reliability)
    if res.confusion is not None:
        rp.plot_confusion(res.confusion, res.labels, out / "confusion.png")
    rp.plot_reliability(res.reliability, out / "reliability.png", ece_by_series(res))
    rp.plot_confidence_hist(res.confidence, res.calibration["bins"], out / "confidence_hist.png")
    rp.plot_per_class_f1(res.tables["per_class"], out / "per_class_f1.png")
    if res.abstainer is not None:
        res.abstainer.save_arrays(out)  # abstain.safetensors beside calibration.json (mahalanobis, trained)
        rp.plot_risk_coverage(res.risk_coverage, res.abstain, out / "risk_coverage.png")
    (out / "report.md").write_text(render_markdown(res, metrics, model_meta, seeds), encoding="utf-8")


def render_markdown(res: EvalResult, metrics: dict, meta: dict, seeds: dict | None) -> str:
    cal = res.calibration
    md = ["# Evaluation report\n",
          f"Model: method `{meta.get('method')}`, base `{meta.get('base_encoder', '?')}`, "
          f"{len(res.labels)} labels, {res.problem_type}. Test rows: {metrics['test_rows']}, "
          f"validation rows used for calibration: {cal['validation_rows']}.\n"]
    if res.problem_type == "single_label":
        md.append(f"Temperature fitted on validation: **T = {cal['temperature']:.4f}** "
                  f"(validation NLL {cal['validation_nll_before']:.4f} -> {cal['validation_nll_after']:.4f})"
                  + (" - T hit its search bound, check the model." if cal["at_bound"] else "") + "\n")
    else:
        md.append("Per-label decision thresholds tuned on validation (see per_class.csv `threshold`); "
                  "probabilities themselves are unchanged, so NLL/Brier/ECE do not move.\n")
    md += ["## Metrics on test\n", md_table(metrics_table(res.before, res.after)), ""]
    if seeds:
        rows = [{"seed": s, **{k: v["after"][k] for k in ("accuracy", "macro_f1", "ece")}}
                for s, v in seeds["per_seed"].items()]
        rows.append({"seed": "mean ± std", **{k: f"{seeds['mean']['after'][k]:.4f} ± {seeds['std']['after'][k]:.4f}"
                                               for k in ("accuracy", "macro_f1", "ece")}})
        md += [f"## Seeds ({seeds['n']}, after calibration)\n", md_table(pd.DataFrame(rows)), ""]
    t = res.tables
    md += ["## Per-class precision / recall / F1\n", "Sorted by F1, worst first.\n",
           md_table(t["per_class"].sort_values(["f1", "class"], kind="stable")), "",
           "## Most confident errors\n",
           "High-confidence errors are the dangerous ones: they pass any confidence threshold.\n",
           md_table(t["confident_errors"]), "",
           "## Most uncertain predictions\n", md_table(t["uncertain"]), ""]
    if "confused_pairs" in t:
        md += ["## Most confused class pairs\n", md_table(t["confused_pairs"]), ""]
    if res.abstain is not None:
        md += abstain_markdown(res.abstain)
    md += ["## Accuracy by text length (words)\n", md_table(t["by_length"]), "", "## Plots\n",
           "Interactive versions: `dvc plots show` (opens offline; data in plots/*.csv).\n"]
    pngs = [("Reliability diagram (ECE and rows per bin)", "reliability.png"),
            ("Confidence histogram", "confidence_hist.png"), ("Per-class F1", "per_class_f1.png")]
    if res.confusion is not None:
        pngs.insert(0, ("Confusion matrix", "confusion.png"))
    if res.abstain is not None:
        pngs.append(("Risk-coverage of the abstention score (test, in-scope rows)", "risk_coverage.png"))
    md += [f"![{title}]({name})\n" for title, name in pngs]
    return "\n".join(md)


def abstain_markdown(a: dict) -> list[str]:
    fit = a["fit"]
    md = ["## Abstention (out of scope)\n",
          f"Method **{a['method']}** ({fit['why']}), threshold {a['threshold']:.6g} fitted on the validation split "
          f"to keep {fit['in_scope_recall']:.0%} of its {fit['validation_rows']} rows; below it the model answers "
          f"`{a['label']}`. In-scope accuracy counts an abstention as an error.\n"]
    rows = [{"metric": k, "test": f"{a[k]:.4f}"} for k in ("in_scope_accuracy", "abstain_rate", "accuracy_answered",
                                                          "oos_recall", "oos_precision", "auroc", "fpr_at_95tpr")
            if a.get(k) is not None]
    md += [md_table(pd.DataFrame(rows)), ""]
    if any("validation_auroc" in c for c in fit["candidates"].values()):
        cand = pd.DataFrame([{"method": m, **c} for m, c in fit["candidates"].items()])
        md += [f"Candidates on validation against {fit['oos_validation_rows']} out-of-scope texts:\n",
               md_table(cand), ""]
    return md


# ---------------------------------------------------------------- model running
def model_logits(model_dir: str | Path, splits: dict[str, pd.DataFrame], batch_size: int,
                 names=("validation", "test"), device: str = "cpu", mean_pooled: bool = False,
                 texts: dict[str, list[str]] | None = None):
    """(meta, logits per split name) of `names`' texts (and of `texts`, more named lists); with
    mean_pooled=True (meta, logits, mean-pooled text vectors) from the same passes."""
    set_threads()
    model, tok, meta = load_classifier(model_dir)
    devices.place_for_inference(model, device)  # half precision on CUDA (tolerance: tests/train/test_engine.py)
    batch_size = devices.batch_size_for(device, batch_size, max(256, batch_size))
    ml = int(meta.get("max_length", 128))
    # one row per document: a model trained with base.long_text chunks pools its windows (model.json long_text),
    # so the temperature is fitted on document logits
    long_text = LongText.from_meta(meta)
    todo = {n: splits[n]["text"].tolist() for n in names} | (texts or {})
    if not mean_pooled:
        return meta, {n: predict_logits(model, tok, t, batch_size, ml, long_text=long_text) for n, t in todo.items()}
    out = {n: predict_logits(model, tok, t, batch_size, ml, mean_pooled=True, long_text=long_text)
           for n, t in todo.items()}
    return meta, {n: v[0] for n, v in out.items()}, {n: v[1] for n, v in out.items()}


def seed_dirs(model_dir: str | Path) -> dict[str, Path]:
    root = Path(model_dir) / "seeds"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "model.json").exists()}


def evaluate(in_dir: str | Path, model_dir: str | Path, params: EvaluateParams,
             device: str = "cpu") -> tuple[EvalResult, dict, dict, dict | None]:
    """Load, check, score the model (and each seed model); returns (result, metrics, meta, seeds)."""
    splits, labels = read_dataset(in_dir)
    meta = read_json(Path(model_dir) / "model.json")
    problem_type = meta.get("problem_type", "single_label")
    check_labels(meta["labels"], labels, splits, in_dir, problem_type)
    check_calibration_rows(splits["validation"], params, in_dir)
    abstain = params.abstain if problem_type == "single_label" else None
    if problem_type != "single_label" and params.abstain.method != "none":
        raise StageError(f"evaluate.abstain.method {params.abstain.method}: abstention applies to single-label "
                         "classifiers (this model is multi-label); set it to none")
    if abstain is not None and abstain.method != "none":
        oos = {key: ab.read_texts(path, f"evaluate.abstain.{key}") for key in ("oos_texts", "oos_test")
               if (path := getattr(abstain, key))}  # read (and checked) before any model runs
        wants_train = abstain.method in ab.FEATURE_METHODS or (abstain.method == "auto" and "oos_texts" in oos)
        meta, logits, feats = model_logits(model_dir, splits, params.batch_size, device=device, mean_pooled=True,
                                           names=("validation", "test") + (("train",) if wants_train else ()),
                                           texts=oos)
    else:
        meta, logits = model_logits(model_dir, splits, params.batch_size, device=device)
    res = evaluate_logits(splits["validation"], splits["test"], logits["validation"], logits["test"],
                          meta["labels"], params, problem_type)
    if abstain is not None and abstain.method != "none":
        fit_abstention(res, splits, logits, feats, abstain)
    seeds = None
    if dirs := seed_dirs(model_dir):
        per_seed = {}
        for seed, d in dirs.items():
            smeta = read_json(d / "model.json")
            if str(smeta.get("seed")) == str(meta.get("seed")):
                sres = res  # finetune saves the best seed's model at the top level too: scored above
            else:
                check_labels(smeta["labels"], labels, splits, in_dir, problem_type)
                smeta, slog = model_logits(d, splits, params.batch_size, device=device)
                sres = evaluate_logits(splits["validation"], splits["test"], slog["validation"], slog["test"],
                                       smeta["labels"], params, problem_type)
            per_seed[seed] = {"before": sres.before, "after": sres.after,
                              "temperature": sres.calibration["temperature"]}
        seeds = seed_summary(per_seed)
    metrics = build_metrics(res, len(splits["test"]), seeds)
    # how the model read the test documents (base.long_text): lengths in tokens, the share not read whole
    metrics["long_text"] = document_report(load_tokenizer(str(Path(model_dir) / "tokenizer")),
                                           splits["test"]["text"].tolist(), int(meta.get("max_length", 128)),
                                           LongText.from_meta(meta))
    return res, metrics, meta, seeds


def fit_abstention(res: EvalResult, splits: dict[str, pd.DataFrame], logits: dict, feats: dict, abstain) -> None:
    """evaluate.abstain: fit the score on train (mahalanobis, trained) and its threshold on validation, with the
    calibrated temperature; score it on test (and the out-of-scope test texts). Fills res.abstainer / abstain /
    risk_coverage and the calibration's "abstain" entry (what export and Predictor apply)."""
    labels = res.labels

    def split(name: str) -> ab.Split:
        y = encode_labels(splits[name], labels, "single_label", name) if name in splits else None
        return ab.Split(logits[name], feats[name], y)

    T = float(res.calibration["temperature"])
    abstainer, info = ab.fit_abstention(abstain.method, abstain.in_scope_recall, abstain.label, T, len(labels),
                                        split("train") if "train" in logits else None, split("validation"),
                                        split("oos_texts") if "oos_texts" in logits else None)
    metrics, curve = ab.abstain_metrics(abstainer, split("test"), split("oos_test") if "oos_test" in logits
                                        else None)
    res.abstainer, res.risk_coverage = abstainer, curve
    res.abstain = {**metrics, "fit": info}
    res.calibration["abstain"] = abstainer.to_json()
    res.plot_data["risk_coverage"] = pd.DataFrame(curve)


def build_metrics(res: EvalResult, test_rows: int, seeds: dict | None) -> dict:
    m = {"test_rows": int(test_rows), "temperature": float(res.calibration["temperature"]),
         "before": res.before, "after": res.after}
    if getattr(res, "abstain", None) is not None:  # duck-typed results (tests' fake pipeline) have none
        m["abstain"] = res.abstain
    if seeds:
        m["seeds"] = {"n": seeds["n"], "mean": seeds["mean"]["after"], "std": seeds["std"]["after"],
                      **{s: v["after"] for s, v in seeds["per_seed"].items()}}
    return m


def evaluate_stage(io: StageIO) -> None:
    """The evaluate stage of a classifier: calibrate on validation, score test, gate, write the report."""
    base, params = load_params(io.params, "base", "evaluate")
    res, metrics, meta, seeds = evaluate(io.in_dir, io.model, params, stage_device(base))
    check_gate(res.after, params.gate)  # before any write: a failed gate leaves no outputs
    with atomic_output(io.out) as tmp_out, atomic_output(io.metrics) as tmp_metrics:
        write_report(tmp_out, res, metrics, meta, seeds)
        write_json(tmp_metrics, metrics)
    a, b = res.after, res.before
    log.info("T=%.3f accuracy %.4f macro-F1 %.4f ECE %.4f -> %.4f NLL %.4f -> %.4f", res.calibration["temperature"],
             a["accuracy"], a["macro_f1"], b["ece"], a["ece"], b["nll"], a["nll"])
    if res.abstain is not None:
        x = res.abstain
        log.info("abstain: %s threshold %.6g, in-scope accuracy %.4f, abstain rate %.4f%s", x["method"],
                 x["threshold"], x["in_scope_accuracy"], x["abstain_rate"],
                 f", OOS recall {x['oos_recall']:.4f}, AUROC {x['auroc']:.4f}" if "oos_recall" in x else "")
