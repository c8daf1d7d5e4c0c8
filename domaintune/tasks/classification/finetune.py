"""The finetune hook of a classifier: train on the audited data over the (DAPT) encoder.

Reads train + validation, trains one model per seed in finetune.seeds with finetune.method
(domaintune/train/classifier.py), and writes the best on validation macro-F1 to --out
(modeling.encoders.save_classifier layout; every seed's model under --out/seeds/<seed>/ when there are
several), the metrics JSON, DVCLive curves under --live, and resumable checkpoints under --checkpoints
(a persisted DVC out, so a crashed run continues from there). With finetune.processes > 1 (or nnodes > 1)
the stage re-runs itself under torchrun, one process per device; rank 0 writes the same output files.

Rows added to train -- finetune.augment's (train/augment.py) and finetune.replay's (the warm-start
version's train rows, train/warmstart.py) -- are written to --extra-rows (a DVC out: id, text, label,
source_id, origin), and their hash goes into model.json and the metrics, so the version record says exactly
what was trained on. Validation and test are read as they are, never augmented.

finetune.outlier_exposure trains on half of evaluate.abstain.oos_texts (exposure_texts) as well: their count,
source and hash go into model.json and the metrics.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from domaintune.core.errors import DataError, ParamsError, StageError
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import json_lines_sha256, read_dataset, read_hashes
from domaintune.evaluate import abstain
from domaintune.train import distributed, warmstart
from domaintune.train.augment import EXTRA_COLUMNS, augment_rows
from domaintune.train.classifier import finetune_device, train_classifier

log = logging.getLogger("domaintune.finetune")

CHECKPOINTS_README = ("Resumable finetune state, one folder per run key (hash of params, data and encoder).\n"
                      "A crashed run resumes from here; a finished run removes its folder.\n")


def extra_rows_hash(extra: pd.DataFrame) -> str:
    """SHA-256 of the extra rows (every column, sorted by id): what train had beyond the dataset."""
    rows = extra.loc[:, list(EXTRA_COLUMNS)].astype(str).sort_values("id", kind="stable")
    return json_lines_sha256(zip(*(rows[c] for c in EXTRA_COLUMNS)))


def open_start(io: StageIO, ft) -> warmstart.Start | None:
    """The warm start the stage main materialised (or --init-model named); its encoder shape checked."""
    if not io.init_model:
        if ft.init != "base":
            raise StageError(f"finetune.init {ft.init}: no version folder was given (run the stage through "
                             "`python -m stages.finetune`, which materialises it, or pass --init-model)")
        return None
    if not Path(io.init_model, "model.json").is_file():
        raise FileNotFoundError(f"--init-model {io.init_model}: not a classifier folder (no model.json)")
    tag = io.init_version or f"folder {io.init_model}"
    warmstart.check_shapes(io.encoder, io.init_model, tag)
    return warmstart.Start.open(tag, io.init_model, io.init_data, ft.problem_type)


def extra_train_rows(splits: dict, labels: list, base, ft, start) -> tuple[pd.DataFrame, dict]:
    """Augmented rows of the train split, then replayed rows of the warm-start version's train split."""
    train = splits["train"]
    parts, info = [augment_rows(train, ft.augment, base.seed, base.max_length)], {}
    info["augmented"] = len(parts[0])
    if start is not None and ft.replay > 0:
        replay, info["replay"] = warmstart.replay_rows(start, ft.replay, base.seed, labels, train["id"])
        parts.append(replay)
    extra = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    clash = set(extra["id"]) & set(train["id"].astype(str))
    if clash:
        raise StageError(f"finetune: extra row id {sorted(clash)[0]!r} is also a train id")
    info.update(rows=len(extra), sha256=extra_rows_hash(extra))
    return extra.reset_index(drop=True), info


def exposure_texts(io: StageIO, ft) -> tuple[list[str], str]:
    """finetune.outlier_exposure's texts: the half of evaluate.abstain.oos_texts that the evaluate stage's
    detector fits on (abstain.split_oos), so that the other half stays unseen for comparing the methods."""
    if ft.outlier_exposure == 0:
        return [], ""
    ev = load_params(io.params, "evaluate")
    path = ev.abstain.oos_texts
    if not path:
        raise ParamsError("params.yaml: finetune.outlier_exposure: needs evaluate.abstain.oos_texts (known "
                          "out-of-scope texts); set it, or finetune.outlier_exposure: 0")
    texts = abstain.read_texts(path, "evaluate.abstain.oos_texts")
    if len(texts) < 2:
        raise DataError(path, None, None, "evaluate.abstain.oos_texts: finetune.outlier_exposure needs at least 2 "
                        "texts (half train, half stay unseen for the evaluate stage)")
    fit, _ = abstain.split_oos(len(texts))
    return [texts[i] for i in fit], f"{path} (the fit half: seeded split, abstain.split_oos)"


def train(io: StageIO) -> dict:
    base, ft = load_params(io.params, "base", "finetune")
    finetune_device(base, ft)  # a bad or absent device is one line before any data is read
    if not Path(io.encoder).is_dir():
        raise FileNotFoundError(f"--encoder {io.encoder}: no such model folder; run the dapt stage first")
    if ft.optimizer == "paged_adamw_8bit":
        raise ParamsError("params.yaml: finetune.optimizer: paged_adamw_8bit is for base.task generation "
                          "(QLoRA/LoRA SFT); the classifier trains with AdamW (use auto or adamw)")
    start = open_start(io, ft)
    outliers, outliers_source = exposure_texts(io, ft)  # a bad file fails before any data is read
    splits, labels = read_dataset(io.in_dir)
    data_hash = read_hashes(io.in_dir, splits, labels)["dataset"]
    extra, extra_info = extra_train_rows(splits, labels, base, ft, start)
    if len(extra) and not io.extra_rows:
        raise StageError("finetune.augment / finetune.replay add train rows: give --extra-rows to record them")
    train_df = pd.concat([splits["train"], extra.loc[:, ["id", "text", "label"]]], ignore_index=True) \
        if len(extra) else splits["train"]
    kw = dict(base_encoder=io.encoder, data_hash=data_hash, checkpoint_root=io.checkpoints, progress=io.progress,
              start=start, extra_rows=extra_info, outliers=outliers, outliers_source=outliers_source)
    if distributed.rank() != 0:  # a data-parallel helper process: trains, writes nothing
        return train_classifier(train_df, splits["validation"], labels, io.encoder, base, ft, None, **kw)
    with atomic_output(io.out) as out, atomic_output(io.live) as live, atomic_output(io.metrics) as met:
        metrics = train_classifier(train_df, splits["validation"], labels, io.encoder, base, ft, out,
                                   live_dir=live, **kw)
        metrics["dataset_hash"] = data_hash
        metrics["extra_rows"] = extra_info
        metrics["train_rows"] = {"dataset": len(splits["train"]), "extra": len(extra), "total": len(train_df)}
        write_json(met, metrics)
    if io.extra_rows:
        with atomic_output(io.extra_rows) as ex:
            extra.to_parquet(ex, index=False)
    # DVC requires the persisted checkpoints out to exist (and not be empty) even when a
    # finished run cleared its checkpoints.
    ckpt = Path(io.checkpoints)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "README.txt").write_text(CHECKPOINTS_README)
    return metrics


def run(io: StageIO) -> dict:
    ft = load_params(io.params, "finetune")
    return distributed.run_in_processes("finetune", io.argv, ft, io.metrics, lambda: train(io))
