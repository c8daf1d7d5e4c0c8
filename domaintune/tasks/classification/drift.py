"""The drift hook of a classifier: the reference profile that `domaintune monitor` compares new batches with.

Text features of train + validation, the served model's outputs (predicted label, calibrated confidence, PCA
of its embeddings) on the validation rows it did not train on, the measured reference accuracy, and the null
of every drift signal calibrated on resamples of that reference (so an iid batch alarms with probability
<= drift.false_alarm_rate at any size). The statistics live in domaintune/monitor/drift.py.
"""
from __future__ import annotations

from domaintune.core.device import stage_device
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset, read_hashes
from domaintune.modeling.encoders import set_threads
from domaintune.monitor.drift import build_baseline
from domaintune.tasks import load_predictor


def summary_line(metrics: dict) -> str:
    exp = metrics.get("reference_expected_accuracy")
    return (f"reference: {metrics['text_reference_rows']} texts (train + validation) for text features, "
            f"{metrics['output_reference_rows']} validation rows for model outputs; measured accuracy "
            f"{metrics['reference_accuracy']:.3f}" + ("" if exp is None else f", expected (calibrated) {exp:.3f}")
            + f"; {metrics['signals']} calibrated drift tests")


def write_baseline(io: StageIO, task: str | None = None) -> dict:
    """Build the reference profile of the exported model (io.model) on the audited splits (io.in_dir) into
    io.out, its metrics into io.metrics (with `task` when given), both atomically; returns the metrics. The label
    set is the predictor's own (a classifier's labels.json; a tagger's entity types)."""
    base, params = load_params(io.params, "base", "drift")
    device = stage_device(base)
    splits, labels = read_dataset(io.in_dir)
    dataset_hash = read_hashes(io.in_dir, splits, labels)["dataset"]
    set_threads()
    predictor = load_predictor(io.model, batch_size=params.batch_size, device=device)
    label_set = labels if task is None else predictor.labels
    with atomic_output(io.out) as tmp, atomic_output(io.metrics) as tmp_metrics:
        metrics = build_baseline(splits, label_set, predictor, params, tmp, dataset_hash)
        if task is not None:
            metrics["task"] = task
        write_json(tmp_metrics, metrics)
    return metrics


def run(io: StageIO) -> str:
    return summary_line(write_baseline(io))
