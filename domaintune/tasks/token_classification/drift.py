"""The drift hook of a tagger: the classifier's reference profile (domaintune/monitor/drift.py) seen through
EntityPredictor's classifier-shaped view: text descriptors and the tagger's mean-pooled encoder embeddings as
for a classifier; the per-text entity-type mix (each text's most confident entity type, or none) replaces the
label mix, the mean word confidence the confidence; no accuracy is measured or estimated (there is no
calibrated per-text class to estimate it from), so `domaintune monitor` omits that line."""
from __future__ import annotations

from domaintune.core.stage import StageIO
from domaintune.tasks.classification.drift import write_baseline


def run(io: StageIO) -> str:
    metrics = write_baseline(io, task="token_classification")
    return (f"reference: {metrics['text_reference_rows']} texts for text features, {metrics['output_reference_rows']} "
            f"validation texts for the entity-type mix, confidence and embeddings; {metrics['signals']} calibrated "
            "drift tests (no accuracy estimate for a tagger)")
