"""The finetune hook of a causal LM: SFT with completion-only loss, methods full | lora | qlora (NF4, double
quant), optional packing and gradient checkpointing, resumable checkpoints (domaintune/train/sft.py).
One process, or one of a torchrun launch: rank 0 writes."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from domaintune.core.errors import ParamsError
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset, read_hashes
from domaintune.train import distributed
from domaintune.train.augment import EXTRA_COLUMNS
from domaintune.train.classifier import finetune_device
from domaintune.train.sft import checkpoints_readme, finetune_generation, finetune_summary, optimizer_for


def train(io: StageIO) -> dict:
    base, ft = load_params(io.params, "base", "finetune")
    device = finetune_device(base, ft)  # a bad or absent device is one line before any data is read
    if not Path(io.encoder).is_dir():
        raise FileNotFoundError(f"--encoder {io.encoder}: no such model folder; run the dapt stage first")
    optimizer_for(ft, device)  # paged 8-bit AdamW without CUDA: one line before any data is read
    classifier_only = [k for k, on in (("augment", ft.augment["copies"] or ft.augment["back_translation"]),
                                       ("init", ft.init != "base"), ("regularize", ft.regularize != "none"),
                                       ("replay", ft.replay), ("outlier_exposure", ft.outlier_exposure)) if on]
    if classifier_only:
        raise ParamsError(f"params.yaml: finetune.{classifier_only[0]}: applies to base.task classification only")
    splits, labels = read_dataset(io.in_dir)
    data_hash = read_hashes(io.in_dir, splits, labels)["dataset"]
    if distributed.rank() != 0:
        return finetune_generation(splits, io.encoder, base, ft, None, io.checkpoints, None, data_hash)
    with atomic_output(io.out) as out, atomic_output(io.live) as live, atomic_output(io.metrics) as met:
        metrics = finetune_generation(splits, io.encoder, base, ft, out, io.checkpoints, live, data_hash)
        write_json(met, metrics)
    if io.extra_rows:  # dvc.yaml's out: no rows are added to a generation task's train split
        with atomic_output(io.extra_rows) as ex:
            pd.DataFrame(columns=list(EXTRA_COLUMNS)).to_parquet(ex, index=False)
    checkpoints_readme(io.checkpoints)
    return metrics


def run(io: StageIO) -> str:
    ft = load_params(io.params, "finetune")
    return finetune_summary(distributed.run_in_processes("finetune", io.argv, ft, io.metrics, lambda: train(io)))
