"""The finetune hook of a classifier: train on the audited data over the (DAPT) encoder.

Reads train + validation, trains one model per seed in finetune.seeds with finetune.method
(domaintune/train/classifier.py), and writes the best on validation macro-F1 to --out
(modeling.encoders.save_classifier layout; every seed's model under --out/seeds/<seed>/ when there are
several), the metrics JSON, DVCLive curves under --live, and resumable checkpoints under --checkpoints
(a persisted DVC out, so a crashed run continues from there). With finetune.processes > 1 (or nnodes > 1)
the stage re-runs itself under torchrun, one process per device; rank 0 writes the same output files.
"""
from __future__ import annotations

from pathlib import Path

from domaintune.core.errors import ParamsError
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset, read_hashes
from domaintune.train import distributed
from domaintune.train.classifier import finetune_device, train_classifier

CHECKPOINTS_README = ("Resumable finetune state, one folder per run key (hash of params, data and encoder).\n"
                      "A crashed run resumes from here; a finished run removes its folder.\n")


def train(io: StageIO) -> dict:
    base, ft = load_params(io.params, "base", "finetune")
    finetune_device(base, ft)  # a bad or absent device is one line before any data is read
    if not Path(io.encoder).is_dir():
        raise FileNotFoundError(f"--encoder {io.encoder}: no such model folder; run the dapt stage first")
    if ft.optimizer == "paged_adamw_8bit":
        raise ParamsError("params.yaml: finetune.optimizer: paged_adamw_8bit is for base.task generation "
                          "(QLoRA/LoRA SFT); the classifier trains with AdamW (use auto or adamw)")
    splits, labels = read_dataset(io.in_dir)
    data_hash = read_hashes(io.in_dir, splits, labels)["dataset"]
    kw = dict(base_encoder=io.encoder, data_hash=data_hash, checkpoint_root=io.checkpoints, progress=io.progress)
    if distributed.rank() != 0:  # a data-parallel helper process: trains, writes nothing
        return train_classifier(splits["train"], splits["validation"], labels, io.encoder, base, ft, None, **kw)
    with atomic_output(io.out) as out, atomic_output(io.live) as live, atomic_output(io.metrics) as met:
        metrics = train_classifier(splits["train"], splits["validation"], labels, io.encoder, base, ft, out,
                                   live_dir=live, **kw)
        metrics["dataset_hash"] = data_hash
        write_json(met, metrics)
    # DVC requires the persisted checkpoints out to exist (and not be empty) even when a
    # finished run cleared its checkpoints.
    ckpt = Path(io.checkpoints)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "README.txt").write_text(CHECKPOINTS_README)
    return metrics


def run(io: StageIO) -> dict:
    ft = load_params(io.params, "finetune")
    return distributed.run_in_processes("finetune", io.argv, ft, io.metrics, lambda: train(io))
