"""Evaluation and export of a causal LM fine-tuned by domaintune/sft.py (base.task: generation):
held-out perplexity of the start model vs the tuned one on the test responses, sample
generations, and the adapter merged into a float (for QLoRA: dequantised NF4) copy of the base,
checked against the unmerged logits (export.merge_tolerance) and saved for
transformers.pipeline("text-generation") with a model card.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from domaintune import llm
from domaintune.data import atomic_output, read_dataset, read_hashes, read_json, write_json
from domaintune.generation import RUN_FILE, _tokenizer, encode_split, load_causal_lm, pairs
from domaintune.params import load_params

def load_tuned(model_dir: str | Path):
    """(tuned model, tokenizer, run info): a full model as saved, or base (+ NF4 for qlora) + adapter."""
    run = json.loads((Path(model_dir) / RUN_FILE).read_text())
    if run["method"] == "full":
        model, tok = load_causal_lm(str(model_dir))
        return model.eval(), tok, run
    from peft import PeftModel

    from domaintune.training import quantize_encoder_4bit

    model, _ = load_causal_lm(run["base_model"])
    if run["method"] == "qlora":
        quantize_encoder_4bit(model, run["qlora_compute_dtype"])
    return PeftModel.from_pretrained(model, str(model_dir)).eval(), _tokenizer(model_dir), run


# ---------------------------------------------------------------- evaluate

def evaluate_generation(splits: dict[str, pd.DataFrame], model_dir: str, base, p) -> tuple[dict, list[dict]]:
    """Held-out perplexity on the test responses, start model vs tuned; greedy sample generations."""
    from domaintune.device import stage_device

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

    from domaintune.calibration import fit_temperature, single_label_metrics, softmax
    from domaintune.data import DataError

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


# ---------------------------------------------------------------- export

def merged_for_export(model_dir: str, test: pd.DataFrame, base, tolerance: float, n_check: int = 16):
    """(merged model, tokenizer, run info, merge check). The check compares merged vs unmerged logits on
    up to n_check test examples (prompt + response); a gap over `tolerance` raises StageError."""
    import torch

    from domaintune.device import stage_device
    from domaintune.stage import StageError

    dev = stage_device(base)
    tuned, tok, run = load_tuned(model_dir)
    tuned = tuned.to(dev)
    ids = [torch.tensor([e.input_ids], device=dev) for e in encode_split(tok, test.head(n_check), base.max_length)]
    if run["method"] == "full":
        return tuned, tok, run, {"method": "full", "had_adapter": False, "examples": len(ids),
                                 "max_rel_diff": 0.0, "tolerance": tolerance}
    with torch.no_grad():
        before = [tuned(input_ids=x).logits for x in ids]
        merged = llm.merge_adapter(tuned).eval()
        gap = max((llm.max_logit_gap(b, merged(input_ids=x).logits) for b, x in zip(before, ids)), default=0.0)
    check = {"method": run["method"], "had_adapter": True, "examples": len(ids), "max_rel_diff": gap,
             "tolerance": tolerance,
             "merged_into": "dequantised NF4 base" if run["method"] == "qlora" else "float base"}
    if gap > tolerance:
        raise StageError(f"merged model disagrees with the unmerged one: max logit difference {gap:.3g} "
                         f"(relative) > export.merge_tolerance {tolerance}")
    return merged, tok, run, check


def save_export(model, tok, out: Path, max_new_tokens: int) -> None:
    import torch

    model.generation_config.max_new_tokens = max_new_tokens
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    with torch.no_grad():
        model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def pipeline_check(out: Path, prompt: str, tok) -> str:
    """Load the export with transformers.pipeline('text-generation') and complete one prompt."""
    from transformers import pipeline

    gen = pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    res = gen(llm.prompt_text(tok, prompt), max_new_tokens=8, do_sample=False, return_full_text=False)
    return res[0]["generated_text"]


def model_card(run: dict, check: dict, tok, eval_metrics: dict, intended_use: str, max_new_tokens: int) -> str:
    template = getattr(tok, "chat_template", None)
    fmt = (f"The tokenizer's chat template (one user turn, then the assistant's reply):\n\n```jinja\n{template}\n```"
           if template else f"The default template (domaintune/llm.py):\n\n```\n{llm.DEFAULT_TEMPLATE}"
                            "{response}<eos>\n```")
    ppl = eval_metrics.get("perplexity", {})
    return "\n".join([
        "# Model card (generation)", "",
        f"Causal LM fine-tuned by domaintune: method `{run['method']}` on `{run['base_model']}`.", "",
        "## Prompt format", "", fmt, "",
        "## Generation settings", "",
        f"Greedy decoding (`do_sample: false`), at most {max_new_tokens} new tokens, stop at "
        f"`{tok.eos_token}` (saved in generation_config.json).", "",
        "## Merge", "",
        f"Adapter merged: {check['had_adapter']} ({check.get('merged_into', 'no adapter')}); merged vs unmerged "
        f"logits on {check['examples']} test examples: max relative difference {check['max_rel_diff']:.3g} "
        f"(tolerance {check['tolerance']}).", "",
        "## Evaluation", "",
        f"Test-response perplexity: start {ppl.get('base', float('nan')):.3f}, "
        f"tuned {ppl.get('tuned', float('nan')):.3f}.", "",
        "## Intended use", "", intended_use, "",
        "Load it with `transformers.pipeline('text-generation', model=<this folder>)`.", ""])


# ---------------------------------------------------------------- stage I/O

def run_evaluate(args, base, params, check_gate) -> str:
    """`check_gate(after, gate)`: the evaluate stage's own quality gate, applied to the label-set metrics
    when evaluate.label_set is declared (before anything is written)."""
    splits, _ = read_dataset(args.in_dir)
    metrics, samples = evaluate_generation(splits, args.model, base, params)
    if "classification" in metrics:
        check_gate(metrics["classification"]["after"], params.gate)
    with atomic_output(args.out) as out, atomic_output(args.metrics) as met:
        out.mkdir()
        write_json(out / "metrics.json", metrics)
        write_json(out / "samples.json", samples)
        (out / "report.md").write_text(eval_report(metrics, samples), encoding="utf-8")
        write_json(met, metrics)
    p = metrics["perplexity"]
    return f"test-response perplexity {p['base']:.2f} (start) -> {p['tuned']:.2f} (tuned)"


def run_export(args, base, params) -> str:
    from domaintune.data import DataError

    in_dir = Path(args.in_dir)
    splits, _ = read_dataset(in_dir)
    if len(splits["test"]) == 0:
        raise DataError(in_dir / "test.parquet", None, None, "empty: nothing to verify the export on")
    eval_metrics = read_json(Path(args.calibration) / "metrics.json")
    ev = load_params(args.params, "evaluate")
    model, tok, run, check = merged_for_export(args.model, splits["test"], base, params.merge_tolerance)
    with atomic_output(args.out) as out, atomic_output(args.metrics) as met:
        save_export(model, tok, out, ev.max_new_tokens)
        sample = pipeline_check(out, splits["test"]["text"].iloc[0], tok)
        (out / "README.md").write_text(model_card(run, check, tok, eval_metrics, params.intended_use,
                                                      ev.max_new_tokens), encoding="utf-8")
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        metrics = {"task": "generation", "merge_check": check, "size_bytes": size,
                   "pipeline_check": {"loaded": True, "sample_chars": len(sample)},
                   "dataset_hash": read_hashes(in_dir, splits, [])["dataset"]}
        cls = eval_metrics.get("classification")  # the label set and fitted temperature: what monitor scores with
        cls = {"labels": cls["labels"], "temperature": cls["temperature"]} if cls else None
        write_json(out / "export_info.json", {**metrics, "method": run["method"], "base_model": run["base_model"],
                                              "max_length": base.max_length, "classification": cls})
        write_json(met, metrics)
    return f"merged ({run['method']}), max logit gap {check['max_rel_diff']:.2g}; loads in pipeline('text-generation')"

