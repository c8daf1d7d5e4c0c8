"""`domaintune feedback`: delayed labels scored per version from the prediction logs, kept for the next retrain;
a file with unknown ids, duplicate ids or labels outside the label set is refused whole, one line per problem."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from domaintune.predict.log import PredictionLog, records
from pipelines.cli import main

TEXTS = ["refund my order", "where is my parcel", "reset my password", "parcel 12 is late"]
TRUTH = ["refund", "shipping", "password", "shipping"]
LABELS = ["password", "refund", "shipping"]
# v1 (served) right on 0, 1, 2; v2 (its shadow) right on 0 and 3; predict run by v1 on another id
V1 = [[0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.6, 0.2, 0.2], [0.5, 0.1, 0.4]]
V2 = [[0.2, 0.7, 0.1], [0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]
IDS = ["a1", "a2", "a3", "a4"]


@pytest.fixture()
def repo(tmp_path):
    root = tmp_path / "repo"
    logs = root / "reports" / "predictions"
    serve = PredictionLog(logs / "serve.jsonl", text="plain")
    for version, probs, role in (("v1.0.0", V1, "served"), ("v1.1.0", V2, "shadow")):
        p = np.array(probs)
        serve.write(records(IDS, TEXTS, version, LABELS, p, [LABELS[i] for i in p.argmax(1)], role=role,
                            source="serve", text="plain"))
    # a predict run, hashed text: its row is scored but cannot join the feedback source
    PredictionLog(logs / "predict.jsonl").write(records(["b1"], ["my card was charged twice"], "v1.0.0", LABELS,
                                                        np.array([[0.2, 0.7, 0.1]]), ["refund"], role="predict",
                                                        source="predict"))
    return root


def write_csv(path, rows):
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def written(root) -> list:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                  and "reports/predictions" not in p.as_posix())


def test_feedback_scores_each_version_and_keeps_rows_with_text(repo, tmp_path, capsys):
    fb = write_csv(tmp_path / "labels.csv", [("id", "label"), *zip(IDS, TRUTH), ("b1", "refund")])
    assert main(["feedback", str(fb), "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    got = json.loads((repo / "metrics" / "feedback.json").read_text())
    assert got["labelled"] == 5 and set(got["versions"]) == {"v1.0.0", "v1.1.0"}
    v1, v2 = got["versions"]["v1.0.0"], got["versions"]["v1.1.0"]
    assert v1["rows"] == 5 and v1["accuracy"] == pytest.approx(4 / 5) and v1["roles"] == ["predict", "served"]
    assert v2["rows"] == 4 and v2["accuracy"] == pytest.approx(2 / 4) and v2["roles"] == ["shadow"]
    # v2 predicts password, refund, refund, shipping for refund, shipping, password, shipping:
    # F1 password 0, refund 2/3 (P 1/2, R 1), shipping 2/3 (P 1, R 1/2)
    assert v2["macro_f1"] == pytest.approx((0 + 2 / 3 + 2 / 3) / 3)
    # ECE over 15 bins: a1 and a3 share the 0.7 bin (one right: |.5 - .7|), a2 |0 - .9|, a4 |1 - .8|
    assert v2["ece"] == pytest.approx((2 * 0.2 + 0.9 + 0.2) / 4)
    with (repo / "reports" / "feedback_history.csv").open(newline="") as fh:
        hist = list(csv.DictReader(fh))
    assert [(h["version"], h["rows"]) for h in hist] == [("v1.0.0", "5"), ("v1.1.0", "4")]
    with (repo / "labels" / "feedback" / "feedback.csv").open(newline="") as fh:
        assert [tuple(r.values()) for r in csv.DictReader(fh)] == list(zip(IDS, TEXTS, TRUTH))
    assert "v1.1.0: 4 labelled predictions, accuracy 0.5000" in out
    assert "4 rows added to" in out and "1 rows without text" in out
    # again: scored again, nothing added twice
    assert main(["feedback", str(fb), "--repo", str(repo)]) == 0
    assert "0 rows added" in capsys.readouterr().out and len((repo / "labels" / "feedback" / "feedback.csv").read_text().splitlines()) == 5


def test_the_review_queue_is_accepted_as_it_is_and_ingest_feedback_is_where_rows_go(repo, tmp_path, capsys):
    """The monitor's review queue (its columns, unreviewed rows with an empty label) is a feedback file; its
    text column carries the text; params.yaml's ingest.feedback names the source."""
    from domaintune.monitor.monitoring import REVIEW_COLUMNS

    (repo / "params.yaml").write_text("ingest:\n  feedback: labels/feedback/fb.csv\n")
    q = write_csv(tmp_path / "review_queue.csv", [REVIEW_COLUMNS, ("b1", "charged twice on my card", "refund",
                                                                   "refund", "0.41", "b.csv", "ab12"),
                                                  ("a2", TEXTS[1], "", "password", "0.38", "b.csv", "ab12")])
    assert main(["feedback", str(q), "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "1 rows with an empty label skipped" in out
    assert json.loads((repo / "metrics" / "feedback.json").read_text())["versions"]["v1.0.0"]["rows"] == 1
    assert (repo / "labels" / "feedback" / "fb.csv").read_text() == "id,text,label\nb1,charged twice on my card,refund\n"
    assert not (repo / "labels" / "feedback" / "feedback.csv").exists()


@pytest.mark.parametrize("rows, lines", [
    ([("a1", "refund"), ("zz9", "refund")], ["row 2: field 'id': unknown id 'zz9': no prediction log holds it"]),
    ([("a1", "refund"), ("a2", "shipping"), ("a1", "refund")], ["row 3: field 'id': id 'a1' also on row 1"]),
    ([("a1", "refunds")], ["row 1: field 'label': label 'refunds' is not a label of v1.0.0, v1.1.0 "
                           "(labels: password, refund, shipping)"]),
    ([("zz9", "refund"), ("a1", "billing"), ("a1", "refund")],
     ["row 1: field 'id': unknown id 'zz9'", "row 2: field 'label': label 'billing'", "row 3: field 'id': id 'a1'"]),
])
def test_a_bad_feedback_file_is_one_line_per_problem_exit_2_and_nothing_written(repo, tmp_path, capsys, rows,
                                                                               lines):
    fb = write_csv(tmp_path / "labels.csv", [("id", "label"), *rows])
    before = written(repo)
    assert main(["feedback", str(fb), "--repo", str(repo)]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert cap.out == "" and len(err) == len(lines)
    for got, want in zip(err, lines):
        assert got.startswith(f"domaintune feedback: {fb}: {want}"), got
    assert written(repo) == before  # no metrics/feedback.json, no history, no feedback source
