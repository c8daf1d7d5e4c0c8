"""The vectorised normaliser (textnorm.normalise_arrow, what dedupe runs) against the reference
per-row normalise(): the same normal form for every row, whichever path the row takes."""
from __future__ import annotations

import csv
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domaintune.data import textnorm as tn
from domaintune.data.textnorm import normalise, normalise_arrow, text_keys

REPO = Path(__file__).resolve().parents[2]
# Characters that each exercise one rule: case folding beyond lower(), ligatures and other compatibility
# forms, fullwidth letters, combining marks (composing and not), Hangul jamo that compose, odd whitespace,
# final sigma, Cherokee (casefold goes to upper case), dotted I, astral characters.
TRICKY = ("ßẞſςΣσﬁﬂﬀﬃĳǅǄµ½²ªºªｆｕｌｌＷＩＤＴＨ０９ＡＺé" "e\u0301" "\u0301\u0308\u0327\u0345ÅÅ" "ǰİıK"
          "\u1100\u1161\u11a8가각\u3131" "\u00a0\u2002\u2003\u3000\u202f\u205f\u1680\u2028\u2029\u0085\x1c\x1d\x1e\x1f"
          "\t\n\r\x0b\x0c  " "ᏸᏰꭰᎠ" "ﷺ" "😀𝐀𝔘\U0001d15e" "Ωω\u2126KÅ" "ﾊﾟ" "ʰʲ㎏㏂⑴" "\u0345\u0399"
          "abcXYZ019 .,;-")
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(texts: list[str]) -> None:
    assert normalise_arrow(pa.array(texts, type=pa.string())).to_pylist() == [normalise(t) for t in texts]


@SETTINGS
@given(st.lists(st.text(alphabet=st.sampled_from(TRICKY), max_size=30), max_size=40))
def test_tricky_characters_normalise_as_the_reference(texts):
    _check(texts)


@SETTINGS
@given(st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=25), max_size=30))
def test_any_unicode_normalises_as_the_reference(texts):
    _check(texts)


@SETTINGS
@given(st.lists(st.text(alphabet=st.sampled_from(TRICKY), max_size=30), min_size=1, max_size=40))
def test_the_replacement_pass_and_the_python_way_agree(texts):
    # Every compatibility character replaced by Arrow (share 0), or none (share above 1: the Python way).
    for share in (0.0, 2.0):
        old = tn._REPLACE_SHARE, tn._REPLACE_PASSES
        tn._REPLACE_SHARE, tn._REPLACE_PASSES = share, 10_000
        try:
            _check(texts)
        finally:
            tn._REPLACE_SHARE, tn._REPLACE_PASSES = old


def test_every_bmp_character_alone_and_between_others():
    chars = [chr(cp) for cp in range(0x10000) if not 0xD800 <= cp <= 0xDFFF]
    for context in ("{}", "A{}b", "e{}\u0301", "\u1100{}\u1161", " {} ", "ß{}ﬁ", "{}{}"):
        _check([context.format(c, c) for c in chars])


def test_the_example_data_and_its_variants():
    with open(REPO / "examples" / "support_tickets" / "labelled.csv", newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    assert len(texts) > 100
    variants = [t.upper() for t in texts] + ["  " + t.replace(" ", "\u00a0\t ") + "\u3000" for t in texts]
    variants += [unicodedata.normalize("NFD", t) for t in texts] + ["".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z"
                                                                          else c for c in t) for t in texts]
    _check(texts + variants)


def test_keys_follow_the_normal_form():
    texts = ["Straße  ﬁle", "STRASSE file", "strasse file ", "ｓｔｒａｓｓｅ\u00a0file", "strasse  filé", "a", "A", ""]
    keys = text_keys(pa.array(texts))
    assert keys.shape == (len(texts), 2) and keys.dtype == np.uint64
    same = [[bool((keys[i] == keys[j]).all()) for j in range(len(texts))] for i in range(len(texts))]
    assert same == [[normalise(a) == normalise(b) for b in texts] for a in texts]


@pytest.mark.parametrize("arr", [pa.array([], type=pa.string()), pa.chunked_array([["Ab", "ß"], ["ﬁ x"]]),
                                 pa.array(["x", "Yy  z", "ﬁ"]).slice(1)])
def test_empty_chunked_and_sliced_arrays(arr):
    got = normalise_arrow(arr).to_pylist()
    want = [normalise(t) for t in (arr.to_pylist())]
    assert got == want
