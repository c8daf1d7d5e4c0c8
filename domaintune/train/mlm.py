"""Masked-language-model (MLM) training for domain-adaptive pre-training, on the training engine.

The corpus (train-split texts plus unlabelled lines, de-duplicated, every dropped line listed),
packing into fixed-size blocks, BERT whole-word masking, the MLM loss at masked positions only,
the held-out loss under one fixed mask, the MLM head (warm-up, save, reload) and `adapt`, which
drives domaintune.engine with an MLM objective: exact resume after a crash from checkpoints, and
a per-step history (MLM loss, LR, grad norm, held-out perplexity) that DVCLive draws.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from domaintune.core.errors import DataError, ParamsError
from domaintune.core.params import DaptParams
from domaintune.data.sources import read_lines
from domaintune.data.textnorm import normalise
from domaintune.modeling.encoders import load_encoder, load_tokenizer
from domaintune.train import distributed
from domaintune.train.curves import CURVES, write_curves
from domaintune.train.engine import Engine, EngineConfig, param_groups
from domaintune.train.runkey import run_key

log = logging.getLogger("domaintune.mlm")

INFO_FILE = "dapt_info.json"
HEAD_FILE = "mlm_head.safetensors"
IGNORE = -100  # label of positions that carry no MLM loss (torch CrossEntropy's ignore_index)


# ----------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """The de-duplicated texts DAPT trains on, with an account of every line not used."""

    texts: list[str]
    sources: list[str]  # "file:line" of each text, for the record
    counts: dict = field(default_factory=dict)
    removed: list[dict] = field(default_factory=list)  # {"source", "reason"} per dropped line


def read_corpus_file(path: str | Path) -> list[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 text file, one text per line (data.sources.read_lines)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, None, None, "corpus file not found (listed in params.yaml dapt.corpus)")
    out = list(enumerate(read_lines(p, "corpus file"), start=1))
    if not any(t.strip() for _, t in out):
        raise DataError(p, None, None, "corpus file is empty (no non-blank lines)")
    return out


def build_corpus(train_texts: Sequence[str], corpus_files: dict[str, list[tuple[int, str]]],
                 exclude_texts: Sequence[str] = (), train_file: str = "train.parquet") -> Corpus:
    """Train texts + corpus lines, minus blanks, duplicates and lines equal to a validation/test text.

    Every dropped line is counted and listed with its source and reason.
    """
    # Exact duplicates after dedupe's normalisation (NFKC, casefold, whitespace): the same text once
    # in training and once in the held-out slice would make the held-out perplexity a memory test.
    excluded = {normalise(t) for t in exclude_texts}
    seen: set[str] = set()
    corpus = Corpus(texts=[], sources=[])
    counts = {"train_texts": 0, "corpus_lines": 0, "blank": 0, "duplicate": 0, "matches_eval_text": 0}

    def add(text: str, source: str, from_corpus: bool) -> None:
        key = normalise(text)
        if not key:
            counts["blank"] += 1
            corpus.removed.append({"source": source, "reason": "blank"})
        elif from_corpus and key in excluded:
            # An unlabelled line identical to a validation/test text would leak it into training.
            counts["matches_eval_text"] += 1
            corpus.removed.append({"source": source, "reason": "matches a validation/test text"})
        elif key in seen:
            counts["duplicate"] += 1
            corpus.removed.append({"source": source, "reason": "duplicate"})
        else:
            seen.add(key)
            corpus.texts.append(text.strip())
            corpus.sources.append(source)

    for i, text in enumerate(train_texts):
        counts["train_texts"] += 1
        add(str(text), f"{train_file}:row {i}", from_corpus=False)
    for name, lines in corpus_files.items():
        for lineno, text in lines:
            counts["corpus_lines"] += 1
            add(text, f"{name}:line {lineno}", from_corpus=True)
    counts["used"] = len(corpus.texts)
    counts["removed"] = len(corpus.removed)
    corpus.counts = counts
    if len(corpus.texts) < 2:
        raise DataError(train_file, None, "text", f"the DAPT corpus has {len(corpus.texts)} usable text(s) "
                        "(train split + dapt.corpus); need at least 2 (one to train on, one held out)")
    return corpus


def split_heldout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) text indices; at least one text on each side."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = min(max(1, round(n * fraction)), n - 1)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


# ----------------------------------------------------------------------------- blocks and masks


@dataclass
class Vocab:
    """What masking needs to know about a tokenizer."""

    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    special: np.ndarray       # bool [vocab]: never masked, never a random replacement
    continuation: np.ndarray  # bool [vocab]: this token continues the previous word

    @classmethod
    def from_tokenizer(cls, tok) -> "Vocab":
        n = len(tok)
        tokens = tok.convert_ids_to_tokens(list(range(n)))
        special = np.zeros(n, dtype=bool)
        special[[i for i in tok.all_special_ids if i is not None and i < n]] = True
        if any(t.startswith("##") for t in tokens if t):
            # WordPiece (BERT): "##" marks a piece that continues the word before it.
            cont = np.array([bool(t) and t.startswith("##") for t in tokens])
        elif any(t.startswith(("\u2581", "\u0120")) for t in tokens if t):
            # SentencePiece / byte-level BPE mark word *starts* instead.
            cont = np.array([bool(t) and not t.startswith(("\u2581", "\u0120")) for t in tokens])
        else:
            cont = np.zeros(n, dtype=bool)  # unknown scheme: every token is its own word
        for name in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
            if getattr(tok, name) is None:
                raise ParamsError(f"params.yaml: base.model: the tokenizer has no {name[:-9]} token; "
                                  "DAPT needs a BERT-style masked-LM tokenizer")
        return cls(tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id, special, cont & ~special)


def pack_blocks(token_lists: Sequence[Sequence[int]], block_size: int, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate texts as `t1 [SEP] t2 [SEP] ...` and cut into blocks of exactly block_size tokens.

    Each block starts with [CLS] (the position BERT always saw first). Packing
    wastes no compute on padding; only the last block is padded, and kept, so no
    text is dropped. Returns (input_ids, attention_mask), both int64 [n_blocks, block_size].
    """
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(vocab.sep_id)
    body = block_size - 1
    n_blocks = max(1, math.ceil(len(stream) / body))
    ids = np.full((n_blocks, block_size), vocab.pad_id, dtype=np.int64)
    mask = np.zeros((n_blocks, block_size), dtype=np.int64)
    for b in range(n_blocks):
        chunk = stream[b * body:(b + 1) * body]
        ids[b, 0] = vocab.cls_id
        ids[b, 1:1 + len(chunk)] = chunk
        mask[b, :1 + len(chunk)] = 1
    return ids, mask


def whole_word_mask(input_ids: np.ndarray, attention_mask: np.ndarray, vocab: Vocab, probability: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT whole-word masking: pick words with `probability`, mask every piece of a picked word.

    Of the picked tokens 80% become [MASK], 10% a random token, 10% stay (so the
    model cannot learn that only [MASK] positions matter). Special and padding
    tokens are never picked. Every block with at least one word gets at least
    one masked word, so no batch has an empty loss. Returns (masked ids, labels)
    where labels hold the original id at picked positions and -100 elsewhere.
    """
    ids = np.asarray(input_ids)
    cand = (np.asarray(attention_mask) == 1) & ~vocab.special[ids]
    prev = np.zeros_like(cand)
    prev[:, 1:] = cand[:, :-1]
    start = cand & ~(vocab.continuation[ids] & prev)
    word = np.cumsum(start.ravel()).reshape(ids.shape) - 1  # word index, valid where cand
    n_words = int(start.sum())
    if n_words == 0:
        return ids.copy(), np.full(ids.shape, IGNORE, dtype=ids.dtype)
    picked = rng.random(n_words) < probability
    row_of_word = np.nonzero(start)[0]
    has_pick = np.zeros(ids.shape[0], dtype=bool)
    np.logical_or.at(has_pick, row_of_word, picked)
    for row in np.unique(row_of_word[~has_pick[row_of_word]]):
        picked[rng.choice(np.nonzero(row_of_word == row)[0])] = True
    selected = cand & picked[np.where(cand, word, 0)]
    r = rng.random(ids.shape)
    replace = selected & (r < 0.8)
    randomise = selected & (r >= 0.8) & (r < 0.9)
    allowed = np.nonzero(~vocab.special)[0]
    out = ids.copy()
    out[replace] = vocab.mask_id
    out[randomise] = rng.choice(allowed, size=int(randomise.sum()))
    labels = np.where(selected, ids, IGNORE)
    return out, labels


# ----------------------------------------------------------------------------- model


def _mlm_head(model):
    """The MLM head module of a *ForMaskedLM model (BERT: cls, RoBERTa-style: lm_head)."""
    for name in ("cls", "lm_head"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ParamsError(f"params.yaml: base.model: {type(model).__name__} has no MLM head this stage knows "
                      "(expected a BERT- or RoBERTa-style masked LM)")


def mlm_loss(model, input_ids, attention_mask, labels, reduction: str = "mean"):
    """Cross-entropy over the masked positions only.

    The vocabulary projection (hidden x 30k) costs as much as the whole MiniLM
    body per token; applying it only at the ~15% masked positions, instead of at
    every position as *ForMaskedLM.forward does, makes a step 1.39x faster
    (bench/results/dapt.json).
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return _masked_ce(_mlm_head(model), hidden, labels, reduction)


def _masked_ce(head, hidden, labels, reduction: str = "mean"):
    """Cross-entropy of the MLM head at the masked positions (labels != IGNORE) only."""
    import torch.nn.functional as F

    sel = labels != IGNORE
    return F.cross_entropy(head(hidden[sel]).float(), labels[sel], reduction=reduction)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' loading report at error level only: the keys we know are missing are noise."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def heldout_loss(model, ids: np.ndarray, attn: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> float:
    """Mean MLM loss per masked token on fixed (already masked) held-out blocks (float32, on the model's device)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids), batch_size):
            lab = torch.from_numpy(labels[i:i + batch_size])
            k = int((lab != IGNORE).sum())
            if k == 0:
                continue
            loss = mlm_loss(model, torch.from_numpy(ids[i:i + batch_size]).to(device),
                            torch.from_numpy(attn[i:i + batch_size]).to(device), lab.to(device), reduction="sum")
            total += float(loss)
            n += k
    return total / max(n, 1)


def load_mlm_model(base_path: str, seed: int):
    """The base encoder with an MLM head; returns (model, where the head came from).

    The head is, in order of preference: mlm_head.safetensors next to the base
    weights (a previous DAPT round wrote it), the checkpoint's own MLM head, or a
    fresh one. For a fresh one transformers initialises the missing cls.* weights
    with its BERT init and ties the decoder to the word embeddings; the seed makes
    that init repeatable.
    """
    import torch
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(seed)
    with _quiet_transformers():  # the expected "cls.* MISSING" load report
        model, loading = AutoModelForMaskedLM.from_pretrained(
            base_path, use_safetensors=True, attn_implementation="sdpa", dtype=torch.float32,
            output_loading_info=True)
    prefix = model.base_model_prefix + "."
    head_missing = [k for k in loading["missing_keys"] if not k.startswith(prefix)]
    body_missing = [k for k in loading["missing_keys"] if k.startswith(prefix) and ".pooler." not in k]
    if body_missing:
        raise DataError(base_path, None, None,
                        f"not a usable encoder checkpoint: weights {sorted(body_missing)[:5]} missing")
    head_source = "initialised (the base checkpoint has no MLM head)" if head_missing else "base checkpoint"
    head_file = Path(base_path) / HEAD_FILE
    if head_file.is_file():
        from safetensors.torch import load_file

        head = _mlm_head(model)
        missing, unexpected = head.load_state_dict(load_file(str(head_file)), strict=False)
        if unexpected or set(missing) - set(_TIED_HEAD_KEYS):
            raise DataError(head_file, None, None, "does not match the model's MLM head "
                            f"(missing {sorted(set(missing) - set(_TIED_HEAD_KEYS))}, unexpected {sorted(unexpected)})")
        head_source = str(head_file)
    return model, head_source


# Decoder weight/bias are tied to the word embeddings / predictions.bias, so saving them would duplicate.
_TIED_HEAD_KEYS = ("predictions.decoder.weight", "predictions.decoder.bias", "decoder.weight", "decoder.bias")


def head_state(model) -> dict:
    """The MLM head's own tensors; decoder weight/bias are tied to the embeddings/bias, so left out."""
    head = _mlm_head(model)
    return {k: v.detach().clone().contiguous().cpu() for k, v in head.state_dict().items() if k not in _TIED_HEAD_KEYS}


class MaskedBlocks:
    """Endless shuffled passes over the packed blocks, each global batch freshly masked (dynamic masking).

    Yields this process's share of every global batch of `batch_size` blocks, cut into `micro`
    micro-batches (gradient accumulation). Every process draws the same permutation and mask from
    the same seeded generator, so the processes stay in step. state_dict()/load_state_dict() hold
    the generator and the rest of the current pass: a resumed run sees exactly the same batches.
    """

    def __init__(self, ids: np.ndarray, attn: np.ndarray, vocab: Vocab, probability: float, batch_size: int,
                 rng: np.random.Generator, world: int = 1, rank: int = 0, micro: int = 1):
        self.ids, self.attn, self.vocab, self.probability = ids, attn, vocab, probability
        self.batch_size, self.rng, self.world, self.rank, self.micro = batch_size, rng, world, rank, micro
        self.order = np.empty(0, dtype=np.int64)
        self.tokens = 0  # attended tokens of every global batch drawn so far

    def next_global(self):
        if len(self.order) < self.batch_size:
            self.order = np.concatenate([self.order, self.rng.permutation(len(self.ids))])
        batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        ids, labels = whole_word_mask(self.ids[batch], self.attn[batch], self.vocab, self.probability, self.rng)
        self.tokens += int(self.attn[batch].sum())
        return ids, self.attn[batch], labels

    def __iter__(self):
        import torch

        while True:
            ids, attn, labels = self.next_global()
            for part in np.array_split(np.arange(len(ids)), self.micro):
                mine = part[self.rank::self.world]
                yield {"input_ids": torch.from_numpy(ids[mine]), "attention_mask": torch.from_numpy(attn[mine]),
                       "labels": torch.from_numpy(labels[mine])}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order.tolist(), "tokens": self.tokens}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            self.rng.bit_generator.state = state["rng"]
            self.order = np.asarray(state["order"], dtype=np.int64)
            self.tokens = state["tokens"]


def mlm_objective(model, batch):
    """The engine's loss function for DAPT: MLM cross-entropy at the masked positions of the batch."""
    return mlm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def warm_up_head(model, blocks: MaskedBlocks, params: DaptParams, steps: int, seed: int, device: str) -> float:
    """Fit a freshly initialised MLM head on the frozen base body; returns seconds spent.

    Two reasons. Measurement: a random head makes the base encoder look absurdly
    bad (perplexity ~ vocabulary size), so "before" would mostly measure head
    fitting; after this warm-up it measures the base body. Training: the first
    steps with a random head push large, meaningless gradients into the
    pre-trained body (the linear-probe-then-fine-tune argument). The tied
    decoder (= word embeddings) stays frozen here; only transform + bias train.
    """
    import torch


    if steps <= 0:
        return 0.0
    t0 = time.perf_counter()
    head = _mlm_head(model)
    emb = model.get_input_embeddings().weight
    cfg = EngineConfig(lr=params.head_warmup_lr, total_steps=steps, scheduler="constant",
                       max_grad_norm=params.max_grad_norm, bf16=params.bf16, grad_accum=blocks.micro)
    frozen = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():  # the body (and the tied decoder = embeddings) stays fixed
        p.requires_grad_(False)
    for p in head.parameters():
        if p is not emb:
            p.requires_grad_(True)
    model.eval()  # the body as the before/after measurement sees it: no dropout
    torch.manual_seed(seed)
    try:
        engine = Engine(model, param_groups(model.named_parameters(), params.head_warmup_lr, 0.0), cfg, device=device)
        engine.crash_at = 0  # the crash test hook counts the main training's steps only

        def head_loss(m, batch):
            with torch.no_grad():
                hidden = m.base_model(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).last_hidden_state
            return _masked_ce(head, hidden, batch["labels"])

        engine.fit(head_loss, blocks, progress="dapt MLM-head warm-up")
    finally:
        for p in model.parameters():
            p.requires_grad_(frozen[id(p)])
    return time.perf_counter() - t0


def check_block_size(base_path: str, block_size: int) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_path)
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and block_size > limit:
        raise ParamsError(f"params.yaml: dapt.block_size: {block_size} exceeds the model's "
                          f"max_position_embeddings {limit} ({base_path}); use at most {limit}")


@dataclass
class Prepared:
    """The packed and masked data of one DAPT run."""

    tok: object
    vocab: Vocab
    train_idx: np.ndarray
    held_idx: np.ndarray
    train_ids: np.ndarray
    train_attn: np.ndarray
    held_in: np.ndarray
    held_attn: np.ndarray
    held_labels: np.ndarray


def prepare(corpus: Corpus, base_path: str, params: DaptParams, seed: int) -> Prepared:
    """Tokenise, split off the held-out texts, pack both sides, and mask the held-out blocks once."""
    check_block_size(base_path, params.block_size)
    tok = load_tokenizer(base_path)
    vocab = Vocab.from_tokenizer(tok)
    train_idx, held_idx = split_heldout(len(corpus.texts), params.heldout_fraction, seed)
    # No truncation: packing spreads a long text over several blocks instead of cutting it.
    max_len = tok.model_max_length
    tok.model_max_length = int(1e30)  # silences the "longer than max length" warning for unpacked texts
    try:
        token_lists = tok(corpus.texts, add_special_tokens=False)["input_ids"]
    finally:
        tok.model_max_length = max_len
    train_ids, train_attn = pack_blocks([token_lists[i] for i in train_idx], params.block_size, vocab)
    held_ids, held_attn = pack_blocks([token_lists[i] for i in held_idx], params.block_size, vocab)
    # One fixed mask for the held-out blocks, drawn from its own seeded stream, so
    # the before and after losses score exactly the same predictions.
    held_in, held_labels = whole_word_mask(held_ids, held_attn, vocab, params.mlm_probability,
                                           np.random.default_rng([seed, 1]))
    return Prepared(tok, vocab, train_idx, held_idx, train_ids, train_attn, held_in, held_attn, held_labels)


def adapt(corpus: Corpus, base_path: str, params: DaptParams, seed: int, device: str = "cpu",
          checkpoint_root: Optional[str | Path] = None, progress: bool = True):
    """Continue MLM training of base_path on the corpus on the training engine.

    Returns (mlm model, tokenizer, metrics, info, history); history is the engine's per-step record
    (MLM loss, LR, grad norm, and `heldout_loss` every checkpoint_every steps) that DVCLive draws.
    With checkpoint_root, a resumable checkpoint is written every checkpoint_every steps under
    checkpoint_root/<run key>/ and a re-run after a crash continues from it with identical results.
    """
    import torch


    t_start = time.perf_counter()
    d = prepare(corpus, base_path, params, seed)
    model, head_source = load_mlm_model(base_path, seed)
    model.to(device)
    loss_initial = heldout_loss(model, d.held_in, d.held_attn, d.held_labels)
    world, rank = distributed.world_size(), distributed.rank()
    rng = np.random.default_rng([seed, 2])  # dynamic masking: a fresh mask every time a block is seen
    blocks = MaskedBlocks(d.train_ids, d.train_attn, d.vocab, params.mlm_probability, params.batch_size, rng,
                          world, rank, params.grad_accum)
    head_steps = params.head_warmup_steps if head_source.startswith("initialised") else 0
    head_s = warm_up_head(model, blocks, params, head_steps, seed, device)
    loss_before = heldout_loss(model, d.held_in, d.held_attn, d.held_labels) if head_steps else loss_initial
    blocks.tokens = 0

    n_blocks = len(d.train_ids)
    total_steps = params.epochs * math.ceil(n_blocks / params.batch_size) if params.epochs is not None \
        else params.max_steps
    warmup = math.ceil(params.warmup_ratio * total_steps)
    cfg = EngineConfig(lr=params.lr, total_steps=total_steps, warmup_steps=warmup, max_grad_norm=params.max_grad_norm,
                       grad_accum=params.grad_accum, bf16=params.bf16, checkpoint_every=params.checkpoint_every)
    ckpt = (Path(checkpoint_root) / run_key("dapt", params, base_path, texts=corpus.texts, seed=seed)
            if checkpoint_root is not None else None)
    if ckpt is not None and rank == 0:
        _clear_stale(Path(checkpoint_root), ckpt.name)
    engine = Engine(model, param_groups(model.named_parameters(), params.lr, params.weight_decay), cfg,
                    checkpoint_dir=ckpt, device=device)

    def on_step(rec: dict) -> None:  # held-out perplexity points for the curves
        if params.checkpoint_every and rec["step"] % params.checkpoint_every == 0 and rec["step"] < total_steps:
            rec["heldout_loss"] = heldout_loss(model, d.held_in, d.held_attn, d.held_labels)
            model.train()

    torch.manual_seed(seed)  # dropout
    model.train()
    history = engine.fit(mlm_objective, blocks, on_step=on_step, progress="dapt" if progress else None)
    loss_after = heldout_loss(model, d.held_in, d.held_attn, d.held_labels) if total_steps else loss_before
    metrics = _metrics(d, corpus, engine, blocks, (loss_initial, loss_before, loss_after), head_steps, head_s,
                       time.perf_counter() - t_start)
    losses = [h["loss"] for h in history[-10:]]
    info = {"mlm_head": head_source, "train_loss_last10": round(float(np.mean(losses)), 5) if losses else None,
            "warmup_steps": warmup, "device": device, "bf16": engine.bf16, "processes": world}
    engine.clear_checkpoint()
    return model, d.tok, metrics, info, history


def _clear_stale(root: Path, keep: str) -> None:
    """Checkpoints of other corpora/params/base weights are stale: remove them."""
    import shutil

    if root.is_dir():
        for old in root.iterdir():
            if old.is_dir() and old.name != keep:
                shutil.rmtree(old)


def _metrics(d: Prepared, corpus: Corpus, engine, blocks: MaskedBlocks, losses: tuple, head_steps: int,
             head_s: float, seconds: float) -> dict:
    loss_initial, loss_before, loss_after = losses
    train_s = getattr(engine, "run_seconds", 0.0)
    run_samples = getattr(engine, "run_samples", 0)
    return {
        "enabled": True,
        "loss_fresh_head": round(loss_initial, 5),
        "head_warmup_steps": head_steps,
        "head_warmup_seconds": round(head_s, 2),
        "loss_before": round(loss_before, 5),
        "loss_after": round(loss_after, 5),
        "perplexity_before": round(math.exp(loss_before), 4),
        "perplexity_after": round(math.exp(loss_after), 4),
        "steps": engine.step_count,
        "epochs": round(engine.samples / len(d.train_ids), 3),
        "tokens_seen": blocks.tokens,
        "samples_per_s": round(run_samples / train_s, 2) if train_s > 0 and run_samples else 0.0,
        "train_seconds": round(train_s, 2),
        "seconds": round(seconds, 2),
        "train_texts": int(len(d.train_idx)),
        "heldout_texts": int(len(d.held_idx)),
        "train_blocks": int(len(d.train_ids)),
        "heldout_blocks": int(len(d.held_in)),
        "heldout_masked_tokens": int((d.held_labels != IGNORE).sum()),
        "corpus_texts_used": corpus.counts["used"],
        "corpus_lines_removed": corpus.counts["removed"],
    }


def write_live(live_dir: str | Path, history: list[dict], metrics: dict) -> None:
    """DVCLive curves of a DAPT run: train/mlm_loss, train/lr, train/grad_norm per step, and
    heldout/loss and heldout/perplexity at step 0 (before), every checkpoint_every steps and the end."""
    points = [(0, metrics["loss_before"])] + [(h["step"], h["heldout_loss"]) for h in history if "heldout_loss" in h]
    points.append((metrics["steps"], metrics["loss_after"]))
    write_curves(live_dir, history, {**CURVES, "loss": "train/mlm_loss"},
                 points={"heldout/loss": points, "heldout/perplexity": [(st, math.exp(v)) for st, v in points]},
                 summary={k: metrics[k] for k in ("perplexity_before", "perplexity_after", "steps")})


def save_encoder(model, tokenizer, base_path: str, out_dir: Path, seed: int) -> None:
    """Save the adapted body as a plain encoder (what load_encoder reads), plus the MLM head.

    The body is copied into the base AutoModel so parts MLM training does not use
    (BERT's pooler) keep their base weights instead of being dropped and later
    re-initialised at random by AutoModel.
    """
    import torch
    from safetensors.torch import save_file


    torch.manual_seed(seed)  # a checkpoint without pooler weights gets a repeatable one
    with _quiet_transformers():  # a missing pooler is expected and harmless (nothing downstream uses it)
        encoder = load_encoder(base_path).float()
    missing, unexpected = encoder.load_state_dict(model.base_model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"adapted body does not fit the base encoder: missing {missing}, unexpected {unexpected}")
    encoder.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    save_file(head_state(model), str(out_dir / HEAD_FILE))


_WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", HEAD_FILE)


def pass_through(base_path: str, out_dir: Path) -> str:
    """dapt.enabled: false: the base encoder and tokenizer, weights unchanged. Returns how.

    A local checkpoint is copied byte for byte (config, safetensors shards, and a
    previous round's MLM head); a hub model is loaded and saved.
    """
    import shutil


    src = Path(base_path)
    shards = sorted(src.glob("model-*-of-*.safetensors")) if src.is_dir() else []
    if src.is_dir() and ((src / "model.safetensors").is_file() or shards):
        for f in [src / n for n in _WEIGHT_FILES] + shards:
            if f.is_file():
                shutil.copyfile(f, out_dir / f.name)
        how = "copied"
    else:
        load_encoder(base_path).save_pretrained(out_dir)
        how = "loaded and saved"
    load_tokenizer(base_path).save_pretrained(out_dir)
    return how


