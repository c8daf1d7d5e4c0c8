"""The finetune hook of a tagger: train on the audited sentences over the (DAPT) encoder
(domaintune/train/tokens.py), the best seed on validation entity F1 written to --out as a transformers
token-classification folder, with metrics, DVCLive curves and resumable checkpoints; under torchrun
with finetune.processes > 1, rank 0 writes."""
from __future__ import annotations

from pathlib import Path

from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset, read_hashes
from domaintune.tasks.classification.finetune import CHECKPOINTS_README
from domaintune.train import distributed
from domaintune.train.classifier import finetune_device
from domaintune.train.tokens import check_method, result_line, train_tagger


def train(io: StageIO) -> dict:
    base, ft = load_params(io.params, "base", "finetune")
    finetune_device(base, ft)
    check_method(ft)
    if not Path(io.encoder).is_dir():
        raise FileNotFoundError(f"--encoder {io.encoder}: no such model folder; run the dapt stage first")
    splits, labels = read_dataset(io.in_dir)
    data_hash = read_hashes(io.in_dir, splits, labels)["dataset"]
    kw = dict(base_encoder=io.encoder, data_hash=data_hash, checkpoint_root=io.checkpoints, progress=io.progress)
    if distributed.rank() != 0:
        return train_tagger(splits["train"], splits["validation"], labels, io.encoder, base, ft, None, **kw)
    with atomic_output(io.out) as out, atomic_output(io.live) as live, atomic_output(io.metrics) as met:
        metrics = train_tagger(splits["train"], splits["validation"], labels, io.encoder, base, ft, out,
                               live_dir=live, **kw)
        metrics["dataset_hash"] = data_hash
        write_json(met, metrics)
    ckpt = Path(io.checkpoints)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "README.txt").write_text(CHECKPOINTS_README)
    metrics["train_rows"] = len(splits["train"])
    return metrics


def run(io: StageIO) -> str:
    ft = load_params(io.params, "finetune")
    m = distributed.run_in_processes("finetune", io.argv, ft, io.metrics, lambda: train(io))
    return result_line(m, m.get("train_rows", 0)) if isinstance(m, dict) and "per_seed" in m else m
