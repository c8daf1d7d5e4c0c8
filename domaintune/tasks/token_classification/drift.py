"""The drift hook of a tagger: the classifier's reference profile (domaintune/monitor/drift.py) seen through
EntityPredictor's classifier-shaped view: text descriptors and the tagger's mean-pooled encoder embeddings as
for a classifier; the per-text entity-type mix (each text's most confident entity type, or none) replaces the
label mix, the mean word confidence the confidence; no accuracy is measured or estimated (there is no
calibrated per-text class to estimate it from), so `domaintune monitor` omits that line."""
from __future__ import annotations

from domaintune.core.device import stage_device
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset, read_hashes
from domaintune.modeling.encoders import set_threads
from domaintune.monitor.drift import build_baseline
from domaintune.tasks import load_predictor


def run(io: StageIO) -> str:
    base, params = load_params(io.params, "base", "drift")
    device = stage_device(base)
    splits, labels = read_dataset(io.in_dir)
    dataset_hash = read_hashes(io.in_dir, splits, labels)["dataset"]
    set_threads()
    predictor = load_predictor(io.model, batch_size=params.batch_size, device=device)
    with atomic_output(io.out) as out, atomic_output(io.metrics) as met:
        metrics = build_baseline(splits, predictor.labels, predictor, params, out, dataset_hash)
        metrics["task"] = "token_classification"
        write_json(met, metrics)
    return (f"reference: {metrics['text_reference_rows']} texts for text features, {metrics['output_reference_rows']} "
            f"validation texts for the entity-type mix, confidence and embeddings; {metrics['signals']} calibrated "
            "drift tests (no accuracy estimate for a tagger)")
