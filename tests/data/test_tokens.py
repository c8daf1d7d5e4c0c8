"""Tagged sentences (base.task token_classification): the three readers, IOB1 conversion, every alignment error as
one line (file, row, field; exit 2) or a rejected.csv row, and first-sub-word labelling round-tripping word tags."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from domaintune.core.errors import DataError
from domaintune.core.params import IngestParams
from domaintune.data.tagged import ingest_tokens, read_conll
from domaintune.data.tokens import (
    IGNORE,
    align_labels,
    decode_label,
    entities,
    entity_scores,
    first_subwords,
    lenient_entities,
)
from domaintune.train.tokens import encode_words
from stages.ingest import main as ingest_main

SENTS = [(["Order", "INV-1", "from", "Acme", "Corp", "arrived"], ["O", "B-order", "O", "B-org", "I-org", "O"]),
         (["Maria", "called", "on", "3", "May"], ["B-person", "O", "O", "B-date", "I-date"]),
         (["Nothing", "here"], ["O", "O"])] * 8


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _word_rows(extra=()):
    rows = [{"tokens": w, "tags": t} for w, t in SENTS]
    return rows + list(extra)


def _params(tmp_path: Path, **ingest) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"base": {"task": "token_classification"}, "ingest": {"feedback": None, **ingest}}))
    return p


def test_word_level_jsonl_round_trips_words_tags_and_offsets(tmp_path):
    src = _jsonl(tmp_path / "tagged.jsonl", _word_rows())
    r = ingest_tokens(str(src), IngestParams(feedback=None), 42)
    assert sum(r.metrics["rows"].values()) == len(SENTS) and r.metrics["tag_scheme"] == "IOB2"
    assert r.tags == ["B-date", "B-order", "B-org", "B-person", "I-date", "I-org", "O"]
    row = pd.concat(r.tables.values()).iloc[0]
    offsets, tags = decode_label(row["label"])
    words = [row["text"][a:b] for a, b in offsets]
    assert (words, tags) in SENTS
    assert r.metrics["entities"]["train"]  # per split, per type


def test_conll_reader_skips_docstart_and_takes_the_last_column(tmp_path):
    f = tmp_path / "train.conll"
    f.write_text("-DOCSTART- -X- O O\n\nEU NNP B-ORG\nrejects VBZ O\n\t\nPeter NNP B-PER\nBlackburn NNP I-PER\n")
    s = read_conll(f)
    assert [(x.words, x.tags) for x in s] == [(["EU", "rejects"], ["B-ORG", "O"]),
                                              (["Peter", "Blackburn"], ["B-PER", "I-PER"])]


def test_a_folder_of_conll_split_files_keeps_its_splits_and_skips_its_readme(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    block = "\n\n".join("\n".join(f"{w}\t{t}" for w, t in zip(*s)) for s in SENTS[:6])
    for name in ("train.conll", "dev.conll", "test.conll"):
        (src / name).write_text(block + "\n")
    (src / "README.md").write_text("about the data")
    r = ingest_tokens(str(src), IngestParams(feedback=None), 42)
    assert r.metrics["split_source"] == "files" and r.metrics["rows"] == {"train": 6, "validation": 6, "test": 6}


def test_span_jsonl_cuts_words_at_span_edges(tmp_path):
    rows = [{"text": "Order INV-1 for AcmeCorp, 3 May.", "spans": [
        {"start": 6, "end": 11, "label": "order"}, {"start": 16, "end": 20, "label": "org"},
        {"start": 26, "end": 31, "label": "date"}]}] * 20
    r = ingest_tokens(str(_jsonl(tmp_path / "s.jsonl", rows)), IngestParams(feedback=None, spans_column="spans"), 1)
    row = pd.concat(r.tables.values()).iloc[0]
    off, tags = decode_label(row["label"])
    text = row["text"]
    assert text == rows[0]["text"]  # the text as written
    got = [(text[off[a][0]:off[b - 1][1]], t) for t, a, b in entities(tags)]
    assert got == [("INV-1", "order"), ("Acme", "org"), ("3 May", "date")]


def test_iob1_source_is_converted_with_a_note(tmp_path, caplog):
    rows = [{"tokens": ["Acme", "Corp", "and", "Maria"], "tags": ["I-org", "I-org", "O", "I-person"]},
            {"tokens": ["Bo", "Li", "met"], "tags": ["I-person", "B-person", "O"]}] * 10
    r = ingest_tokens(str(_jsonl(tmp_path / "iob1.jsonl", rows)), IngestParams(feedback=None), 1)
    assert r.metrics["tag_scheme"].startswith("IOB1") and "IOB1" in caplog.text
    seqs = [decode_label(x)[1] for t in r.tables.values() for x in t["label"]]
    assert ["B-org", "I-org", "O", "B-person"] in seqs and ["B-person", "B-person", "O"] in seqs


BAD = [
    ({"tokens": ["a", "b"], "tags": ["O"]}, {}, "field 'tags': 1 tags for 2 words"),
    ({"tokens": ["a", "b"], "tags": ["O", "I-org"]}, {}, "field 'tags': word 2 ('b') has tag I-org with no opening B-org"),
    ({"tokens": ["a", "b"], "tags": ["O", "X-org"]}, {}, "field 'tags': word 2 ('b') has tag 'X-org'"),
    ({"tokens": ["a", ""], "tags": ["O", "O"]}, {}, "field 'tokens': word 2 is ''"),
    ({"text": "abc def", "spans": [{"start": 4, "end": 9, "label": "x"}]}, {"spans_column": "spans"},
     "field 'spans': span 1 [4, 9) 'x' is off the text (7 characters)"),
    ({"text": "abc def", "spans": [{"start": 0, "end": 5, "label": "x"}, {"start": 4, "end": 7, "label": "y"}]},
     {"spans_column": "spans"}, "field 'spans': span 2 [4, 7) 'y' overlaps span 1 [0, 5) 'x'"),
]


@pytest.mark.parametrize("bad,params,message", BAD, ids=["length", "i_without_b", "bad_tag", "empty_word",
                                                          "span_off_text", "overlap"])
def test_each_alignment_error_is_one_line_naming_file_row_and_field(tmp_path, capsys, bad, params, message):
    good = [{"text": "Maria called", "spans": [{"start": 0, "end": 5, "label": "person"}]}] * 20 \
        if "spans_column" in params else _word_rows()
    src = _jsonl(tmp_path / "tagged.jsonl", good[:5] + [bad] + good[5:])
    rc = ingest_main(["--source", str(src), "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"),
                      "--params", str(_params(tmp_path, **params))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"tagged.jsonl: row 6: {message}" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_skip_mode_lists_bad_sentences_in_rejected_csv(tmp_path):
    src = _jsonl(tmp_path / "tagged.jsonl", _word_rows([b for b, p, _ in BAD if not p]))
    rc = ingest_main(["--source", str(src), "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"),
                      "--params", str(_params(tmp_path, on_bad_row="skip"))])
    assert rc == 0
    rej = pd.read_csv(tmp_path / "out" / "rejected.csv")
    assert list(rej["row"]) == [25, 26, 27, 28]
    assert set(rej["reason"]) == {"length_mismatch", "bad_tags", "bad_word"}
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["rejected"] == 4 and m["files"][str(src)] == {"records": 28, "kept": 24, "rejected": 4}
    assert json.loads((tmp_path / "out" / "labels.json").read_text())[-1] == "O"


def test_entity_scores_are_strict_iob2():
    gold = [["B-a", "I-a", "O", "B-b"]]
    assert entity_scores(gold, gold)["f1"] == 1.0
    s = entity_scores(gold, [["I-a", "I-a", "O", "B-a"]])  # strict: an entity opened by I- is no entity
    assert s["f1"] == 0.0 and s["per_type"]["a"]["recall"] == 0.0 and s["token_accuracy"] == 0.5
    assert lenient_entities(["I-a", "I-a", "O", "B-a"]) == [("a", 0, 2), ("a", 3, 4)]


# ------------------------------------------------------------------ first sub-word labelling

@pytest.fixture(scope="module")
def tokenizer():
    from domaintune.modeling.encoders import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("minilm"))


WORD = st.text(alphabet=st.sampled_from(list("abcxyzQRS019-'.,éñßÆ日本")), min_size=1, max_size=12)


NAMES = ["B-a", "B-b", "I-a", "I-b", "O"]


@settings(max_examples=60, deadline=None)
@given(sentence=st.lists(st.tuples(WORD, st.integers(0, len(NAMES) - 1)), min_size=1, max_size=20))
def test_first_subword_labelling_round_trips_word_tags(tokenizer, sentence):
    words, tags = [w for w, _ in sentence], [t for _, t in sentence]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=512)
    word_ids = enc.word_ids()
    labels = align_labels(word_ids, tags)
    assert sum(lab != IGNORE for lab in labels) == len(words)  # exactly one labelled sub-word per word
    first = first_subwords(word_ids, len(words))
    assert (first >= 0).all()
    assert [labels[i] for i in first] == tags  # read back at each word's first sub-word: the word tags
    assert all(lab == IGNORE for i, lab in enumerate(labels) if i not in set(first.tolist()))
    # The training encoding labels exactly these positions: a word the pre-tokenizer cuts into pieces ("INV-1"
    # -> INV, -, 1; "don't"; URLs) is labelled on its first sub-word only, like transformers' run_ner.
    ids, train_labels = encode_words(tokenizer, [words], [tags], 512)
    assert ids[0] == enc["input_ids"]
    assert train_labels[0] == labels


def test_a_missing_source_is_one_data_error(tmp_path):
    with pytest.raises(DataError, match="source not found"):
        ingest_tokens(str(tmp_path / "nope"), IngestParams(feedback=None), 1)
