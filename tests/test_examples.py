"""Data tests for the embedded example (examples/support_tickets).

They check the committed files against what README.md documents and against
the generator itself: sizes, class counts, reproducibility, and that every
piece of deliberate noise listed in noise.csv is really there (and nothing
unlisted is), so the dedupe and audit stages can be tested against it.
"""
from __future__ import annotations

import csv
import importlib.util
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EX = REPO / "examples" / "support_tickets"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_dataset", EX / "make_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_dataset"] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gen():
    return _load_generator()


@pytest.fixture(scope="module")
def ds(gen):
    """The generator's in-memory dataset: rows carry their template class (true_label)."""
    return gen.generate()


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def labelled():
    return _read_csv(EX / "labelled.csv")


@pytest.fixture(scope="module")
def noise():
    return _read_csv(EX / "noise.csv")


def _norm(text: str) -> str:
    # Written out here (not imported) so the test checks the generator independently.
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _shingles(text: str) -> frozenset:
    w = _norm(text).split()
    return frozenset(" ".join(w[i:i + 3]) for i in range(max(1, len(w) - 2)))


def _detail(d: str) -> dict:
    return dict(kv.split("=", 1) for kv in d.split(";"))


def _listed_pairs(labelled, noise, kind: str) -> list[tuple[dict, tuple[str, str], tuple[str, str]]]:
    """Every noise.csv entry of `kind` as (parsed detail, (text, label) of its row, (text, label) of detail['of'])."""
    rows = {r["ticket_id"]: (r["text"], r["label"]) for r in labelled}
    pairs = []
    for n in noise:
        if n["kind"] != kind:
            continue
        d = _detail(n["detail"])
        pairs.append((d, rows[n["ticket_id"]], rows[d["of"]]))
    assert pairs, f"noise.csv lists no {kind}"
    return pairs


# ---------------------------------------------------------------- files and schema
def test_files_exist_with_documented_columns(labelled, noise):
    for name in ("make_dataset.py", "labelled.csv", "noise.csv", "unlabelled.txt", "README.md"):
        assert (EX / name).is_file(), name
    assert list(labelled[0]) == ["ticket_id", "text", "label"]
    assert list(noise[0]) == ["ticket_id", "kind", "detail"]


def test_labelled_size_ids_and_text_lengths(labelled):
    assert 1100 <= len(labelled) <= 1300
    ids = [r["ticket_id"] for r in labelled]
    assert all(re.fullmatch(r"TCK-\d{6}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    lengths = [len(r["text"].split()) for r in labelled]
    assert min(lengths) >= 5 and max(lengths) <= 60
    assert all("\n" not in r["text"] and r["text"].strip() for r in labelled)
    # Varied, not one length: short terse tickets and long rambling ones both present.
    assert sum(n <= 12 for n in lengths) > 100 and sum(n >= 35 for n in lengths) > 50


def test_class_counts_match_readme_and_are_mildly_imbalanced(labelled):
    counts = Counter(r["label"] for r in labelled)
    assert len(counts) == 8
    # README.md's class table: | `label` | rows in labelled.csv | ... |
    readme = (EX / "README.md").read_text(encoding="utf-8")
    readme = readme.split("## Classes", 1)[1].split("\n## ", 1)[0]
    documented = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| `(\w+)` \| (\d+) \|", readme, re.M)}
    assert documented == dict(counts)
    ratio = max(counts.values()) / min(counts.values())
    assert 2.0 <= ratio <= 4.0, ratio


def test_unlabelled_corpus(labelled):
    lines = (EX / "unlabelled.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # file ends with a newline
    lines = lines[:-1]
    assert 2800 <= len(lines) <= 3200
    assert all(line.strip() for line in lines)
    norm = [_norm(x) for x in lines]
    assert len(set(norm)) == len(norm)
    # Never a labelled text verbatim (even up to normalisation): DAPT must not see test texts.
    assert not set(norm) & {_norm(r["text"]) for r in labelled}
    # In-domain: the product and its vocabulary run through it.
    joined = " ".join(norm)
    for word in ("ledgerly", "invoice", "stripe", "quickbooks", "xero", "api", "export", "refund"):
        assert word in joined, word


# ---------------------------------------------------------------- reproducibility
def test_generator_reproduces_committed_files_byte_for_byte(gen, tmp_path):
    assert gen.main(["--out", str(tmp_path)]) == 0
    for name in ("labelled.csv", "noise.csv", "unlabelled.txt"):
        assert (tmp_path / name).read_bytes() == (EX / name).read_bytes(), f"{name} differs: re-run make_dataset.py"


def test_generator_depends_on_seed(gen):
    a = gen.render(gen.generate(1))["labelled.csv"]
    b = gen.render(gen.generate(2))["labelled.csv"]
    assert a != b


# ---------------------------------------------------------------- noise
def test_noise_ids_exist_and_counts(labelled, noise):
    readme = (EX / "README.md").read_text(encoding="utf-8").split("## Deliberate noise", 1)[1]
    documented = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| `(\w+)` \| (\d+) \|", readme, re.M)}
    assert documented == dict(Counter(n["kind"] for n in noise))
    ids = {r["ticket_id"] for r in labelled}
    kinds = Counter(n["kind"] for n in noise)
    assert set(kinds) == {"exact_duplicate", "near_duplicate", "label_flip", "label_conflict"}
    n = len(labelled)
    assert 0.015 <= kinds["exact_duplicate"] / n <= 0.03
    assert 0.015 <= kinds["near_duplicate"] / n <= 0.03
    assert 0.03 <= kinds["label_flip"] / n <= 0.05
    assert 3 <= kinds["label_conflict"] <= 5
    for row in noise:
        assert row["ticket_id"] in ids
        d = _detail(row["detail"])
        if "of" in d:
            assert d["of"] in ids and d["of"] != row["ticket_id"]


def test_flipped_rows_carry_a_label_other_than_their_template_class(gen, ds, labelled, noise):
    by_id = {r.ticket_id: r for r in ds.rows}
    committed = {r["ticket_id"]: r for r in labelled}
    flips = [n for n in noise if n["kind"] == "label_flip"]
    for n in flips:
        row, d = by_id[n["ticket_id"]], _detail(n["detail"])
        assert committed[n["ticket_id"]]["label"] == row.label == d["given"]
        assert row.true_label == d["true"] != row.label
        assert row.label in gen.CONFUSABLE[row.true_label]  # plausible, not random
        # The text really came from a template of the true class: the template,
        # its slots as wildcards, matches the core sentence that is in the text.
        template = gen.CORE[row.true_label][row.template]
        pattern = re.escape(template)
        pattern = re.sub(r"\\\{\w+\\\}", ".+?", pattern)
        assert re.fullmatch(pattern, row.core, flags=re.I | re.S), (template, row.core)
        if not row.typos:
            assert _norm(row.core).rstrip(".!?") in _norm(row.text.replace("!", "."))
    # No other row is mislabelled.
    flipped = {n["ticket_id"] for n in flips}
    conflicts = {n["ticket_id"] for n in noise if n["kind"] == "label_conflict"}
    for r in ds.rows:
        if r.ticket_id not in flipped | conflicts:
            assert r.label == r.true_label, r.ticket_id


def test_exact_duplicates_fold_to_their_source(labelled, noise):
    variants = Counter()
    for d, (a, label_a), (b, label_b) in _listed_pairs(labelled, noise, "exact_duplicate"):
        assert _norm(a) == _norm(b)
        assert label_a == label_b
        assert (a == b) == (d["variant"] == "identical"), (d, a, b)
        if d["variant"] in ("nbsp", "fullwidth"):
            assert unicodedata.normalize("NFKC", a) != a  # only NFKC folds it
        variants[d["variant"]] += 1
    assert set(variants) == {"identical", "case", "whitespace", "nbsp", "fullwidth"}


def test_near_duplicates_are_near_and_not_exact(labelled, noise):
    for d, (a, label_a), (b, label_b) in _listed_pairs(labelled, noise, "near_duplicate"):
        assert _norm(a) != _norm(b)
        sa, sb = _shingles(a), _shingles(b)
        j = len(sa & sb) / len(sa | sb)
        assert j >= 0.88 and abs(j - float(d["jaccard"])) < 1e-3
        assert label_a == label_b


def test_conflicts_are_same_text_different_label(labelled, noise):
    for d, (a, label_a), (b, label_b) in _listed_pairs(labelled, noise, "label_conflict"):
        assert a == b
        assert label_a != label_b
        assert d["labels"] == f"{label_b}|{label_a}"


def test_no_unlisted_duplicates_or_near_duplicates(labelled, noise):
    """Every duplicate pair a dedupe could find is in noise.csv; all other pairs are far apart."""
    listed = set()
    for n in noise:
        d = _detail(n["detail"])
        if "of" in d:
            listed.add(frozenset((n["ticket_id"], d["of"])))
    ids = [r["ticket_id"] for r in labelled]
    sets = [_shingles(r["text"]) for r in labelled]
    post: dict[str, list[int]] = {}
    for i, s in enumerate(sets):
        for g in s:
            post.setdefault(g, []).append(i)
    close = set()
    for i, s in enumerate(sets):
        inter = Counter(j for g in s for j in post[g] if j > i)
        for j, k in inter.items():
            if k / (len(s) + len(sets[j]) - k) >= 0.6:
                close.add(frozenset((ids[i], ids[j])))
    assert close == listed


# ---------------------------------------------------------------- difficulty (real model)
@pytest.mark.slow
def test_frozen_minilm_probe_lands_in_the_documented_band(tmp_path):
    """~1 min: embeds the 1.1k distinct tickets with the bundled MiniLM, 5-fold CV logistic regression."""
    spec = importlib.util.spec_from_file_location("check_difficulty", EX / "check_difficulty.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "difficulty.json"
    assert mod.main(["--out", str(out)]) == 0
    import json

    acc = json.loads(out.read_text())["accuracy_vs_true_labels"]
    assert 0.85 <= acc <= 0.95, acc


# ---------------------------------------------------------------- the pipeline finds the noise
@pytest.fixture(scope="module")
def dedupe_removed(tmp_path_factory):
    """Run the real ingest + dedupe stages on the example (~10 s); the ids dedupe removed."""
    import pandas as pd

    from stages import dedupe, ingest

    tmp = tmp_path_factory.mktemp("example_dedupe")
    params = str(REPO / "params.yaml")
    assert ingest.main(["--params", params, "--source", str(EX / "labelled.csv"), "--out", str(tmp / "ing"),
                        "--metrics", str(tmp / "ing.json")]) == 0
    assert dedupe.main(["--params", params, "--in", str(tmp / "ing"), "--out", str(tmp / "dd"),
                        "--metrics", str(tmp / "dd.json")]) == 0
    return set(pd.read_csv(tmp / "dd" / "removed.csv")["id"])


def _pairs(noise, kinds):
    return [(n["ticket_id"], _detail(n["detail"])["of"]) for n in noise if n["kind"] in kinds]


def test_dedupe_removes_listed_exact_duplicates_and_conflicts_and_nothing_unlisted(dedupe_removed, noise):
    missed = [p for p in _pairs(noise, ("exact_duplicate", "label_conflict")) if not set(p) & dedupe_removed]
    assert not missed, missed
    listed = {i for p in _pairs(noise, ("exact_duplicate", "label_conflict", "near_duplicate")) for i in p}
    assert dedupe_removed <= listed, sorted(dedupe_removed - listed)
    # Label flips are audit's business: dedupe must not remove them.
    assert not {n["ticket_id"] for n in noise if n["kind"] == "label_flip"} & dedupe_removed


def test_dedupe_removes_every_listed_near_duplicate(dedupe_removed, noise):
    missed = [p for p in _pairs(noise, ("near_duplicate",)) if not set(p) & dedupe_removed]
    assert not missed, missed
