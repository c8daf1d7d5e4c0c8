"""Token-tagger fine-tuning (domaintune/train/tokens.py) on the tiny random BERT: what the run trains on (exactly
the first sub-word of each word labelled, later pre-tokenizer pieces of a word ignored, as transformers' run_ner)
and how validation reads words that max_length cut off (O, as evaluation and the export gates read them)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from domaintune.core.params import BaseParams, FinetuneParams
from domaintune.data.tokens import IGNORE, encode_row
from domaintune.train.tokens import TokenRun

NAMES = ["B-order", "B-user", "I-order", "I-user", "O"]
# words the BERT pre-tokenizer cuts into pieces: INV / - / 12345, @ / user / _ / 1, don / ' / t, a URL
WORDS = [["Order", "INV-12345", "from", "@user_1", "don't", "http://bit.ly/x1"],
         ["Refund", "INV-9", "please"]]
TAGS = [["O", "B-order", "O", "B-user", "O", "O"], ["O", "B-order", "O"]]


def _df(words, tags) -> pd.DataFrame:
    rows = [encode_row(w, t) for w, t in zip(words, tags)]
    return pd.DataFrame({"text": [r[0] for r in rows], "label": [r[1] for r in rows]})


def _run(tiny_bert, val_words, val_tags, max_length: int = 128) -> TokenRun:
    base = BaseParams(model=str(tiny_bert), max_length=max_length, task="token_classification", device="cpu")
    ft = dataclasses.replace(FinetuneParams(), epochs=1, batch_size=2, checkpoint_every=0)
    return TokenRun(_df(WORDS, TAGS), _df(val_words, val_tags), NAMES, str(tiny_bert), base, ft, seed=0)


def test_training_labels_exactly_the_first_sub_word_of_each_word(tiny_bert):
    run = _run(tiny_bert, WORDS[:1], TAGS[:1])
    for words, tags, ids, labels in zip(WORDS, TAGS, run.ids, run.token_labels):
        enc = run.tokenizer(words, is_split_into_words=True)
        assert ids == enc["input_ids"]
        first = {}
        for i, w in enumerate(enc.word_ids()):
            if w is not None:
                first.setdefault(w, i)
        assert len(enc["input_ids"]) > len(words) + 4  # the words really are cut into several pieces
        assert [i for i, lab in enumerate(labels) if lab != IGNORE] == sorted(first.values())
        assert [NAMES[labels[first[w]]] for w in range(len(words))] == tags


def test_validation_reads_a_word_cut_off_by_max_length_as_o(tiny_bert):
    import torch

    long = ["word"] * 20  # [CLS] + 20 words + [SEP] > max_length 8: 14 words get no logits
    run = _run(tiny_bert, [long], [["O"] * 20], max_length=8)
    with torch.no_grad():  # a head that says O for every word it sees
        run.model.head.weight.zero_()
        run.model.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    kept = run.predict_val().kept[0]
    assert 0 < kept.sum() < len(long)
    assert run.validate()["val_token_accuracy"] == pytest.approx(1.0)
    assert np.isfinite(run.validate()["val_entity_f1"])
