"""Data tests for the ingest stage: every source format, every bad input, every split rule."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from domaintune.core.errors import DataError, ParamsError
from domaintune.core.io import read_json
from domaintune.core.params import IngestParams
from domaintune.data.dataset import read_dataset
from domaintune.data.ingest import hash_split, ingest
from domaintune.data.sources import read_source, tables_from_hf
from stages.ingest import main

LABELS = ["billing", "login", "shipping"]


def rows(n: int, labels=LABELS, start: int = 1) -> list[dict]:
    return [{"ticket_id": f"T{i:04d}", "text": f"ticket number {i} about {labels[i % len(labels)]}",
             "label": labels[i % len(labels)]} for i in range(start, start + n)]


def write_csv(path: Path, records: list[dict], sep: str = ",") -> Path:
    pd.DataFrame(records).to_csv(path, index=False, sep=sep)
    return path


def run_ingest(source, seed: int = 42, **kw):
    p = IngestParams(source=str(source), **kw)
    return ingest(read_source(str(source)), p, seed)


def error_of(source, **kw) -> DataError:
    with pytest.raises(DataError) as exc:
        run_ingest(source, **kw)
    return exc.value


def assert_names(err: DataError, file, row, field):
    assert err.file == str(file)
    assert err.row == row
    assert err.field == field
    msg = str(err)
    assert str(file) in msg and (row is None or f"row {row}" in msg) and f"'{field}'" in msg


# ---------------------------------------------------------------- splits

def hash_u(seed: int, row_id: str) -> float:
    """The split rule's point of a row, computed independently of the code under test."""
    return int(hashlib.sha256(f"{seed}\0{row_id}".encode()).hexdigest()[:16], 16) / 2**64


def rule(u: float, split: dict) -> str:
    return "test" if u < split["test"] else "validation" if u < split["test"] + split["validation"] else "train"


def test_hash_split_is_reproducible_and_every_class_is_in_train(tmp_path):
    recs = rows(60) + [{"ticket_id": "RARE1", "text": "a rare refund case", "label": "refund"}]
    src = write_csv(tmp_path / "tickets.csv", recs)
    a = run_ingest(src, id_column="ticket_id", seed=7)
    b = run_ingest(src, id_column="ticket_id", seed=7)
    c = run_ingest(src, id_column="ticket_id", seed=8)
    ids = lambda r: {s: sorted(df["id"]) for s, df in r.splits.items()}  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)  # the seed matters
    # every row of the 3 big classes where sha256(seed, id) puts it (0.8/0.1/0.1 of [0, 1)): 51 / 5 / 5 here
    share = {"train": 0.8, "validation": 0.1, "test": 0.1}
    assert all(rule(hash_u(7, i), share) == s for s, df in a.splits.items() for i in df["id"] if i != "RARE1")
    assert {s: len(df) for s, df in a.splits.items()} == {"train": 51, "validation": 5, "test": 5}
    assert a.labels == sorted(LABELS + ["refund"])
    assert set(a.splits["train"]["label"]) == set(a.labels)
    assert "RARE1" in set(a.splits["train"]["id"])  # a one-row class is always in train (rescued if need be)
    assert a.split_source == "hash" and a.rejected.empty
    assert list(a.splits["train"].columns) == ["id", "text", "label", "split"]


def test_default_ids_are_file_stem_and_row_and_stay_when_rows_are_appended(tmp_path):
    recs = [{k: v for k, v in r.items() if k != "ticket_id"} for r in rows(90)]
    src = write_csv(tmp_path / "tickets.csv", recs)
    before = run_ingest(src)
    all_ids = pd.concat(before.splits.values())
    assert sorted(all_ids["id"], key=lambda s: int(s.split(":")[1])) == [f"tickets:{i}" for i in range(1, 91)]
    text_of = dict(zip(all_ids["id"], all_ids["text"]))
    assert text_of["tickets:5"] == recs[4]["text"]

    more = recs + [{k: v for k, v in r.items() if k != "ticket_id"} for r in rows(30, start=500)]
    write_csv(src, more)
    after = run_ingest(src)
    split_before = {i: s for s, df in before.splits.items() for i in df["id"]}
    split_after = {i: s for s, df in after.splits.items() for i in df["id"]}
    assert {i: split_after[i] for i in split_before} == split_before  # sticky: no old row moves


def old_rank_split(df: pd.DataFrame, fractions: dict[str, float], seed: int) -> pd.Series:
    """The split ingest made before splits were sticky (rank of sha256(seed, id) in each class, quota
    round(n * share)), kept here to show what appending rows did to it."""
    names = [s for s in ("test", "validation") if fractions.get(s, 0) > 0]
    assign = pd.Series("train", index=df.index, dtype=object)
    key = [hashlib.sha256(f"{seed}\0{i}".encode()).hexdigest() for i in df["id"]]
    work = pd.DataFrame({"label": df["label"].to_numpy(), "key": key}, index=df.index)
    work = work.sort_values(["label", "key"], kind="stable")
    rank = work.groupby("label", sort=False).cumcount().to_numpy()
    quota = {}
    for label, n in work.groupby("label", sort=False).size().items():
        k = {s: int(np.floor(n * fractions[s] + 0.5)) for s in names}
        while sum(k.values()) > n - 1:
            big = max(names, key=lambda s: (k[s], s == "test"))
            k[big] -= 1
        quota[label] = k
    start = np.zeros(len(work), dtype=np.int64)
    split = np.full(len(work), "train", dtype=object)
    for s in names:
        k = work["label"].map({lab: q[s] for lab, q in quota.items()}).to_numpy(dtype=np.int64)
        split[(rank >= start) & (rank < start + k)] = s
        start = start + k
    assign.loc[work.index] = split
    return assign


SHARE = {"train": 0.7, "validation": 0.15, "test": 0.15}


def test_appending_ten_percent_rows_moves_no_existing_row_and_shares_stay_near_the_params(tmp_path):
    labels = [f"class_{c}" for c in range(8)]
    old, new = rows(3000, labels), rows(300, labels, start=5000)
    src = write_csv(tmp_path / "tickets.csv", old)
    p = dict(id_column="ticket_id", split=SHARE)
    before = {i: s for s, df in run_ingest(src, **p).splits.items() for i in df["id"]}
    write_csv(src, old + new)
    after_res = run_ingest(src, **p)
    after = {i: s for s, df in after_res.splits.items() for i in df["id"]}
    assert sum(before[i] != after[i] for i in before) == 0
    # the rank split of the same rows moves 38 of the 3,000 (seed 42)
    frame = lambda recs: pd.DataFrame(recs).rename(columns={"ticket_id": "id"})  # noqa: E731
    fractions = {"validation": 0.15, "test": 0.15}
    old_before = old_rank_split(frame(old), fractions, 42).to_numpy()
    old_after = old_rank_split(frame(old + new), fractions, 42).to_numpy()[:len(old)]
    assert (old_before != old_after).sum() == 38
    # realised shares: binomial around the params, overall and per class (4 standard deviations)
    n = len(old) + len(new)
    for s, df in after_res.splits.items():
        assert abs(len(df) - n * SHARE[s]) < 4 * np.sqrt(n * SHARE[s] * (1 - SHARE[s])), (s, len(df))
        for lab, k in df["label"].value_counts().items():
            m = n / len(labels)
            assert abs(k - m * SHARE[s]) < 4 * np.sqrt(m * SHARE[s] * (1 - SHARE[s])), (s, lab, k)


def test_a_class_without_a_train_row_lends_its_nearest_row_to_train_until_it_has_one():
    share = {"validation": 0.15, "test": 0.15}
    big = pd.DataFrame({"id": [f"b{i}" for i in range(40)], "label": ["big"] * 40})
    # two rows of a small class that both hash out of train (u < 0.3), then a third that hashes into it
    out_of_train = [i for i in (f"s{k}" for k in range(200)) if hash_u(42, i) < 0.3][:2]
    into_train = next(i for i in (f"s{k}" for k in range(200, 400)) if hash_u(42, i) >= 0.3)
    small = pd.DataFrame({"id": out_of_train, "label": ["small"] * 2})
    got = hash_split(pd.concat([big, small], ignore_index=True), share, 42)
    nearest = max(out_of_train, key=lambda i: hash_u(42, i))
    split_of = dict(zip(pd.concat([big, small])["id"], got))
    assert split_of[nearest] == "train"
    other = next(i for i in out_of_train if i != nearest)
    assert split_of[other] == rule(hash_u(42, other), {"test": 0.15, "validation": 0.15})
    grown = pd.concat([big, small, pd.DataFrame({"id": [into_train], "label": ["small"]})], ignore_index=True)
    regrown = dict(zip(grown["id"], hash_split(grown, share, 42)))
    assert regrown[nearest] == rule(hash_u(42, nearest), {"test": 0.15, "validation": 0.15})  # back: the one move
    assert [i for i in split_of if split_of[i] != regrown[i]] == [nearest]


def test_a_split_the_rule_leaves_empty_takes_the_train_row_nearest_to_it():
    share = {"validation": 0.25, "test": 0.25}
    ids = [i for i in (f"r{k}" for k in range(500)) if hash_u(1, i) >= 0.5][:6]  # all six hash into train
    df = pd.DataFrame({"id": ids, "label": ["a", "b"] * 3})
    split_of = dict(zip(ids, hash_split(df, share, 1)))
    by_u = sorted(ids, key=lambda i: hash_u(1, i))
    assert split_of[by_u[0]] == "test" and split_of[by_u[1]] == "validation"
    assert sorted(split_of.values()).count("train") == 4
    # one row per class: nothing can leave train, the split stays empty (ingest then refuses the source)
    one_each = pd.DataFrame({"id": ids[:2], "label": ["a", "b"]})
    assert list(hash_split(one_each, share, 1)) == ["train", "train"]


def test_split_column_is_used_and_missing_validation_is_carved_from_train(tmp_path):
    recs = rows(40)
    for i, r in enumerate(recs):
        r["part"] = "TEST" if i % 5 == 0 else "train"
    src = write_csv(tmp_path / "data.csv", recs)
    res = run_ingest(src, split_column="part", id_column="ticket_id",
                     split={"train": 0.8, "validation": 0.1, "test": 0.1})
    assert res.split_source == "column"
    assert sorted(res.splits["test"]["id"]) == sorted(r["ticket_id"] for r in recs if r["part"] == "TEST")
    # validation = 0.1 / (0.8 + 0.1) of the 32 train rows, per class: round(10.67*0.111)=1 or so per class
    assert 3 <= len(res.splits["validation"]) <= 4
    assert len(res.splits["train"]) + len(res.splits["validation"]) == 32


def test_bad_split_value_names_row_and_split_column(tmp_path):
    recs = rows(9)
    for r in recs:
        r["part"] = "train"
    recs[6]["part"] = "holdout"
    src = write_csv(tmp_path / "data.csv", recs)
    err = error_of(src, split_column="part")
    assert_names(err, src, 7, "part")
    assert "holdout" in str(err)


def test_folder_with_split_files_keeps_the_sources_splits(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    write_csv(folder / "train.csv", rows(12))
    pd.DataFrame(rows(3, start=100)).to_json(folder / "valid.jsonl", orient="records", lines=True)
    pd.DataFrame(rows(3, start=200)).to_parquet(folder / "test.parquet", index=False)
    res = run_ingest(folder)
    assert res.split_source == "files"
    assert {s: len(df) for s, df in res.splits.items()} == {"train": 12, "validation": 3, "test": 3}
    assert list(res.splits["validation"]["id"]) == ["valid:1", "valid:2", "valid:3"]
    assert list(res.splits["test"]["id"]) == ["test:1", "test:2", "test:3"]
    assert res.splits["test"]["text"].iloc[0] == "ticket number 200 about shipping"


def test_folder_of_unsplit_files_is_pooled_and_split(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    write_csv(folder / "part_a.csv", rows(20))
    write_csv(folder / "part_b.tsv", rows(20, start=50), sep="\t")
    res = run_ingest(folder, id_column="ticket_id")
    assert res.rows_read == 40 and sum(len(df) for df in res.splits.values()) == 40
    assert res.split_source == "hash"


def test_folder_mixing_split_named_and_other_files_is_refused(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    write_csv(folder / "train.csv", rows(6))
    write_csv(folder / "extra.csv", rows(6))
    with pytest.raises(DataError, match="extra.csv"):
        run_ingest(folder)


def test_hf_dataset_column_mapping_and_class_names(monkeypatch):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"utterance": datasets.Value("string"),
                               "intent": datasets.ClassLabel(names=["card_lost", "refund"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"utterance": [f"train text {i}" for i in range(20)],
                                             "intent": [i % 2 for i in range(20)]}, features=feats),
        "test": datasets.Dataset.from_dict({"utterance": ["t one", "t two", "t three"],
                                            "intent": [0, 1, -1]}, features=feats),
        "unsupervised": datasets.Dataset.from_dict({"utterance": ["u"], "intent": [0]}, features=feats),
    })
    seen = {}

    def fake_load(name, config=None):
        seen["args"] = (name, config)
        return dd

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    tables = read_source("hf:acme/tickets")
    assert seen["args"] == ("acme/tickets", None)
    p = IngestParams(source="hf:acme/tickets", text_column="utterance", label_column="intent", on_bad_row="skip")
    res = ingest(tables, p, 42)
    assert res.split_source == "hf" and res.labels == ["card_lost", "refund"]
    assert list(res.splits["test"]["label"]) == ["card_lost", "refund"]  # ints mapped back to names
    # the -1 ("no label") row is rejected as missing; 'unsupervised' is not a split we use
    assert res.rejected[["file", "row", "reason"]].values.tolist() == [["hf:acme/tickets[test]", 3, "missing_label"]]
    # no validation split in the source: carved from train (0.1 / 0.9 of 20 rows -> 1 per class)
    assert len(res.splits["validation"]) == 2 and len(res.splits["train"]) == 18
    assert tables_from_hf(dd["train"], "hf:x")[0].split == "train"


# ---------------------------------------------------------------- bad input: one test each

def test_missing_column_names_the_columns_found(tmp_path):
    src = write_csv(tmp_path / "d.csv", [{"body": "x", "label": "a"}])
    err = error_of(src)
    assert_names(err, src, None, "text")
    assert "columns found: ['body', 'label']" in str(err)


@pytest.mark.parametrize("bad_text", ["", "   \t "])
def test_empty_or_whitespace_text_names_row_and_column(tmp_path, bad_text):
    recs = rows(6)
    recs[3]["text"] = bad_text
    src = write_csv(tmp_path / "d.csv", recs)
    err = error_of(src)
    assert_names(err, src, 4, "text")
    assert "empty" in str(err) and "line 5" in str(err)


def test_missing_label_names_row_and_column(tmp_path):
    recs = rows(6)
    recs[1]["label"] = None
    src = write_csv(tmp_path / "d.csv", recs)
    assert_names(error_of(src), src, 2, "label")


def test_undecodable_bytes_name_row_column_and_byte_offset(tmp_path):
    src = write_csv(tmp_path / "d.csv", rows(6))
    data = src.read_bytes().replace(b"ticket number 3 ", b"ticket num\xffber 3 ")
    src.write_bytes(data)
    err = error_of(src)
    assert_names(err, src, 3, "text")
    assert "byte offset %d" % data.index(b"\xff") in str(err)


def test_undecodable_bytes_in_jsonl_name_line_and_key(tmp_path):
    src = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}).encode() for i in range(5)]
    lines[2] = b'{"text": "caf\xe9 au lait", "label": "a"}'
    src.write_bytes(b"\n".join(lines) + b"\n")
    err = error_of(src)
    assert_names(err, src, 3, "text")
    assert "byte offset %d" % src.read_bytes().index(b"\xe9") in str(err)


def test_malformed_json_line_is_reported_with_its_line(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", oops}\n')
    with pytest.raises(DataError, match=r"row 3: invalid JSON"):
        run_ingest(src)


def test_validation_label_never_seen_in_train_names_row_and_column(tmp_path):
    recs = rows(12)
    for r in recs:
        r["part"] = "train"
    recs[10].update(part="validation", label="warranty")
    src = write_csv(tmp_path / "d.csv", recs)
    err = error_of(src, split_column="part")
    assert_names(err, src, 11, "label")
    assert "'warranty'" in str(err) and "never appears in train" in str(err)


def test_only_one_class_fails_even_in_skip_mode(tmp_path):
    src = write_csv(tmp_path / "d.csv", rows(10, labels=["billing"]))
    err = error_of(src, on_bad_row="skip")
    assert_names(err, src, None, "label")
    assert "only one class ('billing')" in str(err)


def test_duplicate_id_names_both_rows(tmp_path):
    recs = rows(6)
    recs[4]["ticket_id"] = recs[1]["ticket_id"]
    src = write_csv(tmp_path / "d.csv", recs)
    err = error_of(src, id_column="ticket_id")
    assert_names(err, src, 5, "ticket_id")
    assert "row 2" in str(err)


def test_short_row_is_malformed(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("text,label\nhello,a\nworld\nagain,b\n")
    with pytest.raises(DataError, match=r"row 2: has 1 fields, the header has 2 \(line 3\)"):
        run_ingest(src)


# ---------------------------------------------------------------- skip mode and the CLI

def write_params(path: Path, **ingest_kw) -> Path:
    path.write_text(yaml.safe_dump({"base": {"seed": 3}, "ingest": ingest_kw}))
    return path


def test_skip_mode_lists_every_rejected_row_and_counts_it(tmp_path):
    recs = rows(30)
    for r in recs:
        r["part"] = "train"
    recs[2]["text"] = " "
    recs[5]["label"] = None
    recs[7].update(part="test", label="warranty")
    recs[9].update(part="test")
    src = write_csv(tmp_path / "d.csv", recs)
    src.write_bytes(src.read_bytes().replace(b"ticket number 12 ", b"ticket \xfe\xfe 12 "))
    params = write_params(tmp_path / "params.yaml", split_column="part", on_bad_row="skip", id_column="ticket_id")
    out, metrics = tmp_path / "ingested", tmp_path / "m" / "ingest.json"
    assert main(["--source", str(src), "--out", str(out), "--metrics", str(metrics), "--params", str(params)]) == 0
    rej = pd.read_csv(out / "rejected.csv", keep_default_na=False)
    assert rej[["row", "field", "reason"]].values.tolist() == [
        [3, "text", "empty_text"], [6, "label", "missing_label"], [8, "label", "unseen_label"],
        [12, "text", "undecodable_bytes"]]
    assert list(rej.columns) == ["file", "row", "field", "reason", "detail", "text"]
    assert rej["text"].iloc[1] == recs[5]["text"]
    assert rej["text"].iloc[3] == "ticket \\xfe\\xfe 12 about billing"  # raw bytes shown, file stays UTF-8
    m = read_json(metrics)
    assert m["rows_read"] == 30 and m["rejected"] == 4
    assert m["rejected_by_reason"] == {"empty_text": 1, "missing_label": 1, "undecodable_bytes": 1,
                                       "unseen_label": 1}
    splits, labels = read_dataset(out)
    assert sum(m["rows"].values()) == 26 == sum(len(df) for df in splits.values())
    assert list(splits["test"]["id"]) == [recs[9]["ticket_id"]]
    assert (out / "hashes.json").exists() and labels == LABELS


def test_failing_ingest_leaves_no_output_and_exits_2(tmp_path, capsys):
    recs = rows(6)
    recs[3]["text"] = ""
    src = write_csv(tmp_path / "d.csv", recs)
    params = write_params(tmp_path / "params.yaml")
    out, metrics = tmp_path / "ingested", tmp_path / "ingest.json"
    assert main(["--source", str(src), "--out", str(out), "--metrics", str(metrics), "--params", str(params)]) == 2
    assert "row 4: field 'text'" in capsys.readouterr().err
    assert not out.exists() and not metrics.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_command_line_source_wins_over_params(tmp_path):
    src = write_csv(tmp_path / "d.csv", rows(20))
    params = write_params(tmp_path / "params.yaml", source="does/not/exist.csv")
    out = tmp_path / "ingested"
    assert main(["--source", str(src), "--out", str(out), "--metrics", str(tmp_path / "m.json"),
                 "--params", str(params)]) == 0
    splits, _ = read_dataset(out)
    assert sum(len(df) for df in splits.values()) == 20


def test_parquet_integer_labels_become_strings(tmp_path):
    src = tmp_path / "d.parquet"
    pd.DataFrame({"text": [f"t{i}" for i in range(10)], "label": [i % 2 for i in range(10)]}).to_parquet(src)
    res = run_ingest(src)
    assert res.labels == ["0", "1"]
    p = dataclasses.replace(IngestParams(), text_column="text")
    assert p.label_column == "label"


def test_row_numbers_survive_quoted_newlines_crlf_and_blank_lines(tmp_path):
    src = tmp_path / "d.csv"
    # record 1 spans two lines; a blank line is not a record; record 3 has empty text (line 6)
    src.write_bytes(b'text,label\r\n"first line\r\nsecond line",a\r\n\r\nok,b\r\n"",a\r\nfine,b\r\n')
    err = error_of(src)
    assert_names(err, src, 3, "text")
    assert "(line 6)" in str(err)
    res = run_ingest(src, on_bad_row="skip", split={"train": 1.0, "validation": 0.0, "test": 0.0})
    assert list(res.splits["train"]["id"]) == ["d:1", "d:2", "d:4"]
    assert res.splits["train"]["text"].iloc[0] == "first line\r\nsecond line"


def test_tsv_and_parquet_bytes_report_undecodable_cells(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_bytes(b"text\tlabel\nfine text\ta\nbroken \x80 text\tb\nmore\ta\n")
    err = error_of(tsv)
    assert_names(err, tsv, 2, "text")
    assert "byte offset %d" % tsv.read_bytes().index(b"\x80") in str(err)
    pq = tmp_path / "d.parquet"
    pd.DataFrame({"text": [b"ok one", b"ok two", b"bad \xc3\x28 utf8"], "label": ["a", "b", "a"]}).to_parquet(pq)
    err = error_of(pq)
    assert_names(err, pq, 3, "text")
    assert "byte offset 4 of the cell" in str(err)


def test_parquet_bytes_that_are_not_utf8_in_any_used_column_are_reported(tmp_path):
    # Label and id columns too (they used to crash the Parquet writer with a bare UnicodeEncodeError).
    pq = tmp_path / "d.parquet"
    pd.DataFrame({"ticket": [b"t1", b"t\xff2", b"t3", b"t4", b"t5"], "text": ["one", "two", "three", "four", "five"],
                  "label": [b"a", b"b", b"b\xfe", b"a", b"b"], "unused": [b"\xff", b"x", b"y", b"z", b"w"]}).to_parquet(pq)
    err = error_of(pq, id_column="ticket")
    assert_names(err, pq, 2, "ticket")
    assert "byte offset 1 of the cell" in str(err)
    res = run_ingest(pq, id_column="ticket", on_bad_row="skip", split={"train": 1.0, "validation": 0.0, "test": 0.0})
    rejected = res.rejected.set_index("row")
    assert sorted(rejected.index) == [2, 3]  # the bad byte in an unused column costs nothing
    assert rejected.loc[2, "field"] == "ticket" and rejected.loc[3, "field"] == "label"
    assert set(rejected["reason"]) == {"undecodable_bytes"}
    assert sorted(res.splits["train"]["id"]) == ["t1", "t4", "t5"]


@pytest.mark.parametrize("section,bad", [("evaluate", {"gate_typo": 1}), ("export", {"variants": ["float", "int9"]}),
                                         ("finetune", {"lr": "fast"})])
def test_a_typo_in_a_later_section_stops_the_first_stage(tmp_path, capsys, section, bad):
    """A bad key under evaluate/export/finetune costs seconds: ingest (the first stage) refuses it before reading
    the source, with the params' own one-line error, and writes nothing."""
    src = write_csv(tmp_path / "d.csv", rows(20))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base": {"seed": 3}, "ingest": {}, section: bad}))
    out, metrics = tmp_path / "ingested", tmp_path / "ingest.json"
    assert main(["--source", str(src), "--out", str(out), "--metrics", str(metrics), "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and section in err[0], err
    assert not out.exists() and not metrics.exists()


# ---------------------------------------------------------------- ingest.feedback: labels fed back from live traffic

FB = "labels/feedback/feedback.csv"
NAMED = "labels/feedback/named.csv"  # a file the user names must exist (the default one may be absent: no labels yet)


def feedback_project(tmp_path, monkeypatch, fb_rows: list[dict] | None, source_rows=None, **ingest_kw):
    """A project folder (the stage's cwd, as under DVC) with tickets.csv, params.yaml and, unless None,
    labels/feedback/feedback.csv holding `fb_rows` (id,text,label)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "tickets.csv", source_rows or rows(60))
    if fb_rows is not None:
        (tmp_path / "labels/feedback").mkdir(parents=True)
        (tmp_path / FB).write_text("id,text,label\n" + "".join(f"{r['id']},{r['text']},{r['label']}\n"
                                                              for r in fb_rows))
    write_params(tmp_path / "params.yaml", **{"id_column": "ticket_id", "feedback": FB, **ingest_kw})
    return ["--source", "tickets.csv", "--out", "ingested", "--metrics", "ingest.json", "--params", "params.yaml"]


def fb_rows(n: int, start: int = 1) -> list[dict]:
    return [{"id": f"req-{i}", "text": f"live request {i} about {LABELS[i % 3]}", "label": LABELS[i % 3]}
            for i in range(start, start + n)]


def split_of(folder) -> dict[str, str]:
    splits, _ = read_dataset(folder)
    return {i: s for s, df in splits.items() for i in df["id"]}


def test_feedback_rows_join_by_the_sticky_rule_and_dedupe_removes_copies_of_training_rows(tmp_path, monkeypatch):
    from stages import dedupe

    no_fb = feedback_project(tmp_path / "a", monkeypatch, None)
    (tmp_path / "a/params.yaml").write_text(yaml.safe_dump({"base": {"seed": 3}, "ingest": {"id_column": "ticket_id"}}))
    assert main(no_fb) == 0
    before = split_of(tmp_path / "a/ingested")

    fb = fb_rows(40)
    train_row = next(r for r in rows(60) if before[r["ticket_id"]] == "train")
    fb.append({"id": "req-copy", "text": train_row["text"].upper(), "label": train_row["label"]})  # a copy
    argv = feedback_project(tmp_path / "b", monkeypatch, fb)
    assert main(argv) == 0
    after = split_of(tmp_path / "b/ingested")
    assert {i: after[i] for i in before} == before  # the source's rows keep their splits
    share = {"train": 0.8, "validation": 0.1, "test": 0.1}
    assert {r["id"]: after[r["id"]] for r in fb} == {r["id"]: rule(hash_u(3, r["id"]), share) for r in fb}
    m = read_json(tmp_path / "b/ingest.json")
    assert m["feedback_rows"] == 41 and m["split_method"] == "hash" and sum(m["rows"].values()) == 101
    assert m["files"][FB] == {"records": 41, "kept": 41, "rejected": 0, "multiline_rows": 0}
    # the copy of a training row is dedupe's to remove, as any duplicate
    assert dedupe.main(["--in", "ingested", "--out", "deduped", "--metrics", "dedupe.json",
                        "--params", "params.yaml"]) == 0
    removed = pd.read_csv(tmp_path / "b/deduped/removed.csv")
    assert set(removed["id"]) & {"req-copy", train_row["ticket_id"]} and len(removed) == 1


def test_feedback_of_a_source_with_its_own_splits_is_split_by_the_rule(tmp_path, monkeypatch):
    src = rows(60)
    for i, r in enumerate(src):
        r["part"] = ("test", "validation", "train", "train", "train")[i % 5]
    fb = fb_rows(50)
    assert main(feedback_project(tmp_path, monkeypatch, fb, src, split_column="part")) == 0
    got = split_of(tmp_path / "ingested")
    assert {r["ticket_id"]: got[r["ticket_id"]] for r in src} == {r["ticket_id"]: r["part"] for r in src}
    share = {"train": 0.8, "validation": 0.1, "test": 0.1}
    assert {r["id"]: got[r["id"]] for r in fb} == {r["id"]: rule(hash_u(3, r["id"]), share) for r in fb}
    assert read_json(tmp_path / "ingest.json")["feedback_rows"] == 50


def test_the_default_feedback_file_absent_means_no_labels_yet(tmp_path, monkeypatch):
    assert main(feedback_project(tmp_path, monkeypatch, None)) == 0
    assert read_json(tmp_path / "ingest.json")["feedback_rows"] == 0


def test_a_header_only_feedback_file_adds_nothing(tmp_path, monkeypatch):
    assert main(feedback_project(tmp_path, monkeypatch, [])) == 0  # the default file, shipped header-only
    m = read_json(tmp_path / "ingest.json")
    assert m["feedback_rows"] == 0 and sum(m["rows"].values()) == 60 and FB not in m["files"]
    (tmp_path / NAMED).write_text("id,text,label\n")  # a file the user named is read, and listed, even empty
    write_params(tmp_path / "params.yaml", id_column="ticket_id", feedback=NAMED)
    shutil.rmtree(tmp_path / "ingested")
    assert main(["--source", "tickets.csv", "--out", "ingested", "--metrics", "ingest.json", "--params",
                 "params.yaml"]) == 0
    m = read_json(tmp_path / "ingest.json")
    assert m["files"][NAMED] == {"records": 0, "kept": 0, "rejected": 0, "multiline_rows": 0}


FEEDBACK_ERRORS = [  # (feedback file body or None for no file, the error line after "ingest: error: ")
    (None, f"{NAMED}: file not found; ingest.feedback names it (create it with the header 'id,text,label', or "
           "set ingest.feedback: null)"),
    ("id,text\nr1,hello\n", f"{FB}: field 'label': column missing; columns found: ['id', 'text']"),
    ("id,text,label\nr1,fine,billing\nr2, ,login\n", f"{FB}: row 2: field 'text': text is empty or whitespace only"),
    ("id,text,label\nr1,fine,billing\nr2,no label,\n", f"{FB}: row 2: field 'label': label is missing"),
    ("id,text,label\nT0003,reused id,billing\n", f"{FB}: row 1: field 'id': id 'T0003' already used by tickets.csv row 3"),
]


@pytest.mark.parametrize("body, expected", FEEDBACK_ERRORS)
def test_a_bad_feedback_file_is_one_line_naming_file_row_and_field_exit_2_nothing_written(
        tmp_path, monkeypatch, capsys, body, expected):
    argv = feedback_project(tmp_path, monkeypatch, None, **({"feedback": NAMED} if body is None else {}))
    if body is not None:
        (tmp_path / "labels/feedback").mkdir(parents=True)
        (tmp_path / FB).write_text(body)
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ingest: error: ")]
    assert len(err) == 1 and err[0].startswith("ingest: error: " + expected), err
    assert not (tmp_path / "ingested").exists() and not (tmp_path / "ingest.json").exists()


@pytest.mark.parametrize("path", ["feedback.csv", "data/feedback/x.csv", "labels/feedback/../x.csv",
                                  "/abs/labels/feedback/x.csv", "labels/feedback/x.tsv"])
def test_feedback_outside_the_tracked_folder_is_refused(path):
    with pytest.raises(ParamsError, match=r"ingest\.feedback: must be a \.csv file in labels/feedback/"):
        IngestParams(feedback=path)
    assert IngestParams(feedback="labels/feedback/x.csv").feedback == "labels/feedback/x.csv"


def test_ingest_reports_text_lengths_in_the_models_tokens(tmp_path):
    """metrics/ingest.json: p50/p95/max length in base.model's tokens and the share over base.max_length, over
    all rows and per split (the base.long_text decision)."""
    from domaintune.modeling.encoders import load_tokenizer, resolve_model

    recs = rows(40)
    for i in range(0, 40, 4):  # every 4th text is long: 60 words
        recs[i]["text"] = " ".join(["card"] * 60)
    src = write_csv(tmp_path / "d.csv", recs)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base": {"seed": 3, "max_length": 32, "chunk_overlap": 8}, "ingest": {"id_column": "ticket_id"}}))
    metrics = tmp_path / "ingest.json"
    assert main(["--source", str(src), "--out", str(tmp_path / "out"), "--metrics", str(metrics),
                 "--params", str(params)]) == 0
    lt = read_json(metrics)["length_tokens"]
    tok = load_tokenizer(resolve_model("minilm"))
    lengths = [len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in recs]
    assert lt["all"]["texts"] == 40 and lt["all"]["max"] == 60 == max(lengths)
    assert lt["all"]["p50"] == float(np.percentile(lengths, 50)) and lt["all"]["max_length"] == 32
    assert lt["all"]["share_over_max_length"] == 0.25  # the 10 texts of 60 tokens are over 32 - [CLS], [SEP]
    assert sum(lt[s]["texts"] for s in ("train", "validation", "test")) == 40
