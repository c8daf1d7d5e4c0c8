"""Token-budget batching (modeling.encoders): the one batching of every runner (PyTorch float32/int8, ONNX).

For any mix of lengths, every row is in exactly one batch, a batch holds at most the batch size, and
(longest length) x (rows) stays within the budget except for a lone text longer than the budget; each cut
is forced (the batch was full, or the next text would break the budget), so batches are as large as allowed.
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domaintune.modeling.encoders import TokenBatches, load_tokenizer, token_budget_batches


def check_batches(lengths, batches, max_batch, budget) -> None:
    flat = [int(i) for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    for k, b in enumerate(batches):
        longest = max(lengths[i] for i in b)
        assert 1 <= len(b) <= max_batch
        if budget is not None:
            assert longest * len(b) <= budget or len(b) == 1  # only a lone over-long text passes the budget
        if k + 1 < len(batches):
            nxt = batches[k + 1]
            assert longest <= min(lengths[i] for i in nxt)  # sorted by length: little padding in each batch
            first = lengths[nxt[0]]
            assert len(b) == max_batch or (budget is not None and first * (len(b) + 1) > budget)  # a forced cut


@settings(max_examples=400, deadline=None)
@given(lengths=st.lists(st.integers(1, 600), max_size=300), max_batch=st.integers(1, 80),
       budget=st.one_of(st.none(), st.integers(1, 20_000)))
def test_every_row_once_within_budget_and_batch_size(lengths, max_batch, budget):
    batches = token_budget_batches(lengths, max_batch, budget)
    check_batches(lengths, batches, max_batch, budget)
    if budget is not None:
        for i, n in enumerate(lengths):
            if n > budget:
                assert [len(b) for b in batches if i in b] == [1]


def test_budget_cuts_long_texts_smaller_and_lets_short_ones_fill_the_batch():
    lengths = [8] * 40 + [128] * 40
    sizes = [len(b) for b in token_budget_batches(lengths, 64, 1024)]
    assert sizes == [40, 8, 8, 8, 8, 8]  # 40 x 8 tokens together; 128-token texts 8 at a time (8 x 128 = 1024)
    assert [len(b) for b in token_budget_batches(lengths, 64, None)] == [64, 16]  # by count alone


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(alphabet="ab cdé🙂.,", max_size=120), max_size=30), max_batch=st.integers(1, 9),
       budget=st.integers(1, 120))
def test_token_batches_pad_as_the_tokenizer_and_respect_the_budget_in_tokens(tiny_bert, texts, max_batch, budget):
    tok = load_tokenizer(str(tiny_bert))
    tb = TokenBatches(tok, texts, 24, max_batch, budget)
    check_batches(tb.lengths, tb.batches, max_batch, budget)
    for idx, enc in tb:
        ref = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=24, return_tensors="np")
        assert set(enc) == set(ref)
        for key in ref:
            assert enc[key].dtype == np.int64 and np.array_equal(enc[key], ref[key]), key
        assert enc["input_ids"].shape[0] * enc["input_ids"].shape[1] <= budget or len(idx) == 1
