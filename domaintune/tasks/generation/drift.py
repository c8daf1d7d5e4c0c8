"""The drift hook of a causal LM: the exported causal LM seen through the interface that
domaintune/monitor/drift.py's baseline and verdict use for a classifier (domaintune.predict.predictor.Predictor), so
the drift stage writes the same baseline files and `domaintune monitor` the same verdict.json,
report.html and history rows, with the same calibrated nulls and Bonferroni verdict.

Signals for a batch of prompts:
- prompt descriptors: drift.TEXT_FEATURES (length in characters and words, unknown-token, out-of-vocabulary,
  non-ASCII, digit and upper-case rates) against the train + validation prompts;
- embedding drift from the model's own hidden states: the mean of the last hidden layer over each rendered
  prompt, its principal components (K-S each) and the MMD test on the whole embedding;
- prompt familiarity in the `confidence` column: the model's geometric-mean probability of the rendered
  prompt's tokens, exp(-mean NLL). It falls when prompts read less like what the model was tuned on.
Without a label set there is no predicted-label mix and no accuracy estimate, and the review queue is not
filled (familiarity is not a calibrated probability of being right). With the label set the export recorded
(classification as generation) the confidence column is the calibrated top label probability and the verdict
carries the label mix and the CBPE accuracy estimate, as for a classifier.
"""
from __future__ import annotations

from domaintune.core.device import stage_device
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset, read_hashes
from domaintune.monitor.drift import build_baseline
from domaintune.tasks import load_predictor


def run(io: StageIO) -> str:
    base, params = load_params(io.params, "base", "drift")
    device = stage_device(base)
    splits, labels = read_dataset(io.in_dir)
    dataset_hash = read_hashes(io.in_dir, splits, labels)["dataset"]
    predictor = load_predictor(io.model, batch_size=params.batch_size, device=device)
    with atomic_output(io.out) as out, atomic_output(io.metrics) as met:
        metrics = build_baseline(splits, [], predictor, params, out, dataset_hash)
        metrics["task"] = "generation"
        write_json(met, metrics)
    return (f"prompt reference: {metrics['text_reference_rows']} prompts (train + validation) for descriptors, "
            f"{metrics['output_reference_rows']} validation prompts for hidden-state embeddings and familiarity; "
            f"{metrics['signals']} calibrated drift tests")
