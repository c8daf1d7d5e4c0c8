"""The audit stage for base.task: generation with a declared label set (classification as generation):
cleanlab's label audit runs on the response as the label, as it does for a classifier (embeddings of the
prompts from the causal LM itself), next to the generation checks. Planted label errors are found and
acted on by audit.action; a response outside the label set is one line, exit 2, no output."""
from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import yaml

from domaintune.data.dataset import write_dataset

TOPICS = {
    "billing": ["invoice", "charged twice", "refund", "payment failed", "receipt", "VAT number"],
    "login": ["password", "two-factor code", "locked out", "sign in", "reset link", "SSO login"],
    "shipping": ["parcel", "tracking number", "delivery address", "courier", "package late", "customs"],
}
PLANTED = ["train-3", "train-17", "train-28", "train-41"]


def _split(name: str, n: int, seed: int) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % 3]
        words = rng.sample(TOPICS[label], 3)
        rows.append((f"{name}-{i}", f"Hello, question about my {words[0]}, the {words[1]} and the {words[2]}, "
                                    f"ticket {rng.randint(100, 999)}.", label, name))
    return pd.DataFrame(rows, columns=["id", "text", "label", "split"])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from domaintune.modeling import tinyllm

    root = tmp_path_factory.mktemp("genaudit")
    splits = {"train": _split("train", 60, 0), "validation": _split("validation", 12, 1), "test": _split("test", 12, 2)}
    train = splits["train"].set_index("id")
    for rid in PLANTED:  # the planted errors: a billing/login/shipping prompt with another label
        labels = list(TOPICS)
        train.loc[rid, "label"] = labels[(labels.index(train.loc[rid, "label"]) + 1) % 3]
    splits["train"] = train.reset_index()
    write_dataset(root / "deduped", splits, [])
    texts = [t for df in splits.values() for t in df["text"]] + list(TOPICS)
    model = tinyllm.save(root / "tiny", texts * 2, seed=1)
    (root / "decisions.csv").write_text("id,decision,corrected_label\n")
    return root, model


def _audit(root, model, tmp, label_set, action="drop"):
    from stages.audit import main

    (tmp / "params.yaml").write_text(yaml.safe_dump({
        "base": {"task": "generation", "model": str(model), "max_length": 64, "seed": 0, "device": "cpu"},
        "audit": {"action": action, "min_score": 0.9, "decisions": str(root / "decisions.csv"), "C": 10.0},
        "evaluate": {"label_set": label_set}}))
    return main(["--params", str(tmp / "params.yaml"), "--in", str(root / "deduped"), "--out", str(tmp / "audited"),
                 "--report", str(tmp / "report"), "--metrics", str(tmp / "audit.json"), "--embeddings",
                 str(tmp / "emb")])


def test_cleanlab_finds_the_planted_label_errors_and_drops_them(project, tmp_path):
    from domaintune.data.dataset import read_dataset

    root, model = project
    assert _audit(root, model, tmp_path, list(TOPICS)) == 0
    m = json.loads((tmp_path / "audit.json").read_text())
    issues = pd.read_csv(tmp_path / "report" / "label_issues.csv")
    flagged = set(issues.loc[issues["split"] == "train", "id"])
    assert len(flagged & set(PLANTED)) >= 3 and len(flagged - set(PLANTED)) <= 2  # recall 3/4, at most 2 false
    la = m["label_audit"]
    assert la["issues_found"] == len(flagged) and la["rows_acted_on"]["dropped"] == len(flagged)
    assert la["label_set"] == list(TOPICS) and la["encoder"].startswith("base:")
    out, labels = read_dataset(tmp_path / "audited")
    assert labels == [] and len(out["train"]) == 60 - len(flagged) and not flagged & set(out["train"]["id"])
    assert len(out["validation"]) == 12 and len(out["test"]) == 12  # held-out rows are never changed
    # the generation checks still run and are reported next to cleanlab's files
    assert set(m["issues"]) == {"response_truncated", "near_empty_response", "near_duplicate_prompt", "length_outlier"}
    assert m["issues"]["near_empty_response"] == 84  # every one-word label is a near-empty response
    for f in ("generation_issues.csv", "label_scores.csv", "changes.csv", "decisions_applied.csv"):
        assert (tmp_path / "report" / f).is_file()
    changes = pd.read_csv(tmp_path / "report" / "changes.csv")
    assert set(changes["id"]) == flagged and set(changes["change"]) == {"dropped"}


def test_without_a_label_set_nothing_is_removed(project, tmp_path):
    root, model = project
    assert _audit(root, model, tmp_path, []) == 0
    m = json.loads((tmp_path / "audit.json").read_text())
    assert "label_audit" not in m and m["rows"]["train"] == 60
    assert not (tmp_path / "report" / "label_issues.csv").exists()


def test_a_response_outside_the_label_set_is_one_line_and_exit_2(project, tmp_path, capsys):
    root, model = project
    assert _audit(root, model, tmp_path, ["billing", "login"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.parquet" in err[0] and "row 3" in err[0] and "'shipping'" in err[0]
    assert "is not in evaluate.label_set" in err[0]
    assert not (tmp_path / "audited").exists() and not (tmp_path / "audit.json").exists()
