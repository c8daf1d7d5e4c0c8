"""Train-only augmentation: EDA operations and back-translation, seeded, every row traceable to its source.

EDA (Wei & Zou 2019, "Easy Data Augmentation"): random swap, random insertion (a synonym of a word of the
text, put at a random position), random deletion and synonym replacement; each rate is the share of a
text's words the operation changes (at least one word). finetune.augment.copies new rows per train row,
copy c applies the enabled operations in turn (c = 0 the first, c = 1 the second, ...), so every operation
is used equally. Synonyms come from a local word list (one line per word: `word syn1 syn2 ...`, commas
allowed, `#` comments) or from WordNet when nltk's wordnet data is installed (`synonyms: wordnet`).

Back-translation: with two local translation model folders [forward, backward] (e.g. Marian en->de and
de->en), every train text is translated there and back (greedy decoding) into one more row.

Each row's randomness comes from (seed, source id, copy), so a row's augmentations do not depend on the
order or number of the other rows, and a given seed always gives the same rows. Validation and test are
never augmented: the caller passes the train split only. The rows go to the finetune stage's extra-rows
file (tasks/classification/finetune.py), each with its source id and the operation that made it.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from domaintune.core.errors import DataError, ParamsError

log = logging.getLogger("domaintune.augment")

EDA_OPS = ("swap", "insert", "delete", "synonym")
EXTRA_COLUMNS = ("id", "text", "label", "source_id", "origin")


def row_rng(seed: int, source_id: str, copy: int) -> np.random.Generator:
    """The generator of one augmented row: fixed by (seed, source id, copy) alone."""
    digest = hashlib.sha256(f"{seed}\0{source_id}\0{copy}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def read_word_list(path: str | Path) -> dict[str, list[str]]:
    """`word syn1 syn2 ...` per line (commas and spaces separate; # starts a comment) -> {word: synonyms}."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params.yaml: finetune.augment.synonyms: {path}: no such word-list file")
    table: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        words = [w for w in re.split(r"[,\s]+", line.split("#", 1)[0].strip().lower()) if w]
        if not words:
            continue
        if len(words) < 2:
            raise DataError(str(path), n, "synonyms", f"{words[0]!r} has no synonyms (a line is: word syn1 syn2 ...)")
        table.setdefault(words[0], [])
        table[words[0]] += [w for w in words[1:] if w != words[0] and w not in table[words[0]]]
    return table


def wordnet_synonyms() -> Callable[[str], list[str]]:
    """Synonyms from nltk's WordNet; a ParamsError when its data is not installed (nothing is downloaded)."""
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError:
        raise ParamsError("params.yaml: finetune.augment.synonyms: wordnet needs nltk's wordnet data "
                          "(python -m nltk.downloader wordnet); or name a local word-list file") from None

    def lookup(word: str) -> list[str]:
        names = {lemma.name().replace("_", " ").lower() for s in wordnet.synsets(word) for lemma in s.lemmas()}
        names.discard(word)
        return sorted(names)
    return lookup


def synonym_source(spec: str) -> Callable[[str], list[str]] | None:
    if not spec:
        return None
    if spec == "wordnet":
        return wordnet_synonyms()
    table = read_word_list(spec)
    return lambda w: table.get(w.lower(), [])


def _count(rate: float, n: int) -> int:
    return max(1, int(round(rate * n)))


def eda(text: str, op: str, rate: float, rng: np.random.Generator,
        synonyms: Callable[[str], list[str]] | None) -> str:
    """One EDA operation on `text` (whitespace words). May return the text unchanged (e.g. no word has a
    synonym); the caller drops those."""
    words = text.split()
    if not words:
        return text
    n = _count(rate, len(words))
    if op == "swap":
        for _ in range(n if len(words) > 1 else 0):
            i, j = rng.choice(len(words), 2, replace=False)
            words[i], words[j] = words[j], words[i]
    elif op == "delete":
        if len(words) > 1:
            keep = rng.random(len(words)) >= rate
            if not keep.any():
                keep[rng.integers(len(words))] = True
            words = [w for w, k in zip(words, keep) if k]
    elif op == "synonym":
        order = rng.permutation(len(words))
        done = 0
        for i in order:
            options = synonyms(words[i]) if synonyms else []
            if options:
                words[i] = options[int(rng.integers(len(options)))]
                done += 1
                if done >= n:
                    break
    elif op == "insert":
        for _ in range(n):
            candidates = [w for w in words if synonyms and synonyms(w)]
            if not candidates:
                break
            options = synonyms(candidates[int(rng.integers(len(candidates)))])
            words.insert(int(rng.integers(len(words) + 1)), options[int(rng.integers(len(options)))])
    else:
        raise ValueError(f"unknown EDA operation {op!r}")
    return " ".join(words)


def back_translate(texts: Sequence[str], forward: str, backward: str, max_length: int = 128,
                   batch_size: int = 16) -> list[str]:
    """texts -> forward model -> backward model (greedy), with two local seq2seq folders (safetensors only)."""
    for folder in (forward, backward):
        if not Path(folder).is_dir():
            raise ParamsError(f"params.yaml: finetune.augment.back_translation: {folder}: no such model folder "
                              "(local translation models only)")
    return _translate(_translate(list(texts), forward, max_length, batch_size), backward, max_length, batch_size)


def _translate(texts: list[str], folder: str, max_length: int, batch_size: int) -> list[str]:
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, use_safetensors=True).eval()
    out: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length)
            gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=max_length, num_beams=1, do_sample=False)
            out += [t.strip() for t in tok.batch_decode(gen, skip_special_tokens=True)]
    return out


def augment_rows(train: pd.DataFrame, aug: dict, seed: int, max_length: int = 128) -> pd.DataFrame:
    """New rows from the train split (columns EXTRA_COLUMNS): `copies` EDA rows per train row, plus one
    back-translated row per train row with back_translation models. Unchanged or empty results are dropped
    (a text that is its own source teaches nothing new). Ids are "<source id>#aug<k>"."""
    cols = list(EXTRA_COLUMNS)
    if not aug.get("copies") and not aug.get("back_translation"):
        return pd.DataFrame(columns=cols)
    ops = [op for op in EDA_OPS if aug.get(op, 0) > 0]
    synonyms = synonym_source(aug.get("synonyms", "")) if {"insert", "synonym"} & set(ops) else None
    ids, texts, labels = (train[c].astype(str).tolist() for c in ("id", "text", "label"))
    rows = []
    for sid, text, label in zip(ids, texts, labels):
        for c in range(aug.get("copies", 0) if ops else 0):
            op = ops[c % len(ops)]
            new = eda(text, op, float(aug[op]), row_rng(seed, sid, c), synonyms)
            if new.strip() and new != text:
                rows.append((f"{sid}#aug{c}", new, label, sid, f"eda:{op}"))
    bt = aug.get("back_translation") or []
    if bt:
        k = aug.get("copies", 0)
        for sid, text, label, new in zip(ids, texts, labels, back_translate(texts, bt[0], bt[1], max_length)):
            if new.strip() and new != text:
                rows.append((f"{sid}#aug{k}", new, label, sid, "back_translation"))
    log.info("augmentation: %d new rows from %d train rows (%s)", len(rows), len(train),
             ", ".join(ops + (["back_translation"] if bt else [])))
    return pd.DataFrame(rows, columns=cols)
