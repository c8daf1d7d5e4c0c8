"""Evaluation of a tuned causal LM: held-out perplexity, samples, label-set accuracy."""
from __future__ import annotations

import pandas as pd

from domaintune.core.device import stage_device
from domaintune.core.errors import DataError
from domaintune.evaluate.calibration import fit_temperature, single_label_metrics, softmax
from domaintune.modeling import llm
from domaintune.modeling.causal import encode_split, load_causal_lm, load_tuned, pairs


def evaluate_generation(splits: dict[str, pd.DataFrame], model_dir: str, base, p) -> tuple[dict, list[dict]]:
    """Held-out perplexity on the test responses, start model vs tuned; greedy sample generations."""
    dev = stage_device(base)
    tuned, tok, run = load_tuned(model_dir)
    start, _ = load_causal_lm(run["base_model"])
    tuned, start = tuned.to(dev), start.to(dev)
    test = pairs(encode_split(tok, splits["test"], base.max_length))
    before = llm.perplexity(start.eval(), test, tok.pad_token_id, p.batch_size)
    after = llm.perplexity(tuned, test, tok.pad_token_id, p.batch_size)
    df = splits["test"].head(p.samples)
    outs = llm.generate(tuned, tok, df["text"].tolist(), p.max_new_tokens)
    samples = [{"id": i, "prompt": q, "reference": r, "generated": g}
               for i, q, r, g in zip(df["id"], df["text"], df["label"], outs)]
    metrics = {"task": "generation", "test_rows": len(splits["test"]), "test_response_tokens": after["tokens"],
               "perplexity": {"base": before["perplexity"], "tuned": after["perplexity"]},
               "nll": {"base": before["nll"], "tuned": after["nll"]}, "samples": len(samples),
               "generation": {"max_new_tokens": p.max_new_tokens, "do_sample": False}}
    if p.label_set:
        metrics["classification"] = label_set_metrics(tuned, tok, splits, base, p)
    return metrics, samples



def label_set_metrics(model, tok, splits: dict[str, pd.DataFrame], base, p) -> dict:
    """Classification as generation: each declared label's log-likelihood as the response is its score;
    a temperature fitted on validation turns scores into calibrated probabilities over the label set;
    accuracy, macro-F1, ECE on test before and after (the `before` / `after` the gate reads)."""
    import numpy as np


    labels = list(p.label_set)
    scored = {}
    for s in ("validation", "test"):
        df = splits[s]
        unknown = ~df["label"].isin(labels)
        if unknown.any():
            row = int(np.flatnonzero(unknown.to_numpy())[0])
            raise DataError(f"{s}.parquet", row + 1, "label", f"response {df['label'].iloc[row]!r} is not in "
                            f"evaluate.label_set {labels}")
        y = np.array([labels.index(v) for v in df["label"]])
        scored[s] = (llm.label_loglik(model, tok, df["text"].tolist(), labels, base.max_length, p.batch_size), y)
    (val_x, val_y), (test_x, test_y) = scored["validation"], scored["test"]
    t = fit_temperature(val_x, val_y)["temperature"] if len(val_y) >= p.min_calibration_rows else 1.0
    return {"labels": labels, "temperature": t, "calibration_rows": int(len(val_y)),
            "before": single_label_metrics(softmax(test_x), test_y, len(labels), p.bins),
            "after": single_label_metrics(softmax(test_x, t), test_y, len(labels), p.bins)}



def eval_report(metrics: dict, samples: list[dict]) -> str:
    lines = ["# Evaluation (generation)", "",
             f"Test responses: {metrics['test_response_tokens']} tokens over {metrics['test_rows']} rows.", "",
             "| model | perplexity | NLL/token |", "|---|---|---|",
             f"| start (before SFT) | {metrics['perplexity']['base']:.3f} | {metrics['nll']['base']:.4f} |",
             f"| tuned | {metrics['perplexity']['tuned']:.3f} | {metrics['nll']['tuned']:.4f} |", "",
             "## Sample generations (greedy)", ""]
    if "classification" in metrics:
        c = metrics["classification"]
        lines[-3:-3] = [f"Classification as generation over {c['labels']} (temperature {c['temperature']:.3f}): "
                        f"accuracy {c['after']['accuracy']:.4f}, macro-F1 {c['after']['macro_f1']:.4f}, "
                        f"ECE {c['before']['ece']:.4f} -> {c['after']['ece']:.4f}", ""]
    for s in samples:
        lines += [f"### {s['id']}", "", f"**Prompt:** {s['prompt']}", "", f"**Reference:** {s['reference']}", "",
                  f"**Generated:** {s['generated']}", ""]
    return "\n".join(lines)
