"""The token tagger (base.task token_classification): an encoder with a per-token linear head.

Training holds it as `TokenTagger` (encoder + dropout + head, the attribute names the classifier's finetune
methods act on: full, freeze, lora, head). It is saved as a standard transformers token-classification folder
(AutoModelForTokenClassification: config with id2label/label2id, model.safetensors, the tokenizer) plus
tagger.json (domaintune's record: tags, max_length, method, validation), so
`transformers.pipeline("token-classification", model=folder)` loads it with no domaintune code.

Words and sub-words: a word's prediction is its first sub-word's logits (training labels only that one;
data/tokens.align_labels). `word_logits` runs either words (is_split_into_words, for gold data) or raw texts
(the tokenizer's own pre-tokenizer finds the words, as the pipeline does) and returns per-word logits and
character offsets; words cut off by max_length get no logits (their row of `kept` is False).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from domaintune.core.errors import DataError
from domaintune.core.io import read_json, write_json
from domaintune.data.tokens import first_subwords
from domaintune.modeling.encoders import (
    MODEL_WEIGHTS,
    check_safetensors,
    load_encoder,
    load_tokenizer,
    token_budget_batches,
)

TAGGER_META = "tagger.json"


def _module():
    from torch import nn

    class TokenTagger(nn.Module):
        """encoder -> dropout -> head (Linear hidden -> tags), per token."""

        def __init__(self, encoder, num_labels: int, dropout: float = 0.1):
            super().__init__()
            self.encoder = encoder
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(encoder.config.hidden_size, num_labels)

        def forward(self, input_ids, attention_mask, **_):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.head(self.dropout(hidden))

    return TokenTagger


def build_tagger(encoder_dir: str, num_labels: int, dropout: float = 0.1):
    """(TokenTagger over the encoder in encoder_dir in float32, its tokenizer)."""
    tok = load_tokenizer(encoder_dir)
    if not getattr(tok, "is_fast", False):
        raise DataError(encoder_dir, None, None, "token_classification needs a fast tokenizer (word ids per token)")
    return _module()(load_encoder(encoder_dir).float(), num_labels, dropout), tok


def to_token_classification(tagger, tags: Sequence[str]):
    """The trained TokenTagger as AutoModelForTokenClassification (LoRA merged in), weights copied exactly."""
    import torch
    from transformers import AutoModelForTokenClassification

    enc = tagger.encoder
    if hasattr(enc, "merge_and_unload"):
        enc = enc.merge_and_unload()
    cfg = enc.config.__class__.from_dict(enc.config.to_dict())
    cfg.num_labels = len(tags)
    cfg.id2label = {i: t for i, t in enumerate(tags)}
    cfg.label2id = {t: i for i, t in enumerate(tags)}
    cfg.architectures = None
    model = AutoModelForTokenClassification.from_config(cfg)
    with torch.no_grad():
        missing, _ = model.base_model.load_state_dict(enc.state_dict(), strict=False)
        if missing:
            raise RuntimeError(f"token-classification body lacks weights {missing[:5]} of the encoder")
        model.classifier.load_state_dict(tagger.head.state_dict())
    return model.eval()


def save_tagger(model, tokenizer, out_dir: str | os.PathLike, meta: dict) -> None:
    """A transformers token-classification folder (safetensors) plus tagger.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_json(out / TAGGER_META, meta)


def load_tagger(folder: str | os.PathLike):
    """(AutoModelForTokenClassification, tokenizer, tagger.json) of a saved tagger; safetensors only."""
    from transformers import AutoModelForTokenClassification

    folder = Path(folder)
    if not (folder / TAGGER_META).is_file():
        raise DataError(folder, None, None, f"no {TAGGER_META}: not a token-classification model folder")
    check_safetensors(folder, MODEL_WEIGHTS, "write it with the finetune stage (base.task token_classification)")
    model = AutoModelForTokenClassification.from_pretrained(folder, use_safetensors=True).eval()
    return model, load_tokenizer(str(folder)), read_json(folder / TAGGER_META)


@dataclass
class WordLogits:
    logits: list   # per row: float32 [words, tags] (rows of cut-off words are 0)
    kept: list     # per row: bool [words], False where max_length cut the word off
    offsets: list  # per row: [(start, end)] character offsets of each word


def _encode(tokenizer, rows, words: bool, max_length: int) -> dict:
    if words:
        return tokenizer(list(rows), is_split_into_words=True, truncation=True, max_length=max_length)
    return tokenizer(list(rows), truncation=True, max_length=max_length, return_offsets_mapping=True)


def word_logits(run, tokenizer, rows: Sequence, num_labels: int, max_length: int, batch_size: int = 64,
                words: bool = True, max_batch_tokens: int | None = None) -> WordLogits:
    """Per-word logits of `rows` (lists of words, or raw texts with words=False) from `run`, a callable
    (input_ids, attention_mask as int64 numpy arrays) -> token logits [batch, tokens, tags] as numpy."""
    rows = list(rows)
    out = WordLogits([], [], [])
    if not rows:
        return out
    enc = _encode(tokenizer, rows, words, max_length)
    pad = tokenizer.pad_token_id or 0
    ids = enc["input_ids"]
    word_ids = [enc.word_ids(i) for i in range(len(rows))]
    token_logits: list = [None] * len(rows)
    for idx in token_budget_batches([len(x) for x in ids], batch_size, max_batch_tokens):
        width = max(len(ids[i]) for i in idx)
        input_ids = np.full((len(idx), width), pad, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for j, i in enumerate(idx):
            input_ids[j, :len(ids[i])] = ids[i]
            mask[j, :len(ids[i])] = 1
        logits = run(input_ids, mask)
        for j, i in enumerate(idx):
            token_logits[i] = logits[j, :len(ids[i])]
    for i, row in enumerate(rows):
        wid = word_ids[i]
        if words:
            n = len(row)
            offsets = []
            pos = 0
            for w in row:
                offsets.append((pos, pos + len(w)))
                pos += len(w) + 1
        else:
            n = max((w for w in wid if w is not None), default=-1) + 1
            offsets = _word_offsets(wid, enc["offset_mapping"][i], n, row)
            n = len(offsets)
        first = first_subwords(wid, n)
        kept = first >= 0
        lg = np.zeros((n, num_labels), dtype=np.float32)
        lg[kept] = token_logits[i][first[kept]]
        out.logits.append(lg)
        out.kept.append(kept)
        out.offsets.append(offsets)
    return out


def predicted_tags(wl: WordLogits, names: Sequence[str]) -> list[list[str]]:
    """Each word's argmax tag; a word cut off by max_length is O (its logits row is zeros, whose argmax would
    be tag 0). Validation, evaluation, the export gates and the bench all read tags this way."""
    o = list(names).index("O")
    return [[names[k] if keep else names[o] for k, keep in zip(lg.argmax(1), kept)]
            for lg, kept in zip(wl.logits, wl.kept)]


def _word_offsets(word_ids, offsets, n: int, text: str) -> list[tuple[int, int]]:
    """Character offsets of each pre-tokenizer word of a raw text (first sub-word start, last sub-word end)."""
    spans: list = [None] * n
    for w, (s, e) in zip(word_ids, offsets):
        if w is None:
            continue
        if spans[w] is None:
            spans[w] = [s, e]
        else:
            spans[w][1] = e
    return [tuple(x) if x is not None else (len(text), len(text)) for x in spans]


def torch_runner(model, device: str = "cpu"):
    """A word_logits `run` over a torch token-classification model (HF or TokenTagger)."""
    import torch

    def run(input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(input_ids).to(device),
                        attention_mask=torch.from_numpy(mask).to(device))
        logits = out.logits if hasattr(out, "logits") else out
        return logits.float().cpu().numpy()
    return run
