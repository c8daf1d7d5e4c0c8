"""Evaluating a token tagger (base.task token_classification).

- Entity-level precision / recall / F1 by seqeval in strict IOB2 mode (a predicted entity counts only when
  its first word, last word and type all match a gold one), micro over all entities and per type, plus token
  accuracy (reported, but over 90% of words are O in most NER data: entity F1 is the metric that matters).
- Temperature scaling of the word (first sub-word) probabilities: one T fitted on validation words by NLL
  (evaluate/calibration.fit_temperature), ECE before/after on test words.
- Error tables on test: entities missed (a gold span no prediction overlaps with its type), invented (a
  predicted span matching no gold one), mistyped (the same words, another type).
- evaluate.gate on the calibrated test metrics: min_macro_f1 applies to entity F1 (micro), min_accuracy to token
  accuracy, max_ece to the calibrated word ECE; a failure writes nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from domaintune.core.device import stage_device
from domaintune.core.errors import DataError, StageError
from domaintune.core.io import atomic_output, read_json, write_json
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset
from domaintune.data.tokens import decode_rows, entities, entity_scores
from domaintune.evaluate.calibration import ece_mce, fit_temperature, log_softmax, reliability_bins, softmax
from domaintune.modeling.tagger import load_tagger, predicted_tags, torch_runner, word_logits

log = logging.getLogger("domaintune")


def error_tables(texts: Sequence[str], ids: Sequence[str], offsets, gold, pred) -> dict[str, pd.DataFrame]:
    """missed / invented / mistyped entities of every row (character spans and texts)."""
    rows = {"missed": [], "invented": [], "mistyped": []}
    for rid, text, off, g, p in zip(ids, texts, offsets, gold, pred):
        ge = {(a, b): t for t, a, b in entities(g)}
        pe = {(a, b): t for t, a, b in entities(p)}

        def span(a, b, off=off, text=text):
            s, e = off[a][0], off[b - 1][1]
            return {"start": s, "end": e, "entity": text[s:e]}

        for (a, b), t in ge.items():
            if (a, b) not in pe:
                rows["missed"].append({"id": rid, **span(a, b), "gold": t, "text": text})
            elif pe[(a, b)] != t:
                rows["mistyped"].append({"id": rid, **span(a, b), "gold": t, "predicted": pe[(a, b)], "text": text})
        for (a, b), t in pe.items():
            if (a, b) not in ge:
                rows["invented"].append({"id": rid, **span(a, b), "predicted": t, "text": text})
    cols = {"missed": ["id", "start", "end", "entity", "gold", "text"],
            "invented": ["id", "start", "end", "entity", "predicted", "text"],
            "mistyped": ["id", "start", "end", "entity", "gold", "predicted", "text"]}
    return {k: pd.DataFrame(v, columns=cols[k]) for k, v in rows.items()}


def check_entity_gate(after: dict, gate: dict) -> None:
    fails = []
    if "min_macro_f1" in gate and after["f1"] < gate["min_macro_f1"]:
        fails.append(f"entity F1 {after['f1']:.4f} < evaluate.gate.min_macro_f1 {gate['min_macro_f1']} "
                     "(token_classification: the gate's F1 is entity-level F1)")
    if "min_accuracy" in gate and after["token_accuracy"] < gate["min_accuracy"]:
        fails.append(f"token accuracy {after['token_accuracy']:.4f} < evaluate.gate.min_accuracy "
                     f"{gate['min_accuracy']}")
    if "max_ece" in gate and after["ece"] > gate["max_ece"]:
        fails.append(f"word ECE (after calibration) {after['ece']:.4f} > evaluate.gate.max_ece {gate['max_ece']}")
    if fails:
        raise StageError("quality gate failed: " + "; ".join(fails) + " (nothing written)")


def _flat(wl, tags, names):
    index = {t: i for i, t in enumerate(names)}
    logits = np.concatenate([lg[k] for lg, k in zip(wl.logits, wl.kept)]) if wl.logits else np.zeros((0, len(names)))
    y = np.array([index[t] for seq, k in zip(tags, wl.kept) for t, keep in zip(seq, k) if keep], dtype=int)
    return logits, y


def evaluate_tagger(in_dir: str | Path, model_dir: str | Path, params, device: str = "cpu"):
    splits, labels = read_dataset(in_dir)
    model, tok, meta = load_tagger(model_dir)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if sorted(names) != sorted(labels):
        raise DataError(Path(in_dir) / "labels.json", None, None, f"tags {labels} differ from the model's {names}")
    model.to(device)
    run = torch_runner(model, device)
    out = {}
    for s in ("validation", "test"):
        words, offsets, tags = decode_rows(splits[s])
        wl = word_logits(run, tok, words, len(names), meta["max_length"], params.batch_size)
        out[s] = (words, offsets, tags, wl)
    if not len(splits["test"]):
        raise DataError(Path(in_dir) / "test.parquet", None, None, "empty: nothing to evaluate on")
    vl, vy = _flat(out["validation"][3], out["validation"][2], names)
    if len(vy) < params.min_calibration_rows:
        raise DataError(Path(in_dir) / "validation.parquet", None, None, f"{len(vy)} validation words, fewer than "
                        f"evaluate.min_calibration_rows ({params.min_calibration_rows}) to fit a temperature on")
    calib = fit_temperature(vl, vy)
    words, offsets, tags, wl = out["test"]
    pred = predicted_tags(wl, names)
    scores = entity_scores(tags, pred)
    tl, ty = _flat(wl, tags, names)
    cal = {}
    for name, t in (("before", 1.0), ("after", calib["temperature"])):
        probs = softmax(tl, t)
        conf, correct = probs.max(1), probs.argmax(1) == ty
        ece, mce = ece_mce(conf, correct, params.bins)
        nll = float(-np.mean(log_softmax(tl, t)[np.arange(len(ty)), ty]))
        cal[name] = {"ece": ece, "mce": mce, "nll": nll, "reliability": reliability_bins(conf, correct, params.bins)}
    errors = error_tables(splits["test"]["text"].astype(str).tolist(), splits["test"]["id"].astype(str).tolist(),
                          offsets, tags, pred)
    metrics = {
        "task": "token_classification",
        "entity": {k: scores[k] for k in ("f1", "precision", "recall", "support", "per_type", "macro_f1")},
        "token_accuracy": scores["token_accuracy"],
        "calibration": {"temperature": calib["temperature"], "fitted_on_words": calib["rows"],
                        "ece_before": cal["before"]["ece"], "ece_after": cal["after"]["ece"],
                        "nll_before": cal["before"]["nll"], "nll_after": cal["after"]["nll"]},
        "errors": {k: len(v) for k, v in errors.items()},
        "test_sentences": len(splits["test"]), "test_words": int(sum(len(t) for t in tags)),
        "words_cut_by_max_length": int(sum((~k).sum() for k in wl.kept)),
        "labels": names,
        "model": {"method": meta.get("method"), "seed": meta.get("seed"), "base_encoder": meta.get("base_encoder")},
    }
    return metrics, cal, errors


def render_markdown(m: dict) -> str:
    e, c = m["entity"], m["calibration"]
    lines = ["# Evaluation (token classification, test split)", "",
             f"Entity-level (seqeval, strict IOB2): **F1 {e['f1']:.4f}**, precision {e['precision']:.4f}, "
             f"recall {e['recall']:.4f} over {e['support']} gold entities; token accuracy {m['token_accuracy']:.4f} "
             "(most words are O: read entity F1).", "",
             f"Temperature {c['temperature']:.3f} (fitted on {c['fitted_on_words']} validation words): word ECE "
             f"{c['ece_before']:.4f} -> {c['ece_after']:.4f}, NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}.", "",
             "| type | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for t, v in sorted(e["per_type"].items()):
        lines.append(f"| {t} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |")
    lines += ["", "Errors: " + ", ".join(f"{k} {v}" for k, v in m["errors"].items())
              + " (errors/missed.csv, invented.csv, mistyped.csv)", ""]
    return "\n".join(lines)


def evaluate_stage(io: StageIO) -> str:
    base, params = load_params(io.params, "base", "evaluate")
    metrics, cal, errors = evaluate_tagger(io.in_dir, io.model, params, stage_device(base))
    after = {"f1": metrics["entity"]["f1"], "token_accuracy": metrics["token_accuracy"],
             "ece": metrics["calibration"]["ece_after"]}
    check_entity_gate(after, params.gate)  # before any write: a failed gate leaves no outputs
    with atomic_output(io.out) as out, atomic_output(io.metrics) as met:
        (out / "errors").mkdir(parents=True)
        (out / "plots").mkdir()
        for k, df in errors.items():
            df.to_csv(out / "errors" / f"{k}.csv", index=False)
        write_json(out / "metrics.json", metrics)
        write_json(out / "calibration.json", {"temperature": metrics["calibration"]["temperature"],
                                              "labels": metrics["labels"]})
        pd.DataFrame([{"type": t, "f1": v["f1"]} for t, v in metrics["entity"]["per_type"].items()]) \
            .to_csv(out / "plots" / "per_type_f1.csv", index=False)
        pd.DataFrame([{"series": s, "confidence": b["confidence"], "accuracy": b["accuracy"]}
                      for s in ("before", "after") for b in cal[s]["reliability"] if b["count"]]) \
            .to_csv(out / "plots" / "reliability.csv", index=False)
        (out / "report.md").write_text(render_markdown(metrics), encoding="utf-8")
        write_json(met, metrics)
    e, c = metrics["entity"], metrics["calibration"]
    return (f"test entity F1 {e['f1']:.4f} (P {e['precision']:.4f}, R {e['recall']:.4f}), token accuracy "
            f"{metrics['token_accuracy']:.4f}; T={c['temperature']:.3f} word ECE {c['ece_before']:.4f} -> "
            f"{c['ece_after']:.4f}")


def read_calibration(folder: str | Path) -> dict:
    return read_json(Path(folder) / "calibration.json")
