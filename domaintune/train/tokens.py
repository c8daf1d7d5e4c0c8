"""Fine-tuning a token tagger (base.task token_classification) on the training engine.

The classifier's run (train/classifier.FinetuneRun: engine, epochs over length-grouped shuffled batches,
resumable checkpoints, best-epoch restore, multi-seed, DVCLive curves) with a per-token objective:
- the model is modeling/tagger.TokenTagger (encoder + head per token), so the classifier's methods apply as
  they are: full, freeze (embeddings + bottom finetune.freeze_layers), lora (peft on the encoder, head trained
  fully), head (encoder frozen); qlora is refused (its 4-bit base cannot be merged into the standard
  transformers folder this task exports);
- each word's tag labels its first sub-word; the other sub-words (later pre-tokenizer pieces of a word
  included) and special tokens are -100 (ignored), as transformers' run_ner does;
- cross-entropy with finetune.label_smoothing, optional class weights (inverse tag frequency, capped at 10);
- validation and early stopping on entity-level F1 (seqeval strict IOB2), finetune.early_stopping_patience;
- the kept model is saved as a transformers token-classification folder (modeling/tagger.save_tagger).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from domaintune.core.errors import DataError, ParamsError
from domaintune.core.params import BaseParams, FinetuneParams, as_dict
from domaintune.data.tokens import IGNORE, align_labels, decode_rows, entity_scores
from domaintune.modeling.adapters import encoder_layers
from domaintune.modeling.encoders import count_parameters, set_threads
from domaintune.modeling.tagger import (
    build_tagger,
    predicted_tags,
    save_tagger,
    to_token_classification,
    torch_runner,
    word_logits,
)
from domaintune.train import distributed
from domaintune.train.classifier import (
    FinetuneRun,
    _apply_method,
    _snapshot,
    collate,
    epoch_line,
    finetune_device,
    summarize,
    validate_setup,
    write_live,
)
from domaintune.train.engine import load_trainable_state
from domaintune.train.runkey import run_key

log = logging.getLogger("domaintune.training")

SCORE = "val_entity_f1"  # what early stopping, the best epoch and the best seed are chosen by


def check_method(ft: FinetuneParams) -> None:
    if ft.method == "qlora":
        raise ParamsError("params.yaml: finetune.method: qlora is not offered for base.task token_classification "
                          "(its 4-bit base cannot be merged into the exported transformers folder); use lora")
    if ft.problem_type != "single_label":
        raise ParamsError("params.yaml: finetune.problem_type: token_classification tags one tag per word "
                          "(single_label)")
    if ft.outlier_exposure > 0:
        raise ParamsError("params.yaml: finetune.outlier_exposure: applies to base.task classification only (its "
                          "abstention is per text, not per word)")


def encode_words(tokenizer, words: Sequence[Sequence[str]], tag_ids: Sequence[Sequence[int]], max_length: int):
    """(input ids, aligned labels) per sentence: the first sub-word of each word carries its tag, every other
    sub-word -100 (data/tokens.align_labels)."""
    enc = tokenizer([list(w) for w in words], is_split_into_words=True, truncation=True, max_length=max_length)
    return enc["input_ids"], [align_labels(enc.word_ids(i), tag_ids[i]) for i in range(len(words))]


def tag_ids(tags: Sequence[Sequence[str]], names: Sequence[str], file: str) -> list[list[int]]:
    index = {t: i for i, t in enumerate(names)}
    out = []
    for row, seq in enumerate(tags):
        unknown = [t for t in seq if t not in index]
        if unknown:
            raise DataError(file, row, "label", f"tag {unknown[0]!r} is not in labels.json")
        out.append([index[t] for t in seq])
    return out


class TokenRun(FinetuneRun):
    """One seed's token-tagging run (see the module doc); the loop, checkpoints and resume are FinetuneRun's."""

    def __init__(self, train_df: pd.DataFrame, val_df: pd.DataFrame, labels: Sequence[str], encoder_dir: str,
                 base: BaseParams, ft: FinetuneParams, seed: int, checkpoint_dir: Optional[Path] = None,
                 device: Optional[str] = None):
        import torch

        self.base, self.ft, self.seed = base, ft, seed
        self.device = device or finetune_device(base, ft)
        self.eval_batch = 64
        self.names = list(labels)
        self.words, _, tags = decode_rows(train_df)
        self.val_words, _, self.val_tags = decode_rows(val_df)
        self.y_words = tag_ids(tags, self.names, "train.parquet")
        tag_ids(self.val_tags, self.names, "validation.parquet")
        self.texts, self.val_texts = self.words, self.val_words  # FinetuneRun checks these for rows
        if not self.words:
            raise DataError("train.parquet", None, None, "no training rows")
        self.world, self.rank = distributed.world_size(), distributed.rank()
        torch.manual_seed(seed)
        np.random.seed(seed)
        self.model, self.tokenizer = build_tagger(encoder_dir, len(self.names), ft.head_dropout)
        self.num_layers = len(encoder_layers(self.model.encoder))
        self.probe_s = 0.0
        _apply_method(self.model, ft, seed, self.device)
        for p in self.model.head.parameters():
            p.requires_grad = True
        self.model.to(self.device)
        self._build_engine(checkpoint_dir)

    def _build_engine(self, checkpoint_dir: Optional[Path]) -> None:
        import torch
        import torch.nn.functional as F

        ft = self.ft
        groups = self._trainable_groups()
        self.ids, self.token_labels = encode_words(self.tokenizer, self.words, self.y_words, self.base.max_length)
        self.lengths = np.array([len(x) for x in self.ids])
        self._make_engine(groups, len(self.ids), checkpoint_dir)
        weight = None
        if ft.class_weights:
            counts = np.bincount(np.concatenate([np.asarray(y) for y in self.y_words]),
                                 minlength=len(self.names)).astype(np.float64)
            n = counts.sum()
            weight = torch.tensor(np.clip(n / (len(self.names) * np.maximum(counts, 1)), 0, 10), dtype=torch.float32,
                                  device=self.device)
        smoothing = ft.label_smoothing
        self.loss_fn = lambda logits, target: F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE,
                                                              label_smoothing=smoothing)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def objective(self, model, idx: np.ndarray):
        import torch

        input_ids, mask = collate([self.ids[i] for i in idx], self.pad_id)
        target = torch.full(input_ids.shape, IGNORE, dtype=torch.long)
        for j, i in enumerate(idx):
            target[j, :len(self.token_labels[i])] = torch.tensor(self.token_labels[i], dtype=torch.long)
        logits = model(input_ids=input_ids.to(self.device, non_blocking=True),
                       attention_mask=mask.to(self.device, non_blocking=True))
        return self.loss_fn(logits.float().reshape(-1, logits.shape[-1]), target.to(self.device).reshape(-1))

    def predict_val(self):
        self.model.eval()
        return word_logits(torch_runner(self.model, self.device), self.tokenizer, self.val_words, len(self.names),
                           self.base.max_length, self.eval_batch)

    def validate(self) -> dict:
        wl = self.predict_val()
        scores = entity_scores(self.val_tags, predicted_tags(wl, self.names))
        return {"val_entity_f1": scores["f1"], "val_entity_precision": scores["precision"],
                "val_entity_recall": scores["recall"], "val_token_accuracy": scores["token_accuracy"]}

    def end_epoch(self, loop, epoch: int, bar) -> bool:
        ft = self.ft
        ep = {"epoch": epoch, "step": self.engine.step_count,
              "train_loss": float(np.mean([s["loss"] for s in self.engine.history if s.get("epoch") == epoch]
                                          or [0.0]))}
        if len(self.val_words):
            ep.update(self.validate())
            if ep[SCORE] > loop.best_f1:
                loop.best_f1, loop.best_epoch, loop.bad_epochs = ep[SCORE], epoch, 0
                self.best_state = _snapshot(self.model, self.trainable_names) if ft.restore_best else None
            else:
                loop.bad_epochs += 1
        loop.epochs.append(ep)
        line = epoch_line(self.seed, epoch, ft.epochs, ep, loop.best_epoch == epoch)
        if SCORE in ep:
            line += f" | entity F1 {ep[SCORE]:.4f}"
        if bar is not None:
            bar.write(line)
        else:
            log.info("%s", line)
        return ft.early_stopping_patience > 0 and loop.bad_epochs >= ft.early_stopping_patience

    def finish(self, loop, stopped_early: bool, train_s: float, steps_run: int) -> dict:
        if self.best_state is not None and self.ft.restore_best:
            load_trainable_state(self.model, self.best_state)
        for p in self.model.parameters():
            p.requires_grad = False
        final_val = {}
        if len(self.val_words):
            final_val = {k[4:]: v for k, v in self.validate().items()}
        history = {"steps": self.engine.history, "epochs": loop.epochs}
        if loop.initial is not None:
            history["initial"] = loop.initial
        samples = sum(s["samples"] for s in self.engine.history[len(self.engine.history) - steps_run:]) \
            if steps_run else 0
        return {
            "seed": self.seed, "history": history, "best_epoch": loop.best_epoch, "stopped_early": stopped_early,
            "validation": final_val, "train_seconds": train_s, "probe_seconds": 0.0,
            "train_samples_per_s": samples / train_s if train_s > 0 and samples else None,
            "steps": self.engine.step_count, "trainable_params": self.trainable_count,
            "total_params": count_parameters(self.model), "bf16": self.engine.bf16, "device": self.device,
            "processes": self.world,
        }


def train_tagger(train_df: pd.DataFrame, val_df: pd.DataFrame, labels: Sequence[str], encoder_dir: str,
                 base: BaseParams, ft: FinetuneParams, out_dir: Optional[str | os.PathLike] = None, *,
                 base_encoder: Optional[str] = None, data_hash: str = "",
                 checkpoint_root: Optional[str | os.PathLike] = None,
                 live_dir: Optional[str | os.PathLike] = None, progress: bool = True) -> dict:
    """One tagger per seed in ft.seeds; the best on validation entity F1 saved to out_dir (every seed's under
    out_dir/seeds/<seed>/ when there are several). Returns the metrics (train/classifier.summarize's keys)."""
    check_method(ft)
    validate_setup(ft, encoder_dir, finetune_device(base, ft))
    if distributed.world_size() == 1:
        set_threads()
    ckpt_root = Path(checkpoint_root) if checkpoint_root is not None else None
    keys = {s: run_key("finetune-tokens", ft, encoder_dir, max_length=base.max_length, data=data_hash, seed=s)
            for s in ft.seeds}
    writer = distributed.rank() == 0
    if ckpt_root is not None and writer:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for old in ckpt_root.iterdir():
            if old.is_dir() and old.name not in keys.values():
                shutil.rmtree(old)
    distributed.barrier()
    runs = []
    for seed in ft.seeds:
        run = TokenRun(train_df, val_df, labels, encoder_dir, base, ft, seed,
                       ckpt_root / keys[seed] if ckpt_root is not None else None)
        res = run.train(progress)
        meta = {"task": "token_classification", "tags": list(labels), "method": ft.method,
                "max_length": base.max_length, "base_encoder": base_encoder or str(encoder_dir),
                "dataset_hash": data_hash, "seed": seed, "params": {"base": as_dict(base), "finetune": as_dict(ft)},
                "validation": res["validation"], "history_epochs": res["history"]["epochs"],
                "best_epoch": res["best_epoch"]}
        model = to_token_classification(run.model.cpu(), labels) if out_dir is not None else None
        runs.append((seed, model, run.tokenizer, meta, res))
    best = max(runs, key=lambda r: r[4]["validation"].get("entity_f1", 0.0))
    if out_dir is not None and writer:
        save_tagger(best[1], best[2], out_dir, best[3])
        if len(runs) > 1:
            for seed, model, tok, meta, _ in runs:
                save_tagger(model, tok, Path(out_dir) / "seeds" / str(seed), meta)
    if live_dir is not None and writer:
        write_live(live_dir, [(r[0], r[4]) for r in runs], best[0])
    metrics = summarize(ft, [r[4] for r in runs], best[0])
    metrics["task"] = "token_classification"
    distributed.barrier()
    if ckpt_root is not None and writer:
        for k in keys.values():
            shutil.rmtree(ckpt_root / k, ignore_errors=True)
    return metrics


def result_line(m: dict, train_rows: int) -> str:
    per = m["per_seed"][str(m["best_seed"])]
    f1 = m.get("val_entity_f1")
    return (f"{m['method']} on {train_rows} train sentences, {per['steps']} steps, {m['trainable_params']:,} of "
            f"{m['total_params']:,} params trained; seed {m['best_seed']} validation entity F1 "
            + (f"{f1:.4f}" if isinstance(f1, float) else "-"))
