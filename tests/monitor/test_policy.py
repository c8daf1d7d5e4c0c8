"""monitor.on_drift (domaintune.monitor.policy): the decision as a pure function, and the history's action
column (an older history without it stays readable)."""
from __future__ import annotations

import csv

import pytest

from domaintune.monitor.policy import action_text, decide, retrain_command


def verdict(drifted: bool, drop_significant: bool, estimated: float = 0.80) -> dict:
    return {"drift": drifted or drop_significant,
            "signals": {"n_words": {"drifted": drifted}, "embeddings_mmd": {"drifted": False}},
            "accuracy": {"estimated": estimated, "ci_low": estimated - 0.05, "ci_high": estimated + 0.05,
                         "reference_estimated": 0.92, "drop_significant": drop_significant, "reliable": True,
                         "significance": f"the drop is {'' if drop_significant else 'not '}significant"}}


@pytest.mark.parametrize("drifted, drop, retrain", [(True, False, False), (False, True, False), (True, True, True),
                                                     (False, False, False)])
def test_retrain_needs_a_drift_alarm_and_an_estimated_accuracy_drop(drifted, drop, retrain):
    d = decide(verdict(drifted, drop), "retrain", None)
    assert d["retrain"] is retrain and d["review"]
    assert d["evidence"]["drifted_signals"] == (["n_words"] if drifted else [])
    assert d["evidence"]["accuracy_drop"] is drop
    if retrain:
        assert d["reason"].startswith("retrain: drift in n_words and an estimated-accuracy drop")
    else:
        assert d["reason"].startswith("no retrain: needs a drift alarm and an estimated-accuracy drop")
        assert ("a drift alarm" in d["reason"].split("drop, ", 1)[1]) is not drifted


def test_retrain_below_is_the_accuracy_evidence_when_set():
    """monitor.retrain_below replaces the significance test: under it (with drift) retrains, over it does not
    even when the drop is significant; without drift neither."""
    assert decide(verdict(True, False, 0.70), "retrain", 0.75)["retrain"]
    over = decide(verdict(True, True, 0.80), "retrain", 0.75)
    assert not over["retrain"] and "not under monitor.retrain_below 0.75" in over["reason"]
    assert not decide(verdict(False, True, 0.70), "retrain", 0.75)["retrain"]


def test_report_queues_nothing_and_review_never_retrains():
    both = verdict(True, True)
    report, review = decide(both, "report", None), decide(both, "review", None)
    assert not report["review"] and not report["retrain"]
    assert review["review"] and not review["retrain"]
    assert report["reason"] == "monitor.on_drift is report: no retrain"
    no_estimate = decide({"signals": {"x": {"drifted": True}}, "accuracy": None}, "retrain", None)
    assert not no_estimate["retrain"] and "no accuracy estimate" in no_estimate["reason"]


def test_the_action_text_and_the_retrain_command():
    assert action_text(None, None) == "none"
    assert action_text(3, None) == "review queued 3"
    assert action_text(0, {"kind": "local", "pid": 7, "log": "reports/r.log"}) == \
        "review queued 0; retrain started pid 7 (log reports/r.log)"
    assert action_text(None, {"kind": "deployment", "deployment": "domaintune-retrain/x", "flow_run_id": "abc"}) == \
        "retrain deployment domaintune-retrain/x run abc"
    cmd = retrain_command("/p", None)
    assert cmd[1:] == ["-m", "pipelines.cli", "retrain", "--repo", "/p"]
    assert retrain_command("/p", "echo 'a b'") == ["echo", "a b", "--repo", "/p"]


def test_an_older_history_without_the_action_column_is_upgraded_and_keeps_its_rows(tmp_path):
    from domaintune.monitor.monitoring import HISTORY_COLUMNS, append_history, seen_hashes

    path = tmp_path / "monitor_history.csv"
    old = [c for c in HISTORY_COLUMNS if c != "action"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=old)
        w.writeheader()
        w.writerow({c: "" for c in old} | {"time": "t0", "index": 0, "batch": "a.csv", "sha256": "aa", "drift": 1,
                                           "alarm": "command exit 0"})
    append_history(path, None, "b.csv", "bb", error="bad", action="")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(HISTORY_COLUMNS)
    assert [(r["batch"], r["drift"], r["alarm"], r["action"], r["error"]) for r in rows] == [
        ("a.csv", "1", "command exit 0", "", ""), ("b.csv", "", "", "", "bad")]
    assert seen_hashes(path) == {"aa", "bb"}
