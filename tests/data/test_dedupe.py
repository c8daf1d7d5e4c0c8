"""Data tests for the dedupe stage: exact, conflicting, leaked and near-duplicate rows on crafted data."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import yaml

from domaintune.core.errors import DataError
from domaintune.core.io import read_json
from domaintune.core.params import DedupeParams
from domaintune.data.dataset import read_dataset, write_dataset
from domaintune.data.dedupe import dedupe
from domaintune.data.textnorm import normalise, normalise_all, shingles
from stages.dedupe import main

EXACT = DedupeParams(near_duplicates=False)


def frame(split: str, recs) -> pd.DataFrame:
    return pd.DataFrame([{"id": i, "text": t, "label": lab, "split": split} for i, t, lab in recs],
                        columns=["id", "text", "label", "split"])


def dataset(train, validation=(), test=()) -> dict[str, pd.DataFrame]:
    return {"train": frame("train", train), "validation": frame("validation", validation),
            "test": frame("test", test)}


def removed_of(result) -> dict[str, tuple[str, str]]:
    return {r.id: (r.reason, r.kept_id) for r in result.removed.itertuples()}


# Long enough that one changed word keeps the word-3-gram Jaccard above 0.8.
# (44 words: a one-word edit changes only a few of its 42 shingles)
LONG = ("my card was charged twice for the same order last week and the second charge still shows "
        "as pending on my statement so please refund it as soon as you can because my rent is due "
        "on friday and i cannot afford to wait")


def test_normalise_folds_unicode_case_and_whitespace():
    assert normalise("  Ｈｅｌｌｏ\u00a0 WORLD\t\n ") == "hello world"
    assert normalise("STRASSE") == normalise("straße")
    assert normalise("ﬁle") == "file"
    assert normalise("ǰ") == normalise("J\u030c") == "\u01f0"  # casefold output re-composed (NFKC again)


def test_ascii_fast_path_matches_the_unicode_path():
    import random
    import unicodedata

    rng = random.Random(0)
    alphabet = "aZ09 \t\n\r\x0b\x0c.,-_'\"~" + "".join(chr(c) for c in range(32, 127))
    for _ in range(2000):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        slow = " ".join(unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", t).casefold()).split())
        assert normalise(t) == slow, repr(t)
    mixed = ["ＡＢＣ  def", "ǰ", "Straße\u00a0X", "plain ASCII\t text "]
    assert normalise_all(mixed) == [normalise(t) for t in mixed] == ["abc def", "\u01f0", "strasse x", "plain ascii text"]


def test_exact_duplicates_within_a_split_keep_the_first():
    res = dedupe(dataset([("a", "Reset my password", "login"), ("b", "reset  my PASSWORD ", "login"),
                          ("c", "Ｒｅｓｅｔ my password", "login"), ("d", "where is my parcel", "shipping"),
                          ("e", "refund please, the parcel never arrived", "billing")],
                         test=[("t1", "refund please", "billing"), ("t2", "Refund please", "billing")]), EXACT, 0)
    assert removed_of(res) == {"b": ("exact_duplicate", "a"), "c": ("exact_duplicate", "a"),
                               "t2": ("exact_duplicate", "t1")}
    assert list(res.splits["train"]["id"]) == ["a", "d", "e"]
    assert res.splits["train"]["text"].iloc[0] == "Reset my password"  # stored text is never normalised


CONFLICT = [("a", "cancel it", "billing"), ("b", "Cancel it", "shipping"), ("c", "cancel  it", "billing"),
            ("d", "tie case", "billing"), ("e", "TIE case", "shipping"), ("f", "plain row", "shipping")]


def test_conflict_policy_majority_keeps_majority_first_and_drops_ties():
    res = dedupe(dataset(CONFLICT), dataclasses.replace(EXACT, conflict_policy="majority"), 0)
    assert removed_of(res) == {"b": ("label_conflict", "a"), "c": ("exact_duplicate", "a"),
                               "d": ("label_conflict", ""), "e": ("label_conflict", "")}
    assert list(res.splits["train"]["id"]) == ["a", "f"]


def test_conflict_policy_majority_keeps_first_row_of_majority_label_even_if_minority_comes_first():
    recs = [("a", "same text", "x"), ("b", "same text", "y"), ("c", "Same text", "y"), ("d", "other", "x")]
    res = dedupe(dataset(recs), dataclasses.replace(EXACT, conflict_policy="majority"), 0)
    assert removed_of(res) == {"a": ("label_conflict", "b"), "c": ("exact_duplicate", "b")}


def test_conflict_policy_drop_removes_every_copy():
    res = dedupe(dataset(CONFLICT + [("g", "other", "billing")]), dataclasses.replace(EXACT, conflict_policy="drop"), 0)
    assert removed_of(res) == {k: ("label_conflict", "") for k in "abcde"}
    assert list(res.splits["train"]["id"]) == ["f", "g"]


def test_conflict_policy_error_names_both_ids_file_and_row():
    with pytest.raises(DataError) as exc:
        dedupe(dataset(CONFLICT), dataclasses.replace(EXACT, conflict_policy="error"), 0,
               files={"train": "in/train.parquet", "validation": "v", "test": "t"})
    err = exc.value
    assert (err.file, err.row, err.field) == ("in/train.parquet", 2, "label")
    assert "'b'" in str(err) and "'a'" in str(err) and "'shipping'" in str(err) and "'billing'" in str(err)


def test_cross_split_leaks_leave_validation_and_test():
    res = dedupe(dataset([("a", "track my order", "shipping"), ("b", "change my email", "login")],
                         validation=[("v1", "Track my order", "shipping"), ("v2", "new phone who dis", "login")],
                         test=[("t1", "CHANGE my email", "login"), ("t2", "new phone  who dis", "login"),
                               ("t3", "unseen test text", "shipping")]), EXACT, 0)
    assert removed_of(res) == {"v1": ("cross_split_leak", "a"), "t1": ("cross_split_leak", "b"),
                               "t2": ("cross_split_leak", "v2")}
    assert list(res.splits["train"]["id"]) == ["a", "b"]  # train is never cut
    assert list(res.splits["test"]["id"]) == ["t3"]


def test_near_duplicates_and_near_leaks_remove_exactly_the_expected_ids():
    near = LONG.replace("last week", "yesterday")        # Jaccard 0.84 with LONG
    far = LONG.replace("twice", "thrice").replace("pending", "posted").replace("rent", "bill")  # Jaccard 0.6
    train = [("a", LONG, "billing"), ("b", near, "billing"), ("c", far, "billing"),
             ("d", near.upper(), "refund"),               # near copy with another label: audit's job, kept
             ("e", "where is my parcel it was due on monday and tracking has not moved since", "shipping"),
             ("f", "i forgot my password and the reset link never arrives", "login")]
    test = [("t1", "where is my parcel it was due on monday and tracking has not moved since friday", "shipping"),
            ("t2", "how do i change the email on my account", "login"),
            ("t3", "an invoice question nobody else asks", "billing")]
    validation = [("v1", "how do i change the email on my account please", "login")]
    p = DedupeParams(near_duplicates=True, jaccard_threshold=0.8, num_perm=128, shingle_size=3,
                     on_empty_class="drop")
    res = dedupe(dataset(train, validation, test), p, 0)
    # d is an exact (normalised) copy of b with another label: a conflict; majority ties -> both dropped,
    # so the near-duplicate pass only sees a, c, e in train.
    assert removed_of(res) == {"b": ("label_conflict", ""), "d": ("label_conflict", ""),
                               "t1": ("near_leak", "e"), "t2": ("near_leak", "v1")}
    p_drop_far = dataclasses.replace(p, jaccard_threshold=0.5)
    res2 = dedupe(dataset([r for r in train if r[0] != "d"], validation, test), p_drop_far, 0)
    assert removed_of(res2) == {"b": ("near_duplicate", "a"), "c": ("near_duplicate", "a"),
                                "t1": ("near_leak", "e"), "t2": ("near_leak", "v1")}


def test_near_duplicate_with_another_label_is_kept_and_exact_jaccard_decides():
    near = LONG.replace("last week", "yesterday")
    res = dedupe(dataset([("a", LONG, "billing"), ("b", near, "billing"), ("c", near + " thanks", "refund"),
                          ("z", "unrelated words entirely", "refund")]), DedupeParams(jaccard_threshold=0.8), 0)
    assert removed_of(res) == {"b": ("near_duplicate", "a")}
    off = dedupe(dataset([("a", LONG, "billing"), ("b", near, "billing"), ("z", "unrelated", "refund")]),
                 DedupeParams(near_duplicates=False), 0)
    assert off.removed.empty


def test_label_emptied_from_train_stops_or_with_drop_removes_its_evaluation_rows():
    data = dataset([("a", "x one", "p"), ("b", "X ONE", "q"), ("c", "y two", "r"), ("d", "z three", "p")],
                   test=[("t1", "something about q", "q"), ("t2", "about p", "p")])
    with pytest.raises(DataError) as exc:
        dedupe(data, dataclasses.replace(EXACT, conflict_policy="drop"), 0)
    assert str(exc.value) == (
        "train.parquet: field 'label': dedupe would leave class 'q' with no train rows (rows in: {'train': 1, "
        "'validation': 0, 'test': 1}; train rows removed: {'label_conflict': 1}); set dedupe.on_empty_class: drop "
        "to drop it from every split")
    res = dedupe(data, dataclasses.replace(EXACT, conflict_policy="drop", on_empty_class="drop"), 0)
    assert removed_of(res) == {"a": ("label_conflict", ""), "b": ("label_conflict", ""),
                               "t1": ("label_absent_from_train", "")}
    assert res.labels == ["p", "r"]


def test_a_split_emptied_by_dedupe_stops_it_with_the_counts():
    # every test row leaks from train: test would be empty, and evaluate would only fail much later
    data = dataset([("a", "reset my password", "login"), ("b", "where is my parcel", "shipping")],
                   validation=[("v", "a validation text", "login")],
                   test=[("t1", "Reset my password", "login"), ("t2", "where is my  parcel", "shipping")])
    with pytest.raises(DataError) as exc:
        dedupe(data, EXACT, 0, files={"train": "in/train.parquet", "validation": "in/validation.parquet",
                                       "test": "in/test.parquet"})
    assert str(exc.value) == ("in/test.parquet: dedupe would remove all 2 rows of the test split (cross_split_leak "
                              "2); an empty test split is refused")


# ---------------------------------------------------------------- the stage: manifest, hashes, no partial output

def ingested(tmp_path, name, splits) -> str:
    folder = tmp_path / name
    write_dataset(folder, splits, sorted(set(splits["train"]["label"])))
    return str(folder)


def run_main(tmp_path, in_dir, out_name, **dedupe_kw):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"base": {"seed": 1}, "dedupe": {"near_duplicates": False, **dedupe_kw}}))
    out = tmp_path / out_name
    rc = main(["--in", in_dir, "--out", str(out), "--metrics", str(tmp_path / f"{out_name}.json"),
               "--params", str(params)])
    return rc, out


BASE = dataset([(f"r{i}", f"text number {i}", "ab"[i % 2]) for i in range(12)] + [("dup", "TEXT number 3", "b")],
               validation=[("v1", "text number 5", "b"), ("v2", "validation only", "a")],
               test=[("t1", "test only", "a"), ("t2", "another test", "b")])


def test_manifest_counts_every_removal_and_hashes_the_output(tmp_path):
    rc, out = run_main(tmp_path, ingested(tmp_path, "in", BASE), "deduped")
    assert rc == 0
    man = read_json(out / "manifest.json")
    hashes = read_json(out / "hashes.json")
    assert man["dataset_sha256"] == hashes["dataset"]
    assert man["splits"]["train"] == {"rows_in": 13, "rows_out": 12, "sha256": hashes["train"],
                                      "removed": {"exact_duplicate": 1}}
    assert man["splits"]["validation"] == {"rows_in": 2, "rows_out": 1, "sha256": hashes["validation"],
                                           "removed": {"cross_split_leak": 1}}
    assert man["input"]["sha256"] == read_json(tmp_path / "in" / "hashes.json")
    assert man["params"]["conflict_policy"] == "majority" and man["params"]["seed"] == 1
    removed = pd.read_csv(out / "removed.csv", keep_default_na=False)
    assert list(removed.columns) == ["id", "split", "reason", "kept_id", "text", "label"]
    assert removed[["id", "reason", "kept_id"]].values.tolist() == [["dup", "exact_duplicate", "r3"],
                                                                    ["v1", "cross_split_leak", "r5"]]
    m = read_json(tmp_path / "deduped.json")
    assert m["removed"]["exact_duplicate"] == 1 and m["removed"]["cross_split_leak"] == 1
    assert m["rows_out"] == {"train": 12, "validation": 1, "test": 2} and m["removed_total"] == 2
    splits, labels = read_dataset(out)
    assert labels == ["a", "b"] and len(splits["train"]) == 12


def test_manifest_hash_is_order_independent_and_changes_iff_content_changes(tmp_path):
    def hashes_for(name, splits):
        rc, out = run_main(tmp_path, ingested(tmp_path, f"in_{name}", splits), f"out_{name}")
        assert rc == 0
        man = read_json(out / "manifest.json")
        return {s: man["splits"][s]["sha256"] for s in man["splits"]} | {"dataset": man["dataset_sha256"]}

    ref = hashes_for("ref", BASE)
    shuffled = {s: df.sample(frac=1.0, random_state=3) for s, df in BASE.items()}
    # shuffled, with the duplicate still after its original so the same row is kept
    shuffled["train"] = pd.concat([shuffled["train"][shuffled["train"]["id"] != "dup"],
                                   BASE["train"][BASE["train"]["id"] == "dup"]])
    assert hashes_for("shuffled", shuffled) == ref
    edited = {s: df.copy() for s, df in BASE.items()}
    edited["test"].loc[0, "text"] = "test only, edited"
    changed = hashes_for("edited", edited)
    assert changed["test"] != ref["test"] and changed["dataset"] != ref["dataset"]
    assert changed["train"] == ref["train"] and changed["validation"] == ref["validation"]


def test_failing_dedupe_leaves_no_output_dir(tmp_path, capsys):
    conflict = dataset(CONFLICT)
    rc, out = run_main(tmp_path, ingested(tmp_path, "in", conflict), "deduped", conflict_policy="error")
    assert rc == 2
    assert "label" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "deduped.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".deduped")]


def test_a_stage_run_that_would_empty_a_split_exits_2_and_writes_nothing(tmp_path, capsys):
    leaky = dataset([("a", "reset my password", "login"), ("b", "where is my parcel", "shipping")],
                    validation=[("v", "a validation text", "login")],
                    test=[("t1", "Reset my password", "login"), ("t2", "where is my  parcel", "shipping")])
    in_dir = ingested(tmp_path, "in", leaky)
    rc, out = run_main(tmp_path, in_dir, "deduped")
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [
        f"dedupe: error: {in_dir}/test.parquet: dedupe would remove all 2 rows of the test split (cross_split_leak 2); "
        "an empty test split is refused"]
    assert not out.exists() and not (tmp_path / "deduped.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_vectorised_minhash_equals_datasketch_update_batch():
    from datasketch import MinHash

    from domaintune.data.textnorm import minhash_signatures

    texts = [LONG, "short", "a b c d e f g", normalise("Ｒｅｓｅｔ my password now please")]
    sets = [shingles(t, 3) for t in texts]
    sig = minhash_signatures(sets, 64, seed=5, chunk=7)  # tiny chunks: exercise the chunk boundaries
    for row, s in zip(sig, sets):
        ref = MinHash(num_perm=64, seed=5)
        ref.update_batch(list(s))
        assert (row == ref.hashvalues).all()
    assert sig.dtype.name == "uint32" and sig.shape == (4, 64)


def test_duplicate_ids_in_the_input_are_refused():
    with pytest.raises(DataError, match=r"test.parquet: row 1: field 'id': id 'a' appears more than once"):
        dedupe(dataset([("a", "x", "p"), ("b", "y", "q")], test=[("a", "z", "p")]), EXACT, 0)


def test_exact_path_agrees_with_pandas_drop_duplicates_on_random_data():
    import random

    rng = random.Random(1)
    base = [" ".join(rng.choice(["card", "refund", "Parcel", "login", "ÉTÉ", "ﬁle"]) for _ in range(4))
            for _ in range(40)]
    variants = [str.upper, str.lower, lambda t: "  " + t.replace(" ", "\t ") + " ", lambda t: t]
    recs = {s: [] for s in ("train", "validation", "test")}
    for i in range(400):
        j = rng.randrange(len(base))
        s = rng.choices(list(recs), weights=[8, 1, 1])[0]
        recs[s].append((f"r{i}", rng.choice(variants)(base[j]), f"label{j % 3}" if j % 7 else "label_x"))
    recs["validation"].append(("vu", "words seen only in validation", "label0"))  # splits never emptied
    recs["test"].append(("tu", "words seen only in test", "label0"))
    splits = dataset(recs["train"], recs["validation"], recs["test"])
    res = dedupe(splits, EXACT, 0)
    allrows = pd.concat(splits.values(), ignore_index=True)
    allrows["norm"] = [normalise(t) for t in allrows["text"]]
    within = allrows.drop_duplicates(subset=["split", "norm"])
    train = set(within.loc[within["split"] == "train", "norm"])
    val = within[(within["split"] == "validation") & ~within["norm"].isin(train)]
    test = within[(within["split"] == "test") & ~within["norm"].isin(train | set(val["norm"]))]
    assert list(res.splits["train"]["id"]) == list(within.loc[within["split"] == "train", "id"])
    assert list(res.splits["validation"]["id"]) == list(val["id"])
    assert list(res.splits["test"]["id"]) == list(test["id"])
    assert len(res.removed) == 402 - sum(len(df) for df in res.splits.values())


def test_near_duplicates_just_above_the_threshold_are_all_found():
    """LSH is only a candidate filter; banded at the threshold itself it misses pairs near it.

    60 pairs of distinct 60-word texts, each pair differing in a few words so that the exact
    word-3-gram Jaccard lies in [0.80, 0.86]: every second copy must be removed.
    """
    import random

    from datasketch import MinHashLSH

    from domaintune.data.textnorm import jaccard, minhash_signatures, minhashes

    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(5000)]
    pairs = []
    while len(pairs) < 60:
        words = rng.sample(vocab, 60)
        edited = list(words)
        for pos in rng.sample(range(3, 57), 2):
            edited[pos] = rng.choice(vocab)
        a, b = " ".join(words), " ".join(edited)
        if 0.80 <= jaccard(shingles(a, 3), shingles(b, 3)) <= 0.86:
            pairs.append((a, b))
    train = [(f"p{k}{side}", text, "x") for k, pair in enumerate(pairs) for side, text in zip("ab", pair)]
    train.append(("other", "a second class", "y"))
    p = DedupeParams(near_duplicates=True, jaccard_threshold=0.8, num_perm=128, shingle_size=3)
    res = dedupe(dataset(train), p, 0)
    assert removed_of(res) == {f"p{k}b": ("near_duplicate", f"p{k}a") for k in range(len(pairs))}

    # The same pairs through LSH banded at the threshold: some are never even candidates,
    # which is why the stage bands lower.
    sets = [shingles(t, 3) for _, t, lab in train if lab == "x"]
    mh = minhashes(minhash_signatures(sets, 128, 0), 128, 0)
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    for k in range(0, len(mh), 2):
        lsh.insert(k, mh[k])
    missed = sum(k not in lsh.query(mh[k + 1]) for k in range(0, len(mh), 2))
    assert missed > 0
