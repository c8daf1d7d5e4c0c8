"""modeling/chunks.py: long documents cut into model inputs (truncate, head_tail, chunks) and pooled back."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domaintune.core.errors import ParamsError
from domaintune.core.params import BaseParams
from domaintune.modeling import chunks as C


@pytest.fixture(scope="module")
def tok():
    from domaintune.modeling.encoders import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("minilm"))


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 2000), width=st.integers(1, 200), data=st.data())
def test_windows_cover_every_token_once_except_overlaps(n, width, data):
    overlap = data.draw(st.integers(0, width // 2))
    max_chunks = data.draw(st.integers(1, 40))
    spans, dropped = C.windows(n, width, overlap, max_chunks)
    assert 1 <= len(spans) <= max_chunks and spans[0][0] == 0
    assert all(0 < b - a <= width or (n == 0 and a == b == 0) for a, b in spans)
    cover = np.zeros(n, dtype=int)
    for a, b in spans:
        cover[a:b] += 1
    read = spans[-1][1]
    assert dropped == n - read and (dropped == 0 or len(spans) == max_chunks)
    assert (cover[read:] == 0).all()  # only past max_chunks is anything unread, and it is counted
    # every read token exactly once, except the `overlap` tokens neighbouring windows share (exactly twice)
    twice = set()
    for (_, b1), (a2, _) in zip(spans, spans[1:]):
        assert b1 - a2 == overlap  # neighbours share exactly `overlap` tokens
        twice |= set(range(a2, b1))
    expected = np.ones(read, dtype=int)
    expected[sorted(twice)] = 2
    assert (cover[:read] == expected).all()


@settings(max_examples=40, deadline=None)
@given(words=st.lists(st.sampled_from(["refund", "card", "the", "12", "naïve", "😀", "x", "password", "re-set"]),
                      min_size=0, max_size=120),
       overlap=st.integers(0, 10), max_chunks=st.integers(1, 30))
def test_chunk_inputs_hold_the_documents_tokens_in_order(tok, words, overlap, max_chunks):
    """Dropping each window's special tokens and its overlap with the one before gives back the document's
    tokens (up to the counted rest); every input is at most max_length tokens, special tokens included."""
    text = " ".join(words)
    lt = C.LongText("chunks", overlap, max_chunks)
    enc = C.encode(tok, [text, "short one"], 24, lt)
    prefix, suffix = C.special_tokens(tok)
    full = tok(text, add_special_tokens=False)["input_ids"]
    rows = [ids for ids, d in zip(enc.inputs["input_ids"], enc.doc) if d == 0]
    assert all(len(r) <= 24 and r[:len(prefix)] == prefix and r[len(r) - len(suffix):] == suffix for r in rows)
    content = [r[len(prefix):len(r) - len(suffix)] for r in rows]
    rebuilt = content[0] + [t for c in content[1:] for t in c[overlap:]]
    assert rebuilt == full[:len(rebuilt)] and enc.dropped[0] == len(full) - len(rebuilt)
    assert enc.tokens[0] == len(full) and list(enc.doc) == sorted(enc.doc)
    assert all(len(x) == len(y) for x, y in zip(enc.inputs["attention_mask"], enc.inputs["input_ids"]))


def test_a_short_document_gets_the_input_truncate_gives_it(tok):
    texts = ["my card was charged twice", "", "reset my password"]
    trunc = C.encode(tok, texts, 32)
    for mode in ("chunks", "head_tail"):
        enc = C.encode(tok, texts, 32, C.LongText(mode, overlap=8))
        assert list(enc.doc) == [0, 1, 2]
        for key in trunc.inputs:
            assert enc.inputs[key] == trunc.inputs[key], (mode, key)


def test_head_tail_keeps_the_first_and_the_last_tokens(tok):
    words = [f"w{i}" for i in range(200)]
    text = " ".join(words)
    full = tok(text, add_special_tokens=False)["input_ids"]
    enc = C.encode(tok, [text], 64, C.LongText("head_tail"))
    (ids,) = enc.inputs["input_ids"]
    prefix, suffix = C.special_tokens(tok)
    width = 64 - len(prefix) - len(suffix)
    head, tail = C.head_tail(len(full), width)
    assert len(ids) == 64 and head == round(width * C.HEAD_SHARE) and head + tail == width
    assert ids == prefix + full[:head] + full[len(full) - tail:] + suffix
    assert ids[len(prefix)] == full[0] and ids[-len(suffix) - 1] == full[-1]  # first and last token read
    assert enc.dropped[0] == len(full) - width
    assert C.encode(tok, [text], 64).inputs["input_ids"][0] == prefix + full[:width] + suffix  # truncate: the head


def test_max_chunks_counts_what_is_not_read(tok):
    text = " ".join(["card"] * 300)  # 300 tokens
    enc = C.encode(tok, [text], 22, C.LongText("chunks", overlap=4, max_chunks=3))  # 20 content tokens, step 16
    assert len(enc.doc) == 3 and enc.dropped[0] == 300 - (20 + 2 * 16)
    assert C.tokens_read(tok, 22, C.LongText("chunks", overlap=4, max_chunks=3)) == 52
    assert C.tokens_read(tok, 22) == 20


def test_an_overlap_over_half_a_window_is_refused():
    assert C.windows(10, 6, 3, 16)[0] == [(0, 6), (3, 9), (6, 10)]
    with pytest.raises(ValueError, match="three windows"):
        C.windows(10, 6, 4, 16)


def test_pooling_of_chunk_logits():
    z = np.array([[0.0, 1.0], [2.0, -1.0], [5.0, 5.0], [1.0, 3.0]], dtype=np.float32)
    doc = np.array([0, 0, 1, 2])
    np.testing.assert_allclose(C.pool_logits(z, doc, 3, "mean"), [[1.0, 0.0], [5, 5], [1, 3]])
    np.testing.assert_allclose(C.pool_logits(z, doc, 3, "max"), [[2.0, 1.0], [5, 5], [1, 3]])
    lse = np.log(np.exp(z[:2]).mean(0))
    np.testing.assert_allclose(C.pool_logits(z, doc, 3, "logsumexp"), [lse, [5, 5], [1, 3]], rtol=1e-6)
    # the mean dilutes one confident chunk among neutral ones; max and logsumexp keep it on top
    z = np.array([[0.0, 0.0, 0.0]] * 5 + [[0.0, 0.0, 4.0]] + [[1.0, 0.0, 0.0]] * 5, dtype=np.float32)
    doc = np.zeros(len(z), dtype=int)
    assert C.pool_logits(z, doc, 1, "mean").argmax() == 0
    assert C.pool_logits(z, doc, 1, "max").argmax() == 2 and C.pool_logits(z, doc, 1, "logsumexp").argmax() == 2


def test_choose_pooling_breaks_ties_to_the_mean():
    assert C.choose_pooling(lambda p: 0.5)[0] == "mean"
    best, scores = C.choose_pooling({"mean": 0.5, "logsumexp": 0.5, "max": 0.7}.get)
    assert best == "max" and scores == {"mean": 0.5, "logsumexp": 0.5, "max": 0.7}


def test_length_stats(tok):
    texts = ["one two", " ".join(["card"] * 100), " ".join(["card"] * 40)]
    s = C.length_stats(tok, [texts[:1], texts[1:]], 32)
    assert s["texts"] == 3 and s["max"] == 100 and s["p50"] == 40.0
    assert s["share_over_max_length"] == pytest.approx(2 / 3)  # 100 and 40 > 30 content tokens


@pytest.mark.parametrize("kw, words", [({"long_text": "split"}, "base.long_text"),
                                       ({"long_text": "chunks", "chunk_overlap": 63}, "base.chunk_overlap"),
                                       ({"chunk_overlap": -1}, "base.chunk_overlap"),
                                       ({"max_chunks": 0}, "base.max_chunks")])
def test_long_text_params_are_validated(kw, words):
    with pytest.raises(ParamsError, match=words):
        BaseParams(**kw)
    assert BaseParams().long_text == "truncate"  # the default reads texts as before
    assert BaseParams(long_text="chunks", chunk_overlap=62).chunk_overlap == 62
    assert BaseParams(max_length=32).chunk_overlap == 32  # unused unless chunks: a small max_length still loads
