"""Fine-tuning an encoder classifier: a plain torch loop, fast on CPU.

The recipe that won on BANKING77 here: mean pooling, a head initialised from a
logistic regression on frozen embeddings (linear probe, then fine-tune), AdamW
with warmup and decay, dynamic padding over length-grouped shuffled batches.
Methods (finetune.method):
  full    every weight trains
  freeze  embeddings and the bottom `freeze_layers` encoder layers stay fixed
  lora    peft LoRA adapters on `target_modules`; the head trains fully
  qlora   the encoder's Linear layers quantised to 4-bit NF4 (bitsandbytes,
          double quant), LoRA on top
  head    frozen encoder; the head trains on cached pooled embeddings
  setfit  SetFit: contrastive pairs tune the encoder (train/setfit.py), then the head as `head`

Warm start (finetune.init, train/warmstart.py): the run starts from a previous version's encoder and head
rows; finetune.regularize (l2sp | ewc, train/regularize.py) adds a penalty pulling the encoder back towards
its start weights.

Resume: with a checkpoint folder, the full training state (weights, AdamW
moments, scheduler, RNG, data position) is written every `checkpoint_every`
steps as safetensors + JSON (no pickle), under a key that hashes params, data
and encoder, so a re-run after a crash continues where it stopped and a run
with different params or data never picks up a stale checkpoint.

Multi-label data: the label column holds the labels joined by "|"
(LABEL_SEPARATOR); the model has one sigmoid per label and trains with BCE.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from domaintune.core.device import batch_size_for, resolve_device
from domaintune.core.errors import DataError, ParamsError
from domaintune.core.params import BaseParams, FinetuneParams, as_dict
from domaintune.data.dataset import LABEL_SEPARATOR, encode_labels, json_lines_sha256, split_labels
from domaintune.modeling import chunks as chunking
from domaintune.modeling import encoders
from domaintune.modeling.adapters import (
    check_4bit_shapes,
    check_target_modules,
    encoder_layers,
    param_depth,
    qlora_backend_error,
    quantize_encoder_4bit,
    target_modules,
)
from domaintune.modeling.encoders import count_parameters, predict_logits, save_classifier, set_threads
from domaintune.train import distributed, regularize, setfit, warmstart
from domaintune.train.curves import write_curves
from domaintune.train.distributed import shard
from domaintune.train.engine import Engine, EngineConfig, load_trainable_state, param_groups
from domaintune.train.runkey import run_key

log = logging.getLogger("domaintune.training")


def label_list(train_df: pd.DataFrame, labels: Sequence[str], problem_type: str) -> list[str]:
    """The model's label order: labels.json for single-label; for multi-label the
    individual names found by splitting (labels.json then lists the combinations)."""
    if problem_type == "single_label":
        return list(labels)
    names = set()
    for value in list(labels) + train_df["label"].tolist():
        names.update(split_labels(value))
    return sorted(names)



def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator,
                           group: int = 50) -> list[np.ndarray]:
    """Shuffled batches of similar length: shuffle, sort within mega-batches of
    `group` batches, cut, shuffle the batch order. Padding waste stays small while
    every epoch still sees a different order (HF's group_by_length does the same)."""
    perm = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    batches = []
    mega = batch_size * group
    for start in range(0, len(perm), mega):
        chunk = perm[start : start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]



def window_packs(docs: np.ndarray, windows: np.ndarray, budget: int) -> list[np.ndarray]:
    """Split a batch of documents (finetune.chunk_loss document) into micro-batches of whole documents holding at
    most `budget` windows each (a document with more windows than that goes alone), so memory stays that of a
    window-level batch of `budget` rows."""
    packs, cur, used = [], [], 0
    for d in docs:
        w = int(windows[d])
        if cur and used + w > budget:
            packs.append(np.array(cur))
            cur, used = [], 0
        cur.append(d)
        used += w
    if cur:
        packs.append(np.array(cur))
    return packs


def pooled_document_logits(window_logits, counts):
    """Each document's logits from its windows' (consecutive rows, `counts` per document): the log-mean-exp, a
    smooth maximum (modeling.chunks.pool_logits' logsumexp), so the window that holds the evidence carries most of
    the gradient (multiple-instance learning) while every window still gets some."""
    import torch

    parts = torch.split(window_logits, [int(c) for c in counts])
    return torch.stack([torch.logsumexp(z, dim=0) - math.log(z.shape[0]) for z in parts])


def collate(ids: Sequence[Sequence[int]], pad_id: int):
    """Pad a batch of token id lists to its own longest (dynamic padding)."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids, mask



def probe_head(features: np.ndarray, y: np.ndarray, problem_type: str, num_labels: int, C: float,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Head weights [K, H] and bias [K] from a logistic regression on frozen features."""
    from sklearn.linear_model import LogisticRegression

    H = features.shape[1]
    W = np.zeros((num_labels, H), dtype=np.float32)
    b = np.zeros(num_labels, dtype=np.float32)
    if problem_type == "multi_label":
        for k in range(num_labels):
            col = y[:, k]
            if col.min() == col.max():  # a label always on or always off: constant logit
                p = float(np.clip(col.mean(), 1e-3, 1 - 1e-3))
                b[k] = math.log(p / (1 - p))
                continue
            clf = LogisticRegression(C=C, max_iter=1000, random_state=seed).fit(features, col)
            W[k], b[k] = clf.coef_[0], clf.intercept_[0]
        return W, b
    present = np.unique(y)
    if len(present) == 1:
        b[present[0]] = 5.0
        return W, b
    clf = LogisticRegression(C=C, max_iter=1000, random_state=seed).fit(features, y)
    cls = clf.classes_
    if len(cls) == 2:  # sklearn keeps one row for two classes: split it symmetrically
        W[cls[0]], W[cls[1]] = -clf.coef_[0] / 2, clf.coef_[0] / 2
        b[cls[0]], b[cls[1]] = -clf.intercept_[0] / 2, clf.intercept_[0] / 2
    else:
        W[cls], b[cls] = clf.coef_, clf.intercept_
    absent = np.setdiff1d(np.arange(num_labels), cls)
    b[absent] = b[cls].min() - 5.0  # never-seen classes start unlikely
    return W, b



def classification_metrics(logits: np.ndarray, y: np.ndarray, problem_type: str) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    if problem_type == "multi_label":
        pred = (logits > 0).astype(int)
        y = y.astype(int)
        return {"accuracy": float(accuracy_score(y, pred)),  # exact-match (subset) accuracy
                "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
                "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0))}
    pred = logits.argmax(1)
    return {"accuracy": float(accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}



def _snapshot(model, names: set) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}



def finetune_device(base: BaseParams, ft: FinetuneParams) -> str:
    """base.device, unless the deprecated finetune.device names something other than auto."""
    if ft.device != "auto":
        return resolve_device(ft.device, "finetune.device")
    return resolve_device(base.device)



def _param_groups(model, trainable: list[tuple[str, Any]], ft: FinetuneParams, num_layers: int) -> list[dict]:
    """AdamW groups (engine.param_groups): no weight decay on bias/LayerNorm; layer-wise LR decay (each
    block below the top gets `layerwise_lr_decay` times the LR of the one above); one group per depth
    (gradual unfreezing switches whole depths)."""
    depth = lambda n: param_depth(n, num_layers)  # noqa: E731
    groups = param_groups(trainable, ft.lr, ft.weight_decay,
                          lr_scale=lambda n: ft.layerwise_lr_decay ** (num_layers + 1 - depth(n)), group_key=depth,
                          trainable_only=False)
    for g in groups:
        g["depth"] = g["key"]
    return groups



def _apply_method(model, ft: FinetuneParams, seed: int, device: str = "cpu") -> None:
    """Set requires_grad (and wrap with LoRA) according to finetune.method."""
    import torch

    enc = model.encoder
    layers = encoder_layers(enc)
    if ft.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        targets = target_modules(enc, ft.target_modules, causal=False)
        check_target_modules(enc, targets)
        if ft.method == "qlora":
            check_4bit_shapes(enc, device)
            quantize_encoder_4bit(enc, ft.qlora_compute_dtype)
        torch.manual_seed(seed)  # LoRA A matrices are random: seed them
        cfg = LoraConfig(r=ft.lora_r, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                         target_modules=targets,
                         modules_to_save=list(ft.modules_to_save) or None, bias="none")
        model.encoder = get_peft_model(enc, cfg)
        return
    for p in enc.parameters():
        p.requires_grad = ft.method == "full" or ft.method == "freeze"
    if ft.method == "freeze":
        if ft.freeze_layers > len(layers):
            raise ParamsError(f"params.yaml: finetune.freeze_layers: {ft.freeze_layers} > the model's "
                              f"{len(layers)} layers")
        emb = getattr(enc, "embeddings", None)
        if emb is not None:
            for p in emb.parameters():
                p.requires_grad = False
        for layer in list(layers)[: ft.freeze_layers]:
            for p in layer.parameters():
                p.requires_grad = False



def validate_setup(ft: FinetuneParams, encoder_dir: str, device: str = "cpu") -> None:
    """Everything that can be checked before any training: a bad setup fails first."""
    if ft.method == "qlora":
        err = qlora_backend_error()
        if err:
            raise ParamsError(f"params.yaml: finetune.method: qlora needs bitsandbytes 4-bit support: {err}")
    if ft.method in ("lora", "qlora"):
        from domaintune.modeling.encoders import load_encoder

        encoder = load_encoder(encoder_dir)
        check_target_modules(encoder, target_modules(encoder, ft.target_modules, causal=False))
        if ft.method == "qlora":
            check_4bit_shapes(encoder, device)



@dataclass
class LoopState:
    """Where a fine-tuning run stands: what a checkpoint must hold besides the engine's own state."""

    epoch: int = 0
    pos: int = 0                        # next batch of `epoch`
    epochs: list = field(default_factory=list)  # per-epoch records (train loss, validation metrics)
    initial: Optional[dict] = None      # validation before training (where the probe starts)
    best_f1: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    epoch_rng_state: Optional[dict] = None  # the shuffle generator at the start of `epoch`



def _loss_function(ft: FinetuneParams, y_train: np.ndarray, num_labels: int, device: str):
    """Cross-entropy (single label) or BCE (multi label) with label smoothing; class weights are inverse
    frequency (n / (K * count)), capped so a one-off label does not dominate."""
    import torch
    import torch.nn.functional as F

    if ft.problem_type == "single_label":
        weight = None
        if ft.class_weights:
            counts = np.bincount(y_train, minlength=num_labels).astype(np.float64)
            weight = torch.tensor(np.clip(len(y_train) / (num_labels * np.maximum(counts, 1)), 0, 10),
                                  dtype=torch.float32, device=device)
        return lambda logits, target: F.cross_entropy(logits, target, weight=weight,
                                                      label_smoothing=ft.label_smoothing)
    pos_weight = None
    if ft.class_weights:
        pos = y_train.sum(0)
        pos_weight = torch.tensor(np.clip((len(y_train) - pos) / np.maximum(pos, 1), 0, 10), dtype=torch.float32,
                                  device=device)

    def bce(logits, target):
        target = target * (1 - ft.label_smoothing) + ft.label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    return bce



OUTLIER = -1  # the target of an outlier-exposure row (finetune.outlier_exposure)


def outlier_exposure_loss(loss_fn, weight: float):
    """Outlier exposure (Hendrycks, Mazeika & Dietterich 2019): the loss of the in-scope rows of a batch plus
    `weight` times the mean cross-entropy from uniform of the out-of-scope rows (target OUTLIER),
    -mean_c log softmax(z)_c, which is smallest when the model spreads its answer evenly over the labels."""
    import torch

    def loss(logits, target):
        out = target == OUTLIER
        if not bool(out.any()):
            return loss_fn(logits, target)
        oe = -torch.log_softmax(logits[out], dim=-1).mean(dim=-1).mean()
        if bool(out.all()):
            return weight * oe
        return loss_fn(logits[~out], target[~out]) + weight * oe
    return loss


class FinetuneRun:
    """One seed's training on the engine: the classification objective, epochs over length-grouped
    shuffled batches, validation and early stopping, best-weights restore and exact resume."""

    # Set by _build_engine under base.long_text chunks with finetune.chunk_loss document: batches are documents
    # (batch_units per batch). A subclass with its own _build_engine (train/tokens.py) keeps these defaults.
    doc_level = False
    batch_units: Optional[int] = None

    def __init__(self, train_df: pd.DataFrame, val_df: pd.DataFrame, labels: Sequence[str], encoder_dir: str,
                 base: BaseParams, ft: FinetuneParams, seed: int, checkpoint_dir: Optional[Path] = None,
                 device: Optional[str] = None, start: Any = None, outliers: Sequence[str] = ()):
        import torch


        self.base, self.ft, self.seed = base, ft, seed
        # base.long_text: under chunks a training document's windows are pooled into its logits and the loss is on
        # those (finetune.chunk_loss document), or every window is a training row carrying the document's label
        # (window); validation pools each document's windows (the pooling chosen on validation).
        self.long_text = chunking.LongText.from_params(base)
        self.pooling_scores: dict[str, float] = {}
        self.start = start  # warmstart.Start / setfit.Tuned: the weights to start from (None: encoder_dir)
        self.device = device or finetune_device(base, ft)
        self.eval_batch = batch_size_for(self.device)
        self.names = label_list(train_df, labels, ft.problem_type)
        self.y_train = encode_labels(train_df, self.names, ft.problem_type, "train.parquet")
        self.y_val = encode_labels(val_df, self.names, ft.problem_type, "validation.parquet")
        self.texts = train_df["text"].astype(str).tolist()
        # finetune.outlier_exposure: out-of-scope texts trained towards uniform (rows after the train rows, target
        # OUTLIER); the probe, class weights and validation see the train rows only
        self.outliers = [str(t) for t in outliers] if ft.outlier_exposure > 0 else []
        self.val_texts = val_df["text"].astype(str).tolist()
        if not self.texts:
            raise DataError("train.parquet", None, None, "no training rows")
        self.world, self.rank = distributed.world_size(), distributed.rank()
        torch.manual_seed(seed)
        np.random.seed(seed)
        self._build_model(encoder_dir)
        self._build_engine(checkpoint_dir)

    def _build_model(self, encoder_dir: str) -> None:
        """Encoder + head, the head fitted by a linear probe, the method applied (which weights train)."""
        import torch

        # encoders.* are looked up per call: tests replace them in their module
        ft = self.ft
        old_head = None
        if self.start is not None:
            encoder, self.tokenizer, old_head = self.start.weights()
        else:
            self.tokenizer = encoders.load_tokenizer(encoder_dir)
            # fp32 master weights whatever the checkpoint's dtype (transformers v5 loads fp16 files as fp16);
            # bf16 speed comes from autocast, not from bf16 weights.
            encoder = encoders.load_encoder(encoder_dir).float()
        self.model = encoders.build_classifier(encoder, len(self.names), ft.pooling, ft.head_dropout).to(self.device)
        self.num_layers = len(encoder_layers(encoder))
        t0 = time.perf_counter()
        self.feats = None
        if ft.head_init == "probe" or ft.method == "head":
            self.feats = encoders.embed_texts(encoder, self.tokenizer, self.texts, batch_size=self.eval_batch,
                                     max_length=self.base.max_length, pooling=ft.pooling,
                                     long_text=self.long_text)  # a document: the mean of its windows
        if ft.head_init == "probe":
            W, b = probe_head(self.feats, self.y_train, ft.problem_type, len(self.names), ft.probe_C, self.seed)
            with torch.no_grad():
                self.model.head.weight.copy_(torch.from_numpy(W))
                self.model.head.bias.copy_(torch.from_numpy(b))
        self.probe_s = time.perf_counter() - t0
        self.label_changes = warmstart.map_head(self.model, self.names, list(self.start.labels), old_head) \
            if old_head is not None else None
        fisher = self._fisher(old_head) if ft.regularize == "ewc" else None
        _apply_method(self.model, ft, self.seed, self.device)
        for p in self.model.head.parameters():
            p.requires_grad = True
        self.model.to(self.device)  # modules added by the method (LoRA) land on the same device
        self.penalty = regularize.Penalty(ft.regularize, ft.regularize_strength,
                                          regularize.encoder_params(self.model), fisher) \
            if ft.regularize != "none" else None

    def _fisher(self, old_head: dict) -> dict:
        """EWC's diagonal Fisher: the start version's own classifier (its head, its labels) on its train rows."""
        import torch

        old = encoders.build_classifier(self.model.encoder, len(self.start.labels), self.ft.pooling).to(self.device)
        with torch.no_grad():
            old.head.weight.copy_(old_head["weight"])
            old.head.bias.copy_(old_head["bias"])
        texts, y = warmstart.fisher_rows(self.start, self.ft.ewc_rows, self.seed)
        return regularize.diagonal_fisher(old, self.tokenizer, texts, y, list(regularize.encoder_params(self.model)),
                                          self.ft.batch_size, self.base.max_length, self.device)

    def _trainable_groups(self) -> list[dict]:
        """The optimizer's parameter groups of the weights that train (recorded: names, count, group depths)."""
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.trainable_names = {n for n, _ in trainable}
        self.trainable_count = sum(p.numel() for _, p in trainable)
        groups = _param_groups(self.model, trainable, self.ft, self.num_layers)
        self.group_depth = [g["depth"] for g in groups]
        return groups

    def _make_engine(self, groups: list[dict], units: int, checkpoint_dir: Optional[Path]) -> None:
        """The training engine for `units` rows (or documents) per epoch in batches of self.batch_units (or
        finetune.batch_size): the schedule's length follows from them."""
        ft = self.ft
        self.steps_per_epoch = math.ceil(units / (self.batch_units or ft.batch_size))
        total = self.steps_per_epoch * ft.epochs
        cfg = EngineConfig(lr=ft.lr, total_steps=total, warmup_steps=int(ft.warmup_ratio * total),
                           scheduler=ft.scheduler, max_grad_norm=ft.max_grad_norm, grad_accum=ft.grad_accum,
                           bf16=ft.bf16, checkpoint_every=ft.checkpoint_every, compile=ft.compile)
        self.engine = Engine(self.model, groups, cfg, checkpoint_dir=checkpoint_dir, device=self.device)

    def _build_engine(self, checkpoint_dir: Optional[Path]) -> None:
        import torch

        ft = self.ft
        groups = self._trainable_groups()
        texts = self.texts + self.outliers  # outlier-exposure rows after the train rows
        if ft.method == "head":  # batches of cached features (one per document): every row costs the same
            self.ids, self.lengths = None, np.ones(len(texts), dtype=int)
            self.row_doc = np.arange(len(texts))
        else:  # token ids pre-computed once (a row per window under chunks); each batch padded to its own longest
            enc = chunking.encode(self.tokenizer, texts, self.base.max_length, self.long_text)
            self.ids, self.row_doc = enc.inputs["input_ids"], enc.doc
            self.lengths = np.array([len(x) for x in self.ids])
        # finetune.chunk_loss document: a batch is documents (their windows run together, pooled, one loss per
        # document), as many per batch as make batch_size windows on average; micro-batches keep whole documents
        # within batch_size windows (window_packs)
        self.doc_level = (ft.method != "head" and self.long_text.mode == "chunks" and ft.chunk_loss == "document"
                          and len(self.lengths) > len(texts))
        if self.doc_level:
            self.doc_start = np.searchsorted(self.row_doc, np.arange(len(texts)))  # windows are consecutive
            self.doc_windows = np.bincount(self.row_doc, minlength=len(texts))
            self.lengths = np.bincount(self.row_doc, weights=self.lengths, minlength=len(texts)).astype(int)
            self.batch_units = max(1, round(ft.batch_size * len(texts) / len(self.row_doc)))
        self._make_engine(groups, len(self.lengths), checkpoint_dir)
        self.loss_fn = _loss_function(ft, self.y_train, len(self.names), self.device)
        if self.outliers:
            self.loss_fn = outlier_exposure_loss(self.loss_fn, ft.outlier_exposure)
        y_rows = np.r_[self.y_train, np.full(len(self.outliers), OUTLIER, dtype=self.y_train.dtype)] \
            if self.outliers else self.y_train  # (multi_label's 2-D targets never have outliers)
        self.y_t = torch.from_numpy(y_rows[self.row_doc]).to(self.device)  # each row's document label
        self.y_doc_t = torch.from_numpy(y_rows).to(self.device)
        self.feats_t = torch.from_numpy(self.feats).to(self.device) if ft.method == "head" else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def objective(self, model, idx: np.ndarray):
        """The engine's loss function: a batch is row indices into the training rows (documents, or their
        windows under base.long_text chunks)."""
        import torch

        if self.doc_level:  # idx: documents; their windows run as one batch, pooled per document
            counts = self.doc_windows[idx]
            rows = np.concatenate([np.arange(self.doc_start[d], self.doc_start[d] + c) for d, c in zip(idx, counts)])
            input_ids, mask = collate([self.ids[i] for i in rows], self.pad_id)
            logits = model(input_ids=input_ids.to(self.device, non_blocking=True),
                           attention_mask=mask.to(self.device, non_blocking=True))
            docs = torch.from_numpy(np.asarray(idx)).to(self.device)
            loss = self.loss_fn(pooled_document_logits(logits.float(), counts), self.y_doc_t[docs])
            return loss + self.penalty() if self.penalty is not None else loss
        rows = torch.from_numpy(idx).to(self.device)
        if self.ft.method == "head":
            logits = model.head(model.dropout(self.feats_t[rows]))
        else:
            input_ids, mask = collate([self.ids[i] for i in idx], self.pad_id)
            logits = model(input_ids=input_ids.to(self.device, non_blocking=True),
                           attention_mask=mask.to(self.device, non_blocking=True))
        loss = self.loss_fn(logits.float(), self.y_t[rows])
        return loss + self.penalty() if self.penalty is not None else loss

    def val_logits(self) -> np.ndarray:
        """Validation logits, one row per document. Under chunks the windows run once and the pooling with the
        best validation macro-F1 pools them (modeling.chunks.choose_pooling; kept in self.long_text)."""
        if self.long_text.mode != "chunks":
            return predict_logits(self.model, self.tokenizer, self.val_texts, batch_size=self.eval_batch,
                                  max_length=self.base.max_length, long_text=self.long_text)
        batches, per_input = predict_logits(self.model, self.tokenizer, self.val_texts, batch_size=self.eval_batch,
                                            max_length=self.base.max_length, long_text=self.long_text,
                                            per_input=True)
        pooled = {p: batches.documents(per_input, p) for p in chunking.POOLINGS}
        best, self.pooling_scores = chunking.choose_pooling(
            lambda p: classification_metrics(pooled[p], self.y_val, self.ft.problem_type)["macro_f1"])
        self.long_text = dataclasses.replace(self.long_text, pooling=best)
        return pooled[best]

    def validate(self) -> dict:
        import torch


        vl = self.val_logits()
        out = {f"val_{k}": v for k, v in classification_metrics(vl, self.y_val, self.ft.problem_type).items()}
        with torch.no_grad():
            out["val_loss"] = float(self.loss_fn(torch.from_numpy(vl).to(self.device),
                                                 torch.from_numpy(self.y_val).to(self.device)))
        return out

    def set_unfrozen(self, epoch: int) -> None:
        """Gradual unfreezing: epoch e trains the head plus the top ceil(L*(e+1)/epochs)
        blocks (embeddings only in the last epoch). Frozen groups get no grad, so AdamW skips them."""
        if not self.ft.gradual_unfreeze:
            return
        top = math.ceil(self.num_layers * (epoch + 1) / self.ft.epochs)
        min_depth = self.num_layers + 1 - top if epoch < self.ft.epochs - 1 else 0
        for g, depth in zip(self.engine.opt.param_groups, self.group_depth):
            for p in g["params"]:
                p.requires_grad = depth >= min_depth

    def checkpoint(self, loop: LoopState, rng: np.random.Generator, epoch: int, pos: int) -> None:
        # Mid-epoch (pos > 0), resume replays this epoch's shuffle from where it started; at an epoch
        # end (pos 0) the next epoch shuffles with the generator as it is now, as an uninterrupted run does.
        state = dict(dataclasses.asdict(loop), epoch=epoch, pos=pos, step=self.engine.step_count, seed=self.seed,
                     epoch_rng_state=loop.epoch_rng_state if pos else rng.bit_generator.state)
        self.engine.save(state, self.best_state)

    def train_step(self, idx: np.ndarray, epoch: int, t_train: float) -> dict:
        """One optimizer step on global batch `idx`: this process's share, in grad_accum micro-batches,
        each weighted by its share of the global batch."""
        mine = shard(idx, self.world, self.rank)
        micro = [m for m in np.array_split(mine, self.ft.grad_accum) if len(m)]
        if self.doc_level:  # whole documents, at most batch_size windows per micro-batch
            micro = [p for m in micro for p in window_packs(m, self.doc_windows, self.ft.batch_size)]
        weights = [len(m) / len(idx) for m in micro]
        if not micro:  # a last batch smaller than the process count: take part with a zero-weight row, so
            micro, weights = [idx[:1]], [0.0]  # every process reduces the same gradients
        rec = self.engine.step(self.objective, micro, weights=weights, samples=len(idx))
        rec.update(epoch=epoch, samples=len(idx), seconds=time.perf_counter() - t_train)
        return rec

    def restore(self) -> tuple[LoopState, np.random.Generator]:
        rng = np.random.default_rng(self.seed)
        loop = LoopState(epoch_rng_state=rng.bit_generator.state)
        self.best_state = None
        restored = self.engine.restore()
        if restored is not None:
            st, self.best_state = restored
            loop = LoopState(**{k: st[k] for k in dataclasses.asdict(loop) if k in st})
            log.info("resuming seed %d at epoch %d, step %d", self.seed, loop.epoch, self.engine.step_count)
        rng.bit_generator.state = loop.epoch_rng_state
        return loop, rng

    def end_epoch(self, loop: LoopState, epoch: int, bar) -> bool:
        """Validate, keep the best weights, log the epoch line; returns whether to stop early."""
        ft = self.ft
        ep = {"epoch": epoch, "step": self.engine.step_count,
              "train_loss": float(np.mean([s["loss"] for s in self.engine.history if s.get("epoch") == epoch]
                                          or [0.0]))}
        if len(self.val_texts):
            ep.update(self.validate())
            if ep["val_macro_f1"] > loop.best_f1:
                loop.best_f1, loop.best_epoch, loop.bad_epochs = ep["val_macro_f1"], epoch, 0
                self.best_state = _snapshot(self.model, self.trainable_names) if ft.restore_best else None
            else:
                loop.bad_epochs += 1
        loop.epochs.append(ep)
        line = epoch_line(self.seed, epoch, ft.epochs, ep, loop.best_epoch == epoch)
        if bar is not None:
            bar.write(line)  # clears the bar first, so the line is never glued to it
        else:
            log.info("%s", line)
        return ft.early_stopping_patience > 0 and loop.bad_epochs >= ft.early_stopping_patience

    def train(self, progress: bool = True) -> dict:
        """Run (or resume) the epochs; returns the result dict (history, validation, timing)."""
        ft, engine = self.ft, self.engine
        loop, rng = self.restore()
        if len(self.val_texts) and loop.initial is None:  # where training starts from (e.g. the probe)
            loop.initial = self.validate()
        bar = None
        if progress:
            from domaintune.core.progress import Progress

            bar = Progress(engine.cfg.total_steps, f"finetune seed {self.seed}", "step", initial=engine.step_count)
        t_train, start_step, stopped_early = time.perf_counter(), engine.step_count, False
        for epoch in range(loop.epoch, ft.epochs):
            loop.epoch_rng_state = rng.bit_generator.state if epoch != loop.epoch or not loop.pos \
                else loop.epoch_rng_state
            rng.bit_generator.state = loop.epoch_rng_state
            batches = length_grouped_batches(self.lengths, self.batch_units or ft.batch_size, rng)
            self.set_unfrozen(epoch)
            self.model.train()
            if ft.method == "head":
                self.model.encoder.eval()  # frozen feature extractor: its dropout stays off
            for pos in range(loop.pos if epoch == loop.epoch else 0, len(batches)):
                rec = self.train_step(batches[pos], epoch, t_train)
                if bar is not None:
                    bar.update(1, loss=f"{rec['loss']:.4f}")
                if ft.checkpoint_every and engine.step_count % ft.checkpoint_every == 0 and pos + 1 < len(batches):
                    self.checkpoint(loop, rng, epoch, pos + 1)
                engine.maybe_crash()
            stop = self.end_epoch(loop, epoch, bar)
            # Epoch-end checkpoint: resume starts the next epoch (or finishes, if this was the last).
            self.checkpoint(loop, rng, ft.epochs if stop else epoch + 1, 0)
            if stop:
                stopped_early = True
                log.info("seed %d: early stop after epoch %d (no macro-F1 gain for %d epochs)", self.seed, epoch,
                         loop.bad_epochs)
                break
        if bar is not None:
            bar.close()
        if not stopped_early and loop.epochs and len(loop.epochs) < ft.epochs:
            stopped_early = True  # resumed from an early-stopped checkpoint
        return self.finish(loop, stopped_early, time.perf_counter() - t_train, engine.step_count - start_step)

    def finish(self, loop: LoopState, stopped_early: bool, train_s: float, steps_run: int) -> dict:
        if self.best_state is not None and self.ft.restore_best:
            load_trainable_state(self.model, self.best_state)
        for p in self.model.parameters():
            p.requires_grad = False
        final_val = {}
        if len(self.val_texts):
            vl = self.val_logits()
            final_val = classification_metrics(vl, self.y_val, self.ft.problem_type)
        history = {"steps": self.engine.history, "epochs": loop.epochs}
        if loop.initial is not None:
            history["initial"] = loop.initial
        samples = sum(s["samples"] for s in self.engine.history[len(self.engine.history) - steps_run:]) \
            if steps_run else 0
        return {
            "seed": self.seed, "history": history, "best_epoch": loop.best_epoch, "stopped_early": stopped_early,
            "validation": final_val, "train_seconds": train_s, "probe_seconds": self.probe_s,
            "train_samples_per_s": samples / train_s if train_s > 0 and samples else None,
            "steps": self.engine.step_count, "trainable_params": self.trainable_count,
            "total_params": count_parameters(self.model), "bf16": self.engine.bf16, "device": self.device,
            "processes": self.world, "long_text": self.long_text.as_meta(),
            "pooling_validation_macro_f1": self.pooling_scores or None,
        }



def train_one(train_df: pd.DataFrame, val_df: pd.DataFrame, labels: Sequence[str], encoder_dir: str,
              base: BaseParams, ft: FinetuneParams, seed: int, checkpoint_dir: Optional[Path] = None,
              progress: bool = True, start: Optional[warmstart.Start] = None, outliers: Sequence[str] = ()):
    """Train one model with one seed. Returns (model, tokenizer, label names, result dict).

    result: history (per-step loss, lr, grad norm; per-epoch validation metrics),
    best epoch, validation metrics of the returned weights, timing. `start`: a warm start's weights."""
    if distributed.world_size() == 1:
        set_threads()
    run_ft, contrastive = ft, None
    if ft.method == "setfit":  # phase 1 tunes the encoder on pairs; phase 2 is a `head` run over it
        start, contrastive = _setfit_phase(train_df, labels, encoder_dir, base, ft, seed, checkpoint_dir, progress,
                                           start)
        run_ft = dataclasses.replace(ft, method="head")
    run = FinetuneRun(train_df, val_df, labels, encoder_dir, base, run_ft, seed, checkpoint_dir, start=start,
                      outliers=outliers)
    result = run.train(progress)
    result["setfit"] = contrastive
    result["label_changes"] = run.label_changes
    result["regularize"] = run.penalty.info() if run.penalty is not None else None
    return run.model, run.tokenizer, run.names, result


def _setfit_phase(train_df, labels, encoder_dir, base, ft, seed, checkpoint_dir, progress, start):
    """SetFit's contrastive phase from the start weights (base encoder or a warm start)."""
    if ft.problem_type != "single_label":
        raise ParamsError("params.yaml: finetune.method: setfit pairs texts by their one label: use it with "
                          "problem_type single_label")
    names = label_list(train_df, labels, ft.problem_type)
    y = encode_labels(train_df, names, ft.problem_type, "train.parquet")
    if start is not None:
        encoder, tok, head = start.weights()
    else:
        encoder, tok, head = encoders.load_encoder(encoder_dir).float(), encoders.load_tokenizer(encoder_dir), None
    device = finetune_device(base, ft)
    info = setfit.contrastive_tune(encoder.to(device), tok, train_df["text"].astype(str).tolist(), y, ft,
                                   base.max_length, seed, device,
                                   checkpoint_dir / "contrastive" if checkpoint_dir is not None else None, progress)
    log.info("seed %d: setfit contrastive phase, %d pairs, %d steps, loss %.4f -> %.4f, %.1f s", seed,
             info["pairs"], info["steps"], info["first_loss"] or 0.0, info["final_loss"] or 0.0, info["seconds"])
    return setfit.Tuned(encoder, tok, head, list(start.labels) if start is not None else []), info



def result_line(m: dict, train_rows: int) -> str:
    """The stage's summary: method, data, steps, the kept seed's validation scores."""
    per = m["per_seed"][str(m["best_seed"])]
    val = ", ".join(f"{name} {m[key]:.4f}" for key, name in (("val_accuracy", "accuracy"), ("val_macro_f1", "macro-F1"))
                    if isinstance(m.get(key), float))
    seeds = f"best of {len(m['seeds'])} seeds: " if len(m["seeds"]) > 1 else ""
    return (f"{m['method']} on {train_rows} train rows, {per['steps']} steps, {m['trainable_params']:,} of "
            f"{m['total_params']:,} params trained; {seeds}seed {m['best_seed']} validation {val or '-'}")



def epoch_line(seed: int, epoch: int, epochs: int, ep: dict, best: bool) -> str:
    """One readable line per epoch, e.g. "seed 42 epoch 1/3: train loss 0.412 | validation accuracy
    0.912, macro-F1 0.905, loss 0.301 (best so far)"."""
    line = f"seed {seed} epoch {epoch + 1}/{epochs}: train loss {ep['train_loss']:.4f}"
    val = [(name, ep[key]) for key, name in (("val_accuracy", "accuracy"), ("val_macro_f1", "macro-F1"),
                                              ("val_micro_f1", "micro-F1"), ("val_loss", "loss")) if key in ep]
    if val:
        line += " | validation " + ", ".join(f"{name} {v:.4f}" for name, v in val) + (" (best so far)" if best else "")
    return line



def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0



def train_classifier(train_df: pd.DataFrame, val_df: pd.DataFrame, labels: Sequence[str], encoder_dir: str,
                     base: BaseParams, ft: FinetuneParams, out_dir: Optional[str | os.PathLike] = None, *,
                     base_encoder: Optional[str] = None, data_hash: str = "",
                     checkpoint_root: Optional[str | os.PathLike] = None,
                     live_dir: Optional[str | os.PathLike] = None, progress: bool = True,
                     start: Optional[warmstart.Start] = None, extra_rows: Optional[dict] = None,
                     outliers: Sequence[str] = (), outliers_source: str = "") -> dict:
    """Train one model per seed in ft.seeds; save the best on validation macro-F1 to out_dir
    (and every seed's under out_dir/seeds/<seed>/ when there is more than one). Returns metrics.

    base_encoder is what model.json records as the encoder (the path as given on the
    command line, e.g. "models/dapt"); defaults to encoder_dir. start: the warm start (finetune.init);
    extra_rows: what the extra-rows file added to train (augmented and replayed rows, its hash), for model.json;
    outliers: the out-of-scope texts of finetune.outlier_exposure (ignored when it is 0), `outliers_source` where
    they came from (recorded with their count and hash).
    """
    validate_setup(ft, encoder_dir, finetune_device(base, ft))
    ckpt_root = Path(checkpoint_root) if checkpoint_root is not None else None
    long_text = chunking.LongText.from_params(base)
    reads = {"long_text": long_text.as_meta()} if long_text.mode != "truncate" else {}  # truncate: keys as before
    outliers = list(outliers) if ft.outlier_exposure > 0 else []
    if ft.outlier_exposure > 0 and not outliers:
        raise ParamsError("params.yaml: finetune.outlier_exposure > 0 needs out-of-scope texts: set "
                          "evaluate.abstain.oos_texts (or finetune.outlier_exposure: 0)")
    exposure = {"weight": ft.outlier_exposure, "texts": len(outliers), "source": outliers_source,
                "sha256": json_lines_sha256([t] for t in outliers),
                "loss": "train rows' loss + weight * mean over these texts of -mean_c log softmax(logits)_c "
                        "(cross-entropy from uniform; Hendrycks et al. 2019)"} if outliers else None
    if exposure is not None:
        reads["outlier_exposure"] = exposure["sha256"]
    keys = {s: run_key("finetune", ft, encoder_dir, max_length=base.max_length, data=data_hash, seed=s,
                       extra=(extra_rows or {}).get("sha256"), init=start.info() if start is not None else None,
                       **reads)
            for s in ft.seeds}
    writer = distributed.rank() == 0  # under a multi-process launch, rank 0 alone writes
    if ckpt_root is not None and writer:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for old in ckpt_root.iterdir():  # checkpoints of other params/data/encoders are stale
            if old.is_dir() and old.name not in keys.values():
                shutil.rmtree(old)
    distributed.barrier()
    runs = []
    for seed in ft.seeds:
        ckpt = ckpt_root / keys[seed] if ckpt_root is not None else None
        model, tok, names, res = train_one(train_df, val_df, labels, encoder_dir, base, ft, seed, ckpt,
                                           progress, start, outliers)
        meta = {
            "labels": names, "pooling": ft.pooling, "problem_type": ft.problem_type, "method": ft.method,
            "max_length": base.max_length, "base_encoder": base_encoder or str(encoder_dir),
            "dataset_hash": data_hash, "seed": seed,
            "label_separator": LABEL_SEPARATOR if ft.problem_type == "multi_label" else None,
            # multi_label: a label is predicted when its sigmoid > 0.5 (logit > 0)
            "threshold": 0.5 if ft.problem_type == "multi_label" else None,
            "quantized_base": "nf4" if ft.method == "qlora" else None,
            "params": {"base": as_dict(base), "finetune": as_dict(ft)},
            "validation": res["validation"], "history_epochs": res["history"]["epochs"],
            "best_epoch": res["best_epoch"],
            # how documents longer than max_length are read (modeling/chunks.py), pooling chosen on validation
            "long_text": {**res["long_text"], "pooling_validation_macro_f1": res["pooling_validation_macro_f1"]},
            # what else was trained on and where training started (warm start, regulariser)
            "extra_rows": extra_rows, "warm_start": start.info() if start is not None else None,
            "regularize": {"kind": ft.regularize, "strength": ft.regularize_strength}
            if ft.regularize != "none" else None,
            "outlier_exposure": exposure,
        }
        if out_dir is None:  # only metrics wanted: do not keep every seed's model in memory
            model = None
        runs.append((seed, model, tok, meta, res))
    score = lambda r: r[4]["validation"].get("macro_f1", 0.0)  # noqa: E731
    best = max(runs, key=score)
    if out_dir is not None and writer:
        out = Path(out_dir)
        save_classifier(best[1], best[2], out, best[3])
        if len(runs) > 1:
            for seed, model, tok, meta, _ in runs:
                save_classifier(model, tok, out / "seeds" / str(seed), meta)
    if live_dir is not None and writer:
        write_live(live_dir, [(r[0], r[4]) for r in runs], best[0])
    metrics = summarize(ft, [r[4] for r in runs], best[0])
    kept = best[4]
    metrics["warm_start"] = dict(start.info(), **(kept["label_changes"] or {})) if start is not None else None
    metrics["regularize"] = kept["regularize"]
    metrics["setfit"] = kept["setfit"]
    metrics["outlier_exposure"] = exposure
    log.info("%s", result_line(metrics, len(train_df)))
    distributed.barrier()
    if ckpt_root is not None and writer:  # finished: these checkpoints are done with
        for k in keys.values():
            shutil.rmtree(ckpt_root / k, ignore_errors=True)
    return metrics



def summarize(ft: FinetuneParams, results: list[dict], best_seed: int) -> dict:
    out: dict[str, Any] = {"method": ft.method, "problem_type": ft.problem_type, "seeds": list(ft.seeds),
                           "best_seed": best_seed}
    keys = sorted({k for r in results for k in r["validation"]})
    for k in keys:
        vals = [r["validation"][k] for r in results if k in r["validation"]]
        out[f"val_{k}"] = next(r["validation"][k] for r in results if r["seed"] == best_seed)
        out[f"val_{k}_mean"] = float(np.mean(vals))
        out[f"val_{k}_std"] = _std(vals)
    out["trainable_params"] = results[0]["trainable_params"]
    out["total_params"] = results[0]["total_params"]
    out["train_seconds"] = float(sum(r["train_seconds"] for r in results))
    sps = [r["train_samples_per_s"] for r in results if r["train_samples_per_s"]]
    out["train_samples_per_s"] = float(np.mean(sps)) if sps else None
    out["per_seed"] = {str(r["seed"]): {"validation": r["validation"], "best_epoch": r["best_epoch"],
                                        "stopped_early": r["stopped_early"], "steps": r["steps"],
                                        "train_seconds": r["train_seconds"],
                                        "final_train_loss": r["history"]["steps"][-1]["loss"]
                                        if r["history"]["steps"] else None,
                                        "first_train_loss": r["history"]["steps"][0]["loss"]
                                        if r["history"]["steps"] else None}
                       for r in results}
    return out



def write_live(live_dir: str | os.PathLike, runs: list[tuple[int, dict]], best_seed: int) -> None:
    """DVCLive logs (per-step loss, lr, grad norm; per-epoch validation metrics), written
    from the recorded history so a resumed run logs one continuous curve. The kept (best)
    seed's logs are live_dir itself (so dvc.yaml can name live_dir/plots); with several
    seeds, every seed's are also under live_dir/seeds/<seed>/."""
    live_dir = Path(live_dir)
    if live_dir.exists():
        shutil.rmtree(live_dir)
    targets = [(live_dir, res) for seed, res in runs if seed == best_seed]
    if len(runs) > 1:
        targets += [(live_dir / "seeds" / str(seed), res) for seed, res in runs]
    for folder, res in targets:
        epochs = res["history"]["epochs"]
        val = {f"val/{k[4:]}": [(e["step"], e[k]) for e in epochs if k in e]
               for k in dict.fromkeys(k for e in epochs for k in e if k.startswith("val_"))}
        write_curves(folder, res["history"]["steps"], points=val, end_step=res["steps"],
                     summary={"validation": res["validation"], "best_epoch": res["best_epoch"]})

