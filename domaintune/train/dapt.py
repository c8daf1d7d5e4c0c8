"""Domain-adaptive pre-training of an encoder (continued masked-language modelling): the dapt stage's work.

Reads the train-split texts of the audited dataset (never validation/test: their
texts must stay unseen) plus the optional unlabelled corpus files in
`dapt.corpus`, and continues the base encoder's MLM training on them with
whole-word masking over packed blocks. A seeded held-out slice of the corpus is
never trained on; its MLM loss under one fixed mask is measured before and
after, so the two numbers are directly comparable.

Writes models/dapt/: the adapted encoder body (safetensors, loads with
domaintune.modeling.encoders.load_encoder), its tokenizer, dapt_info.json (params,
corpus accounting, steps, base model) and mlm_head.safetensors (the trained MLM
head, so a second DAPT round that starts from this folder continues with it
instead of a fresh random head). With `dapt.enabled: false` the base encoder is
passed through unchanged, so finetune can always read models/dapt.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from domaintune.core.device import stage_device
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import BaseParams, DaptParams, as_dict, load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import read_dataset
from domaintune.modeling.encoders import resolve_model, set_threads
from domaintune.train import distributed
from domaintune.train.mlm import (
    INFO_FILE,
    adapt,
    build_corpus,
    pass_through,
    read_corpus_file,
    save_encoder,
    write_live,
)

log = logging.getLogger("domaintune.dapt")

CHECKPOINTS_README = ("Resumable DAPT state, one folder per run key (hash of corpus, params and base weights).\n"
                      "A crashed run resumes from here; a finished run removes its folder.\n")


def run(in_dir: str | Path, out_dir: str | Path, metrics_path: str | Path, base: BaseParams, params: DaptParams,
        root: str | Path = ".", *, live_dir: Optional[str | Path] = None,
        checkpoint_root: Optional[str | Path] = None, progress: bool = True) -> dict:
    """The whole stage: read inputs, adapt (or pass through), write outputs atomically. Returns metrics.
    Under a multi-process launch every process trains and rank 0 alone writes."""
    base_path = resolve_model(base.model)
    info = {"base_model": base.model, "base_path": base_path, "seed": base.seed, "params": as_dict(params)}
    history = []
    if params.enabled:
        device = stage_device(base)  # a bad or absent device fails before any data is read
        # Validate everything cheap before loading any model.
        files = {c: read_corpus_file(Path(root) / c) for c in params.corpus}
        splits, _ = read_dataset(in_dir)
        exclude = list(splits["validation"]["text"]) + list(splits["test"]["text"])
        corpus = build_corpus(list(splits["train"]["text"]), files, exclude,
                              train_file=str(Path(in_dir) / "train.parquet"))
        model, tok, metrics, extra, history = adapt(corpus, base_path, params, base.seed, device,
                                                    checkpoint_root, progress)
        info.update(extra)
        info["corpus"] = {"files": list(params.corpus), **corpus.counts, "removed_lines": corpus.removed}
    else:
        metrics = {"enabled": False, "steps": 0}
    info["metrics"] = metrics
    if distributed.rank() == 0:
        _write(out_dir, metrics_path, live_dir, base_path, base, params, info, history,
               (model, tok) if params.enabled else None)
        _checkpoints_readme(checkpoint_root)
    return metrics


def _write(out_dir, metrics_path, live_dir, base_path, base, params, info, history, trained) -> None:
    with atomic_output(out_dir) as tmp, atomic_output(metrics_path) as tmp_metrics:
        tmp.mkdir()
        if trained is not None:
            save_encoder(trained[0], trained[1], base_path, tmp, base.seed)
        else:
            info["pass_through"] = pass_through(base_path, tmp)
        write_json(tmp / INFO_FILE, info)
        if live_dir is not None:
            with atomic_output(live_dir) as tmp_live:
                tmp_live.mkdir()
                if trained is not None:
                    write_live(tmp_live, history, info["metrics"])
        write_json(tmp_metrics, info["metrics"])


def _checkpoints_readme(checkpoint_root) -> None:
    """DVC requires the persisted checkpoints out to exist (and not be empty) after a finished run."""
    if checkpoint_root is not None:
        Path(checkpoint_root).mkdir(parents=True, exist_ok=True)
        (Path(checkpoint_root) / "README.txt").write_text(CHECKPOINTS_README)


def summary_line(m: dict) -> str:
    """What the stage did, for its one "done" line."""
    if not m.get("enabled"):
        return "disabled (dapt.enabled: false): the base encoder passed through unchanged"
    return (f"{m['steps']} MLM steps ({m['epochs']} epochs) on {m['train_texts']} texts, {m['train_blocks']} blocks; "
            f"held-out perplexity {m['perplexity_before']:.1f} -> {m['perplexity_after']:.1f} "
            f"(loss {m['loss_before']:.4f} -> {m['loss_after']:.4f} on {m['heldout_blocks']} blocks)")


def stage(io: StageIO) -> str:
    """The dapt stage of an encoder task (classification, token_classification: their hooks call this): `run` in
    one process, or data-parallel under torchrun (dapt.processes); returns the "done" line."""
    base, params = load_params(io.params, "base", "dapt")

    def train() -> dict:
        if distributed.world_size() == 1 and not distributed.launched():
            set_threads()
        return run(io.in_dir, io.out, io.metrics, base, params, live_dir=io.live,
                   checkpoint_root=io.checkpoints, progress=io.progress)

    if not params.enabled:
        return summary_line(train())
    stage_device(base)  # a bad device is one line before anything is launched or read
    return summary_line(distributed.run_in_processes("dapt", io.argv, params, io.metrics, train))
