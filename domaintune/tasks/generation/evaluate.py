"""The evaluate hook of a causal LM: held-out perplexity of the start model and the tuned one on the test
responses, sample generations; with evaluate.label_set each label scored by its log-likelihood as the
response, a temperature fitted on validation, and the classifier's evaluate.gate applied before any write."""
from __future__ import annotations

from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset
from domaintune.evaluate.classifier import check_gate
from domaintune.evaluate.generation import eval_report, evaluate_generation


def run(io: StageIO) -> str:
    base, params = load_params(io.params, "base", "evaluate")
    return evaluate_into(io, base, params)


def evaluate_into(io: StageIO, base, params) -> str:
    """Evaluate io.model on io.in_dir and write io.out / io.metrics (nothing when the gate fails)."""
    splits, _ = read_dataset(io.in_dir)
    metrics, samples = evaluate_generation(splits, io.model, base, params)
    if "classification" in metrics:
        check_gate(metrics["classification"]["after"], params.gate)
    with atomic_output(io.out) as out, atomic_output(io.metrics) as met:
        out.mkdir()
        write_json(out / "metrics.json", metrics)
        write_json(out / "samples.json", samples)
        (out / "report.md").write_text(eval_report(metrics, samples), encoding="utf-8")
        write_json(met, metrics)
    p = metrics["perplexity"]
    return f"test-response perplexity {p['base']:.2f} (start) -> {p['tuned']:.2f} (tuned)"

