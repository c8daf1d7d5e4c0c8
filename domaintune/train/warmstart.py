"""Warm-started retraining: start from a previous version's classifier, keep its labels' head rows, replay
some of its training rows.

The finetune stage's main (stages/finetune.py) materialises the version finetune.init names (served or
vX.Y.Z) through the registry, md5-verified as rollback does: its `models/export` (the classifier, LoRA
merged) and its `data/audited` (the rows it was trained on, pinned by its dvc.lock). This module only
reads those folders (the train layer never imports the registry).

- check_shapes: the version's encoder must have the shape of --encoder (architecture, width, depth, heads,
  vocabulary), else one line (StageError): a new base model means a retrain from base.
- Start.weights: a fresh copy of its encoder, tokenizer and head for each seed.
- map_head: labels kept get their old head rows; new labels keep the rows the run initialised (the probe,
  or a random init); labels no longer in the data are dropped (noted in the metrics).
- replay_rows: a seeded share of the version's train rows (their labels still in the data, their ids not
  in the current train split), written with the augmented rows to the stage's extra-rows file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from domaintune.core.errors import StageError
from domaintune.core.io import read_json
from domaintune.data.dataset import read_dataset
from domaintune.modeling import encoders
from domaintune.train.augment import EXTRA_COLUMNS

log = logging.getLogger("domaintune.warmstart")

SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "vocab_size")


def encoder_shape(config_dir: str | Path) -> dict:
    """The shape fields of a transformers config.json folder."""
    cfg = read_json(Path(config_dir) / "config.json")
    return {k: cfg.get(k) for k in SHAPE_KEYS}


def check_shapes(encoder_dir: str | Path, model_dir: str | Path, tag: str) -> None:
    """StageError (one line) when the version's encoder and --encoder differ in shape."""
    want, got = encoder_shape(encoder_dir), encoder_shape(Path(model_dir) / "encoder")
    diff = [f"{k} {got[k]} vs {want[k]}" for k in SHAPE_KEYS if got[k] != want[k]]
    if diff:
        raise StageError(f"finetune.init {tag}: its encoder differs from --encoder {encoder_dir} ("
                         + ", ".join(diff) + "); a warm start needs the same encoder shape: use finetune.init: base")


@dataclass
class Start:
    """Where a warm-started run starts: a saved classifier folder (and the version it came from)."""
    tag: str
    model_dir: Path
    data_dir: Optional[Path] = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def open(cls, tag: str, model_dir: str | Path, data_dir: str | Path | None, problem_type: str) -> "Start":
        model_dir = Path(model_dir)
        meta = read_json(model_dir / "model.json")
        if meta.get("problem_type", "single_label") != problem_type:
            raise StageError(f"finetune.init {tag}: the version is {meta.get('problem_type')}, "
                             f"finetune.problem_type is {problem_type}")
        return cls(tag, model_dir, Path(data_dir) if data_dir else None, meta)

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    def weights(self):
        """(encoder in float32, tokenizer, head state dict) loaded afresh from the folder."""
        model, tok, _ = encoders.load_classifier(self.model_dir, merge=True)
        return model.encoder.float(), tok, {k: v.float() for k, v in model.head.state_dict().items()}

    def train_rows(self) -> pd.DataFrame:
        """The version's train split (its data/audited)."""
        if self.data_dir is None:
            raise StageError(f"finetune.init {self.tag}: its training data (data/audited) was not given")
        return read_dataset(self.data_dir)[0]["train"]

    def info(self) -> dict:
        return {"version": self.tag, "dataset_hash": self.meta.get("dataset_hash"), "method": self.meta.get("method"),
                "labels": len(self.labels)}


def map_head(model, names: list[str], old_names: list[str], old_head: dict) -> dict:
    """Copy the old head's rows of the labels in both lists into model.head; returns the label changes."""
    import torch

    old = {n: i for i, n in enumerate(old_names)}
    kept = [(i, old[n]) for i, n in enumerate(names) if n in old]
    with torch.no_grad():
        for new_i, old_i in kept:
            model.head.weight[new_i].copy_(old_head["weight"][old_i])
            model.head.bias[new_i].copy_(old_head["bias"][old_i])
    new = [n for n in names if n not in old]
    dropped = [n for n in old_names if n not in set(names)]
    if new:
        log.info("warm start: %d new label(s) get fresh head rows: %s", len(new), ", ".join(new))
    if dropped:
        log.info("warm start: %d label(s) of the previous version are not in the data and were dropped: %s",
                 len(dropped), ", ".join(dropped))
    return {"labels_kept": len(kept), "labels_new": new, "labels_dropped": dropped}


def sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """n rows of df drawn without replacement by `seed`, in id order (independent of df's row order)."""
    df = df.sort_values("id", kind="stable").reset_index(drop=True)
    if n >= len(df):
        return df
    pick = np.sort(np.random.default_rng(seed).choice(len(df), n, replace=False))
    return df.iloc[pick].reset_index(drop=True)


def replay_rows(start: Start, share: float, seed: int, labels: list[str], current_ids) -> tuple[pd.DataFrame, dict]:
    """round(share x the version's train rows) of them, seeded, as extra rows (augment.EXTRA_COLUMNS)."""
    prev = start.train_rows()
    n = int(round(share * len(prev)))
    known, present = set(labels), set(map(str, current_ids))
    usable = prev[prev["label"].astype(str).isin(known) & ~prev["id"].astype(str).isin(present)]
    picked = sample(usable, n, seed)
    out = pd.DataFrame({"id": picked["id"].astype(str) + "#replay", "text": picked["text"].astype(str),
                        "label": picked["label"].astype(str), "source_id": picked["id"].astype(str),
                        "origin": f"replay:{start.tag}"}, columns=list(EXTRA_COLUMNS))
    info = {"share": share, "previous_train_rows": len(prev), "rows": len(out),
            "skipped_label_gone": int((~prev["label"].astype(str).isin(known)).sum()),
            "skipped_already_in_train": int(prev["id"].astype(str).isin(present).sum())}
    return out, info


def fisher_rows(start: Start, limit: int, seed: int) -> tuple[list[str], np.ndarray]:
    """The EWC Fisher's data: (texts, label indices in the version's own label order), at most `limit` rows."""
    prev = start.train_rows()
    index = {n: i for i, n in enumerate(start.labels)}
    prev = prev[prev["label"].astype(str).isin(index)]
    if limit:
        prev = sample(prev, limit, seed)
    return prev["text"].astype(str).tolist(), np.array([index[str(v)] for v in prev["label"]], dtype=np.int64)
