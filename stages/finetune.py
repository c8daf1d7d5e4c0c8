"""finetune stage: train the classifier on the audited data over the (DAPT) encoder.

Reads train + validation of the dataset folder, trains one model per seed in
finetune.seeds with finetune.method (see domaintune/train/classifier.py), and writes the
best on validation macro-F1 to --out (modeling.save_classifier layout; every
seed's model under --out/seeds/<seed>/ when there are several), the metrics
JSON, DVCLive curves under --live, and resumable checkpoints under
--checkpoints (a persisted DVC out, so a crashed run continues from there).
With finetune.processes > 1 (or nnodes > 1) the same command re-runs itself
under torchrun, one process per device; rank 0 writes the same output files.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import load_params
from domaintune.data.dataset import read_dataset, read_hashes


def run(args: argparse.Namespace) -> dict:
    from domaintune.train import distributed
    from domaintune.train.classifier import finetune_device, train_classifier

    base, ft = load_params(args.params, "base", "finetune")
    device = finetune_device(base, ft)  # a bad or absent device is one line before any data is read
    if not Path(args.encoder).is_dir():
        raise FileNotFoundError(f"--encoder {args.encoder}: no such model folder; run the dapt stage first")
    if base.task == "generation":
        from domaintune.train.sft import optimizer_for, run_finetune

        optimizer_for(ft, device)  # paged 8-bit AdamW without CUDA: one line before any data is read
        return run_finetune(args, base, ft)
    if ft.optimizer == "paged_adamw_8bit":
        from domaintune.core.params import ParamsError

        raise ParamsError("params.yaml: finetune.optimizer: paged_adamw_8bit is for base.task generation "
                          "(QLoRA/LoRA SFT); the classifier trains with AdamW (use auto or adamw)")
    splits, labels = read_dataset(args.in_dir)
    data_hash = read_hashes(args.in_dir, splits, labels)["dataset"]
    kw = dict(base_encoder=args.encoder, data_hash=data_hash, checkpoint_root=args.checkpoints,
              progress=not args.no_progress)
    if distributed.rank() != 0:  # a data-parallel helper process: trains, writes nothing
        return train_classifier(splits["train"], splits["validation"], labels, args.encoder, base, ft, None, **kw)
    with atomic_output(args.out) as out, atomic_output(args.live) as live, atomic_output(args.metrics) as met:
        metrics = train_classifier(splits["train"], splits["validation"], labels, args.encoder, base, ft, out,
                                   live_dir=live, **kw)
        metrics["dataset_hash"] = data_hash
        write_json(met, metrics)
    # DVC requires the persisted checkpoints out to exist (and not be empty) even when a
    # finished run cleared its checkpoints.
    ckpt = Path(args.checkpoints)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "README.txt").write_text(
        "Resumable finetune state, one folder per run key (hash of params, data and encoder).\n"
        "A crashed run resumes from here; a finished run removes its folder.\n")
    return metrics


def main(argv=None) -> int:
    import sys

    from domaintune.core.stage import run_stage, stage_parser

    ap = stage_parser("finetune", __doc__.splitlines()[0], inp="dataset folder (train/validation parquet, labels.json)",
                      out="output model folder")
    ap.add_argument("--encoder", required=True, help="encoder folder to fine-tune (e.g. models/dapt)")
    ap.add_argument("--checkpoints", default="models/checkpoints",
                    help="resumable training state (a persisted DVC out)")
    ap.add_argument("--live", default="reports/finetune/live", help="DVCLive log folder (training curves)")
    ap.add_argument("--no-progress", action="store_true", help="no console progress bar")
    argv = list(sys.argv[1:] if argv is None else argv)

    def go(args: argparse.Namespace):
        from domaintune.train import distributed

        base, ft = load_params(args.params, "base", "finetune")
        metrics = distributed.run_in_processes("finetune", argv, ft, args.metrics, lambda: run(args))
        if base.task == "generation":
            from domaintune.train.sft import finetune_summary

            return finetune_summary(metrics)
        return metrics

    return run_stage("finetune", go, ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
