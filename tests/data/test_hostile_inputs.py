"""Hostile input against the real ingest entry point (stages.ingest.main) and the shared stage runner.

The corpus is tests/hostile/ (written by tests/hostile/make_corpus.py); binary and environment-dependent
cases (Parquet, symlinks, huge fields, folders) are made here. Every bad input must give exit code 2 and
one line naming file, row and field, and leave neither an output nor a temporary sibling behind; every
skip-mode run must list exactly the rejected rows, with records read = rows kept + rows rejected per file.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pandas as pd
import pytest
import yaml

from domaintune.core.errors import DataError, StageError
from domaintune.core.io import OUTPUT_MARKER, atomic_output, read_json
from domaintune.core.stage import OUTPUT_ARGS, REPLACED_ARGS, check_paths_apart, stage_outputs_owned
from domaintune.data.dataset import read_dataset
from domaintune.data.sources import raise_problems, read_file
from stages import dedupe as dedupe_stage
from stages.ingest import main

HOSTILE = Path(__file__).resolve().parents[1] / "hostile"
REPO = Path(__file__).resolve().parents[2]
SPLIT = {"train": 0.5, "validation": 0.25, "test": 0.25}


def run(tmp_path: Path, source, capsys=None, params: dict | None = None, **ingest):
    """ingest's real main() on `source`; returns (exit code, stderr, out folder, metrics path)."""
    p = tmp_path / "params.yaml"
    if params is None:
        params = {"base": {"seed": 3}, "ingest": {"split": SPLIT, **ingest}}
    p.write_text(yaml.safe_dump(params))
    out, metrics = tmp_path / "ingested", tmp_path / "metrics" / "ingest.json"
    rc = main(["--source", str(source), "--out", str(out), "--metrics", str(metrics), "--params", str(p)])
    err = capsys.readouterr().err if capsys else ""
    return rc, err, out, metrics


def corpus(tmp_path: Path, name: str) -> Path:
    src = tmp_path / "src" / name
    src.parent.mkdir(exist_ok=True)
    shutil.copyfile(HOSTILE / name, src)
    return src


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def assert_failed_cleanly(rc: int, err: str, expected: str, out: Path, metrics: Path, tmp_path: Path) -> None:
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("ingest: error:")]
    assert lines == ["ingest: error: " + expected]
    assert "Traceback" not in err
    assert not out.exists() and not metrics.exists()
    assert temporaries(tmp_path) == []


# ---------------------------------------------------------------- errors: one line, exit 2, nothing written

ERRORS = [  # corpus file, ingest params, the one error line (after "ingest: error: ")
    ("unbalanced_quote.csv", {}, "{src}: row 3: field 'text': a quote opens this field at line 4 and no quote "
                                 "followed by the delimiter or a line end closes it"),
    ("quote_closed_on_a_later_line.csv", {}, "{src}: row 2: field 'text': a quote opens this field at line 3 and "
                                             "no quote followed by the delimiter or a line end closes it"),
    ("empty.csv", {}, "{src}: file is empty (no header row)"),
    ("header_only.csv", {}, "{src}: file has a header but no data rows"),
    ("wrong_delimiter.csv", {}, "{src}: field 'text': column missing; columns found: ['text\\tlabel'] (one column "
                                "whose name holds '\\t': is the file delimited by '\\t'?)"),
    ("bad_utf8_text.csv", {}, "{src}: row 2: field 'text': bytes that are not UTF-8 at byte offset 54 (line 3)"),
    ("bad_utf8_label.tsv", {}, "{src}: row 1: field 'label': bytes that are not UTF-8 at byte offset 42 (line 2)"),
    ("duplicate_ids.csv", {"id_column": "ticket_id"},
     "{src}: row 4: field 'ticket_id': id 'T2' already used by {src} row 2"),
    ("duplicate_ids.csv", {"id_column": "ticket_id", "on_bad_row": "skip"},
     "{src}: row 4: field 'ticket_id': id 'T2' already used by {src} row 2"),
    ("one_class.csv", {"on_bad_row": "skip"},
     "{src}: field 'label': only one class ('billing') in train; a classifier needs at least two"),
    ("label_only_in_test.csv", {"split_column": "part"}, "{src}: row 11: field 'label': label 'warranty' (test) never "
                                                         "appears in train; train labels: ['billing', 'login']"),
    ("malformed_middle.jsonl", {}, "{src}: row 3: invalid JSON: Expecting property name enclosed in double quotes: "
                                   "line 1 column 20 (char 19)"),
    ("extra_field.csv", {}, "{src}: row 4: has 3 fields, the header has 2 (line 5)"),
    ("missing_labels.csv", {}, "{src}: row 2: field 'label': label is missing (''; blank, null and "
                               "ingest.missing_labels mean no label) (line 3)"),
    ("label_only_in_test.csv", {"split_column": "part", "on_bad_row": "skip", "missing_split": "error"},
     "{src}: field 'part': the source has its own splits ['test', 'train'] but no validation split; add it, or set "
     "ingest.missing_split: carve to take it from train by ingest.split"),
    ("one_row_per_class.csv", {}, "{src}: the validation split would be empty (rows: {{'train': 2, 'validation': 0, "
                                  "'test': 0}}, rejected: 0): too few rows per class for ingest.split (train 0.5 / "
                                  "validation 0.25 / test 0.25; each class keeps one row in train); add rows, "
                                  "or set ingest.split.validation: 0 to go without"),
    ("utf16.csv", {}, "{src}: file is UTF-16 (it starts with a UTF-16 byte order mark); save it as UTF-8"),
    ("old_mac_line_ends.csv", {}, "{src}: lines end with a lone carriage return (old Mac style); save the file with "
                                  "\\n or \\r\\n line ends"),
    ("batch_bad_utf8.txt", {}, "{src}: unsupported file type '.txt'; use one of ['.csv', '.jsonl', '.parquet', "
                               "'.tsv']"),
    ("lone_surrogate.jsonl", {}, "{src}: row 10: field 'text': holds a lone surrogate \\ud800 at character 12 (a JSON "
                                 "\\u escape of half a UTF-16 pair: not a character, it cannot be written as UTF-8)"),
]


@pytest.mark.parametrize("name, ingest, expected", ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, name, ingest, expected):
    src = corpus(tmp_path, name)
    before = src.read_bytes()
    rc, err, out, metrics = run(tmp_path, src, capsys, **ingest)
    assert_failed_cleanly(rc, err, expected.format(src=src), out, metrics, tmp_path)
    assert src.read_bytes() == before


def test_missing_path_unknown_key_and_bad_ratios_are_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    rc, err, out, metrics = run(tmp_path, missing, capsys)
    assert_failed_cleanly(rc, err, f"{missing}: source not found", out, metrics, tmp_path)
    src = corpus(tmp_path, "bom_crlf.csv")
    rc, err, out, metrics = run(tmp_path, src, capsys, params={"ingest": {"colour": "red"}})
    assert rc == 2 and err.startswith("ingest: error: params.yaml: ingest: unknown key(s) ['colour']; known: [")
    assert not out.exists() and temporaries(tmp_path) == []
    rc, err, out, metrics = run(tmp_path, src, capsys, split={"train": 0.7, "validation": 0.2, "test": 0.2})
    assert_failed_cleanly(rc, err, "params.yaml: ingest.split: ratios must sum to 1, got 1.0999999999999999",
                          out, metrics, tmp_path)


# ---------------------------------------------------------------- skip mode: exactly these rows rejected

SKIPPED = [  # corpus file, ingest params, rejected (row, field, reason), records in the file
    ("unbalanced_quote.csv", {}, [(3, "text", "malformed_row")], 8),
    ("quote_closed_on_a_later_line.csv", {}, [(2, "text", "malformed_row")], 8),
    ("bad_utf8_text.csv", {}, [(2, "text", "undecodable_bytes")], 6),
    ("bad_utf8_label.tsv", {}, [(1, "label", "undecodable_bytes")], 6),
    ("malformed_middle.jsonl", {}, [(3, "", "malformed_row")], 6),
    ("extra_field.csv", {}, [(4, "", "malformed_row")], 6),
    ("label_only_in_test.csv", {"split_column": "part"}, [(11, "label", "unseen_label")], 12),
    ("missing_labels.csv", {}, [(r, "label", "missing_label") for r in (2, 4, 6, 8, 10)], 12),
    ("missing_labels.jsonl", {}, [(r, "label", "missing_label") for r in (2, 4, 6, 8, 10)], 12),
    ("lone_surrogate.jsonl", {"id_column": "id"}, [(10, "text", "lone_surrogate")], 12),
]


@pytest.mark.parametrize("name, ingest, rejected, records", SKIPPED, ids=[s[0] for s in SKIPPED])
def test_skip_mode_rejects_exactly_the_bad_rows_and_accounts_for_every_record(tmp_path, name, ingest, rejected,
                                                                              records):
    src = corpus(tmp_path, name)
    rc, _, out, metrics = run(tmp_path, src, on_bad_row="skip", **ingest)
    assert rc == 0
    rej = pd.read_csv(out / "rejected.csv", keep_default_na=False)
    assert [tuple(r) for r in rej[["row", "field", "reason"]].itertuples(index=False)] == rejected
    assert set(rej["file"]) == {str(src)} and (rej["detail"] != "").all()
    m = read_json(metrics)
    assert m["files"] == {str(src): {"records": records, "kept": records - len(rejected), "rejected": len(rejected),
                                     "multiline_rows": 0}}
    splits, _ = read_dataset(out)
    assert sum(len(df) for df in splits.values()) == records - len(rejected) == sum(m["rows"].values())
    assert temporaries(tmp_path) == []


# ---------------------------------------------------------------- texts come back exactly

def texts_of(out: Path) -> dict[str, str]:
    splits, _ = read_dataset(out)
    df = pd.concat(splits.values())
    return dict(zip(df["id"], df["text"]))


def test_a_quote_opening_a_field_never_swallows_rows_and_quotes_round_trip(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_corpus", HOSTILE / "make_corpus.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    src = corpus(tmp_path, "quote_opens_field.tsv")
    rc, _, out, metrics = run(tmp_path, src)
    assert rc == 0
    got = texts_of(out)
    assert got == {f"quote_opens_field:{i}": t for i, (t, _) in enumerate(mc.QUOTE_OPENS_FIELD, start=1)}
    assert read_json(metrics)["files"][str(src)] == {"records": 12, "kept": 12, "rejected": 0, "multiline_rows": 0}


def test_embedded_newlines_bom_and_crlf(tmp_path, caplog):
    caplog.set_level("INFO", logger="domaintune")
    src = corpus(tmp_path, "embedded_newlines.csv")
    rc, _, out, metrics = run(tmp_path, src)
    assert rc == 0
    assert read_json(metrics)["files"][str(src)] == {"records": 12, "kept": 12, "rejected": 0, "multiline_rows": 2}
    assert f"{src}: 2 rows span several lines (quoted line breaks), the first is row 2 (line 3)" in caplog.text
    got = texts_of(out)
    assert len(got) == 12
    assert got["embedded_newlines:2"] == "first line\nsecond line, with a comma"
    assert got["embedded_newlines:5"] == 'a "quoted" word\r\nover CRLF'
    src = corpus(tmp_path, "bom_crlf.csv")
    rc, _, out, _ = run(tmp_path / "src", src)
    assert rc == 0
    got = texts_of(tmp_path / "src" / "ingested")
    assert got["bom_crlf:1"] == "ticket number 1 about login" and not any("\r" in t for t in got.values())


def test_fields_past_pythons_csv_limit_are_read_and_past_max_chars_rejected(tmp_path, capsys):
    src = tmp_path / "long.csv"
    long_text = "word " * 40_000  # 200,000 characters: Python csv's default limit is 131,072
    body = [f"ticket {i} text,{'ab'[i % 2]}" for i in range(12)]
    body[4] = f'"{long_text}",a'
    src.write_text("text,label\n" + "\n".join(body) + "\n")
    rc, _, out, _ = run(tmp_path, src, capsys)
    assert rc == 0 and texts_of(out)["long:5"] == long_text
    (tmp_path / "x").mkdir()
    rc, err, out2, metrics = run(tmp_path / "x", src, capsys, max_chars=150_000)
    assert_failed_cleanly(rc, err, f"{src}: row 5: field 'text': 200,000 characters, more than ingest.max_chars "
                          "(150,000) (line 6)", out2, metrics, tmp_path / "x")
    rc, _, out3, metrics = run(tmp_path / "x", src, capsys, max_chars=150_000, on_bad_row="skip")
    rej = pd.read_csv(out3 / "rejected.csv")
    assert rej[["row", "field", "reason"]].values.tolist() == [[5, "text", "too_long"]]
    assert rej["text"][0].endswith("... (200,000 characters)")
    assert read_json(metrics)["files"][str(src)] == {"records": 12, "kept": 11, "rejected": 1, "multiline_rows": 0}


# ---------------------------------------------------------------- one label rule for every format

def test_missing_labels_mean_the_same_in_csv_jsonl_and_parquet(tmp_path):
    pq = tmp_path / "missing_labels.parquet"
    labels = ["billing", "login"] * 6
    for k, v in zip((1, 3, 5, 7, 9), ("", "NaN", None, "N/A", "None")):
        labels[k] = v
    pd.DataFrame({"text": [f"row {i}" for i in range(1, 13)], "label": labels}).to_parquet(pq)
    got = {}
    for src in (corpus(tmp_path, "missing_labels.csv"), corpus(tmp_path, "missing_labels.jsonl"), pq):
        d = tmp_path / src.suffix[1:]
        d.mkdir()
        rc, _, out, _ = run(d, src, on_bad_row="skip")
        assert rc == 0
        rej = pd.read_csv(out / "rejected.csv", keep_default_na=False)
        got[src.suffix] = [tuple(r) for r in rej[["row", "reason"]].itertuples(index=False)]
    assert got[".csv"] == got[".jsonl"] == got[".parquet"] == [(r, "missing_label") for r in (2, 4, 6, 8, 10)]
    # set to [] the spellings are classes again (blank and null stay missing)
    rc, _, out, _ = run(tmp_path / "csv", corpus(tmp_path, "missing_labels.csv"), on_bad_row="skip",
                        missing_labels=[])
    assert sorted(read_json(out / "labels.json")) == ["N/A", "NaN", "None", "billing", "login", "null"]


def test_numeric_labels_are_strings_as_written_and_typed_numbers_by_one_rule(tmp_path):
    rc, _, out, _ = run(tmp_path, corpus(tmp_path, "numeric_labels.csv"))
    assert rc == 0 and read_json(out / "labels.json") == ["01", "1", "1.0"]
    rc, _, out, _ = run(tmp_path, corpus(tmp_path, "numeric_labels.jsonl"))
    assert rc == 0 and read_json(out / "labels.json") == ["1", "1.0", "2"]  # JSON numbers as written
    pq = tmp_path / "numeric.parquet"
    pd.DataFrame({"text": [f"t{i}" for i in range(12)], "label": [1.0, 2.0, None] * 4}).to_parquet(pq)
    rc, _, out, _ = run(tmp_path, pq, on_bad_row="skip")
    assert rc == 0 and read_json(out / "labels.json") == ["1", "2"]  # an integral float is its integer
    assert pd.read_csv(out / "rejected.csv")["reason"].tolist() == ["missing_label"] * 4


# ---------------------------------------------------------------- Parquet and .txt cells

def test_nested_parquet_text_and_undecodable_parquet_strings_name_row_and_field(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as papq

    pq = tmp_path / "src" / "nested.parquet"
    pq.parent.mkdir()
    pd.DataFrame({"text": [["a", "list"], ["of", "words"]] * 6, "label": ["a", "b"] * 6}).to_parquet(pq)
    rc, err, out, metrics = run(tmp_path, pq, capsys)
    assert_failed_cleanly(rc, err, f"{pq}: row 1: field 'text': text is a list, not a string", out, metrics, tmp_path)
    raw = pa.array([b"ok", b"bad \xff x", b"fine"] * 4, type=pa.binary())
    strings = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # a string column, bytes unchecked
    bad = tmp_path / "src" / "bad_utf8.parquet"
    papq.write_table(pa.table({"text": strings, "label": ["a", "b", "a"] * 4}), bad)
    rc, err, out, metrics = run(tmp_path, bad, capsys)
    assert_failed_cleanly(rc, err, f"{bad}: row 2: field 'text': bytes that are not UTF-8 at byte offset 4 of the "
                          "cell", out, metrics, tmp_path)


def test_txt_batches_report_undecodable_bytes_as_a_data_error(tmp_path):
    src = corpus(tmp_path, "batch_bad_utf8.txt")
    table = read_file(src)
    assert table.frame["text"].tolist()[::2] == ["first text", "third text"]
    with pytest.raises(DataError) as exc:
        raise_problems(table, ["text"])
    assert str(exc.value) == f"{src}: row 2: field 'text': bytes that are not UTF-8 at byte offset 18"
    for name in ("bad_utf8_text.csv", "malformed_middle.jsonl"):
        with pytest.raises(DataError, match=r"row [23]"):
            raise_problems(read_file(corpus(tmp_path, name)), ["text"])


# ---------------------------------------------------------------- generation conversations (ingest.messages_column)

GEN_REJECTED = {  # rows 10-12 of messages_hostile.<ext> plus a conversation nested 50,000 deep as row 12
    "csv": [(10, "messages", "bad_messages"), (11, "messages", "bad_messages"), (12, "messages", "bad_messages")],
    "jsonl": [(10, "messages", "lone_surrogate"), (11, "messages", "lone_surrogate"), (12, "", "malformed_row")],
}


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_conversations_nested_50000_deep_with_huge_numbers_or_lone_surrogates_are_rejected_rows(tmp_path, capsys, ext):
    """Each unusable conversation is a rejected row naming file, row and field (skip) or the one error line (error),
    never a RecursionError, AttributeError or UnicodeEncodeError; a 5,000-digit number in a message is kept as
    written (row 9 is a good conversation)."""
    src = corpus(tmp_path, f"messages_hostile.{ext}")
    deep = "[" * 50_000 + "]" * 50_000
    with src.open("a", encoding="utf-8") as fh:
        fh.write(f"c12,{deep}\n" if ext == "csv" else f'{{"id": "c12", "messages": {deep}}}\n')
    params = {"base": {"seed": 3, "task": "generation"},
              "ingest": {"split": SPLIT, "messages_column": "messages", "id_column": "id", "on_bad_row": "skip"}}
    rc, err, out, metrics = run(tmp_path, src, capsys, params=params)
    assert rc == 0, err
    rej = pd.read_csv(out / "rejected.csv", keep_default_na=False)
    assert [tuple(r) for r in rej[["row", "field", "reason"]].itertuples(index=False)] == GEN_REJECTED[ext]
    assert "lone surrogate \\ud800" in rej["detail"][0] and "lone surrogate \\udfff" in rej["detail"][1]
    assert "nested deeper than" in rej["detail"][2]
    assert read_json(metrics)["files"][str(src)] == {"records": 12, "kept": 9, "rejected": 3}
    splits, _ = read_dataset(out)
    assert sorted(pd.concat(splits.values())["id"]) == sorted(f"c{k}" for k in range(1, 10))
    shutil.rmtree(out)
    metrics.unlink()
    params["ingest"]["on_bad_row"] = "error"
    rc, err, out, metrics = run(tmp_path, src, capsys, params=params)
    assert_failed_cleanly(rc, err, f"{src}: row 10: field 'messages': " + (
        "conversation message 1 'content' holds a lone surrogate \\ud800 at character 2 (not a character: a "
        "\\ud800-style JSON escape or a byte that is not UTF-8)" if ext == "csv" else
        "holds a lone surrogate \\ud800 at character 2 (a JSON \\u escape of half a UTF-16 pair: not a character, it "
        "cannot be written as UTF-8)"), out, metrics, tmp_path)


# ---------------------------------------------------------------- folders: every file used, or an error naming it

def folder_of(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    for name, body in files.items():
        (folder / name).write_text(body)
    return folder


def tickets(n: int, start: int = 0) -> str:
    return "text,label\n" + "".join(f"ticket {i} about {'ab'[i % 2]},{'ab'[i % 2]}\n" for i in range(start, start + n))


def test_split_words_as_name_tokens_keep_the_users_splits(tmp_path, caplog):
    folder = folder_of(tmp_path, {"tickets_train.csv": tickets(12), "tickets-TEST.csv": tickets(4, 100),
                                  ".tickets_train.csv.tmp-1-x": "garbage that must never be read\n"})
    rc, _, out, metrics = run(tmp_path, folder)
    assert rc == 0
    splits, _ = read_dataset(out)
    assert sorted(splits["test"]["id"]) == [f"tickets-TEST:{i}" for i in range(1, 5)]
    m = read_json(metrics)
    assert m["split_source"] == "files" and m["carved_splits"] == ["validation"]
    assert {f: c["records"] for f, c in m["files"].items()} == {str(folder / "tickets-TEST.csv"): 4,
                                                               str(folder / "tickets_train.csv"): 12}
    assert "source has no validation split: carved from its train rows" in caplog.text


FOLDER_ERRORS = [  # extra entry next to tickets_train.csv + tickets_test.csv, the error after "{path}: "
    ("test.json", "file", "unsupported file type '.json' (compressed files too); a source folder may hold only "
                          ".csv/.jsonl/.parquet/.tsv files (names starting with '.' are ignored)"),
    ("tickets_valid.csv.gz", "file", "unsupported file type '.csv.gz' (compressed files too); a source folder may "
                                     "hold only .csv/.jsonl/.parquet/.tsv files (names starting with '.' are ignored)"),
    ("more_tickets.csv", "file", "file name names no split while ['tickets_test.csv', 'tickets_train.csv'] do; put "
                                 "one of ['dev', 'test', 'train', 'valid', 'validation'] in every file name (e.g. "
                                 "tickets_train.csv), or in none"),
    ("train_test.csv", "file", "file name names more than one split ['train', 'test']; name exactly one"),
    ("dev_dangling.csv", "dangling", "broken symbolic link (to 'nowhere.csv')"),
    ("dev_loop.csv", "loop", "symbolic link cannot be followed (Too many levels of symbolic links: a loop?)"),
    ("archive", "folder", "a folder inside the source folder; ingest reads one level only (move it out or use it as "
                          "the source)"),
]


def test_two_files_with_the_same_stem_get_an_error_naming_both(tmp_path, capsys):
    folder = folder_of(tmp_path, {"train.csv": tickets(12), "train.tsv": tickets(4, 50).replace(",", "\t")})
    rc, err, out, metrics = run(tmp_path, folder, capsys)
    assert_failed_cleanly(rc, err, f"{folder / 'train.tsv'}: row 1: field 'id': id 'train:1' already used by "
                          f"{folder / 'train.csv'} row 1 (ids are <file stem>:<row>: give the files different names, "
                          "or set ingest.id_column)", out, metrics, tmp_path)


@pytest.mark.parametrize("name, kind, expected", FOLDER_ERRORS, ids=[f[0] for f in FOLDER_ERRORS])
def test_a_folder_entry_the_rule_cannot_place_is_an_error_naming_it(tmp_path, capsys, name, kind, expected):
    folder = folder_of(tmp_path, {"tickets_train.csv": tickets(12), "tickets_test.csv": tickets(4, 100)})
    entry = folder / name
    if kind == "file":
        entry.write_text(tickets(4, 200))
    elif kind == "dangling":
        entry.symlink_to("nowhere.csv")
    elif kind == "loop":
        entry.symlink_to(name)
    else:
        entry.mkdir()
        (entry / "old_train.csv").write_text(tickets(3))
    rc, err, out, metrics = run(tmp_path, folder, capsys)
    assert_failed_cleanly(rc, err, f"{entry}: {expected}", out, metrics, tmp_path)


# ---------------------------------------------------------------- outputs never destroy inputs

def test_an_output_equal_to_inside_or_containing_an_input_is_refused_before_anything_is_touched(tmp_path, capsys):
    folder = folder_of(tmp_path, {"tickets_train.csv": tickets(12), "tickets_test.csv": tickets(4, 100)})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"ingest": {"split": SPLIT}}))
    cases = [
        (str(folder), str(tmp_path / "m.json"), f"--out {folder} is the input --source {folder}"),
        (str(folder / "out"), str(tmp_path / "m.json"), f"--out {folder / 'out'} is inside the input --source {folder}"),
        (str(tmp_path), str(tmp_path / "m.json"), f"--out {tmp_path} contains the input --params {params}"),
        (str(tmp_path / "out"), str(tmp_path / "out" / "m.json"),
         f"--out {tmp_path / 'out'} contains the output --metrics {tmp_path / 'out' / 'm.json'}"),
    ]
    for out, metrics, expected in cases:
        rc = main(["--source", str(folder), "--out", out, "--metrics", metrics, "--params", str(params)])
        err = capsys.readouterr().err
        assert rc == 2
        assert err.splitlines() == [f"ingest: error: {expected}; an output must not be, contain or sit inside another "
                                    "path the stage uses (writing it would replace that path)"]
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
        assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
    # through a symbolic link too, and for a stage reading a dataset folder
    link = tmp_path / "link"
    link.symlink_to(folder)
    assert main(["--source", str(folder), "--out", str(link), "--metrics", str(tmp_path / "m.json"),
                 "--params", str(params)]) == 2
    assert dedupe_stage.main(["--in", str(folder), "--out", str(folder), "--metrics", str(tmp_path / "m.json"),
                              "--params", str(params)]) == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_every_stage_command_in_dvc_yaml_passes_the_overlap_check():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for _name, stage in stages.items():
        cmd = stage["cmd"].replace("${ingest.source}", params["ingest"]["source"]).replace(
            "${audit.decisions}", params["audit"]["decisions"])
        words = shlex.split(cmd)[3:]  # after "python -m stages.x"
        ns = Namespace()
        for flag, value in zip(words[::2], words[1::2]):
            setattr(ns, "in_dir" if flag == "--in" else flag[2:].replace("-", "_"), value)
        check_paths_apart(ns)  # raises StageError on an overlap
        # every output is a declared DVC out: replaceable even if an older version wrote it without the marker
        outputs = [getattr(ns, d) for d in OUTPUT_ARGS if hasattr(ns, d)]
        assert outputs and stage_outputs_owned(ns, REPO) == outputs, _name
    with pytest.raises(StageError):
        check_paths_apart(Namespace(in_dir="data/ingested", out="data/ingested/x"))


def test_a_stage_replaces_its_dvc_declared_out_without_a_marker_and_refuses_any_other_folder(tmp_path, capsys,
                                                                                             monkeypatch):
    """An out written by an older version (no marker) is still replaced where dvc.yaml declares it (DVC owns it);
    a folder of the user's that --out happens to name is refused before the stage reads anything."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": {
        "cmd": "python -m stages.ingest", "outs": ["data/ingested", {"metrics/ingest.json": {"cache": False}}]}}}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"base": {"seed": 3}, "ingest": {"split": SPLIT}}))
    src = corpus(tmp_path, "bom_crlf.csv")
    legacy = tmp_path / "data" / "ingested"
    legacy.mkdir(parents=True)
    (legacy / "train.parquet").write_text("written by an older domaintune")
    argv = ["--source", str(src), "--metrics", "metrics/ingest.json", "--params", "params.yaml"]
    assert main([*argv, "--out", "data/ingested"]) == 0
    assert (legacy / OUTPUT_MARKER).is_file() and sum(len(df) for df in read_dataset(legacy)[0].values()) == 12
    assert main([*argv, "--out", "data/ingested"]) == 0  # and again, now through its marker
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not domaintune's")
    assert main(["--source", str(src), "--metrics", "m2.json", "--params", "params.yaml", "--out", "mine"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ingest: error: mine: --out: an existing folder that domaintune did not write (it has no {OUTPUT_MARKER} "
        "file); refusing to replace it: move it away or choose another output path"]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not (tmp_path / "m2.json").exists()
    assert temporaries(tmp_path) == []
    assert set(REPLACED_ARGS) < set(OUTPUT_ARGS)  # --checkpoints is a folder of checkpoint folders, never replaced


# ---------------------------------------------------------------- temporaries and file modes

def test_stale_temporaries_are_removed_and_a_live_runs_are_kept(tmp_path):
    src = corpus(tmp_path, "bom_crlf.csv")
    dead = tmp_path / ".ingested.tmp-999999999-abc"  # no such pid
    dead.mkdir()
    (dead / "ingested").mkdir()
    (dead / "ingested" / "train.parquet").write_bytes(b"\0" * 1_000_000)
    old_style = tmp_path / ".ingested.tmp-k3j4h5"  # written before temporaries carried a pid
    old_style.write_text("x")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".ingested.tmp-{sleeper.pid}-xyz"
        live.mkdir()
        rc, _, out, _ = run(tmp_path, src)
        assert rc == 0
        assert not dead.exists() and not old_style.exists()
        assert live.exists()  # another live process's work in progress is not ours to delete
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_output_file_modes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    import numpy as np
    from safetensors.numpy import save_file

    old = os.umask(umask)
    try:
        rc, _, out, metrics = run(tmp_path, corpus(tmp_path, "bom_crlf.csv"))
        assert rc == 0
        with atomic_output(tmp_path / "model") as tmp:
            tmp.mkdir()
            save_file({"w": np.zeros(2, dtype=np.float32)}, str(tmp / "model.safetensors"))  # safetensors writes 0600 itself
    finally:
        os.umask(old)
    for root in (out, tmp_path / "model"):
        assert root.stat().st_mode & 0o777 == dir_mode
        files = [p for p in root.rglob("*") if p.is_file()]
        assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {oct(file_mode)}
    assert metrics.stat().st_mode & 0o777 == file_mode


# ---------------------------------------------------------------- SIGKILL mid-write, then a re-run

def test_sigkill_during_ingest_then_a_rerun_gives_the_uninterrupted_output(tmp_path):
    src = tmp_path / "big.csv"
    n = 50_000
    with open(src, "w") as fh:
        fh.write("text,label\n")
        for i in range(n):
            fh.write(f'"ticket {i}, with ""quotes"" and text",{"abc"[i % 3]}\n')
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"ingest": {"split": SPLIT}}))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "stages.ingest", "--source", str(src), "--out", str(out),
                "--metrics", str(out.parent / f"{out.name}.json"), "--params", str(params)]

    def kill_mid_write(killed_dir: Path) -> int:
        proc = subprocess.Popen(cmd(killed_dir / "ingested"), cwd=REPO, env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            tmps = [p for p in killed_dir.iterdir() if p.name.startswith(".ingested.tmp-")]
            if tmps and any(tmps[0].rglob("*.parquet")):  # mid-write: part of the dataset is on disk
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        return proc.wait()

    for attempt in range(3):  # a loaded machine may let the short write window pass unseen: try again
        killed_dir = tmp_path / f"killed{attempt}"
        killed_dir.mkdir()
        if kill_mid_write(killed_dir) == -signal.SIGKILL:
            break
    else:
        pytest.fail("ingest finished each time before it could be killed mid-write")
    assert temporaries(killed_dir) and not (killed_dir / "ingested").exists()  # killed: a temporary is left
    assert subprocess.run(cmd(killed_dir / "ingested"), cwd=REPO, env=env, capture_output=True).returncode == 0
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    assert subprocess.run(cmd(clean_dir / "ingested"), cwd=REPO, env=env, capture_output=True).returncode == 0
    assert temporaries(killed_dir) == []
    files = sorted(p.relative_to(clean_dir) for p in clean_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(killed_dir) for p in killed_dir.rglob("*") if p.is_file())
    for f in files:
        if f.name == "ingested.json":  # the metrics hold the stage's own wall time (stage_seconds): not content
            a, b = (json.loads((d / f).read_text()) for d in (killed_dir, clean_dir))
            assert a.pop("stage_seconds") >= 0 and b.pop("stage_seconds") >= 0 and a == b
            continue
        assert (killed_dir / f).read_bytes() == (clean_dir / f).read_bytes(), f
    assert json.loads((clean_dir / "ingested.json").read_text())["rows_read"] == n
