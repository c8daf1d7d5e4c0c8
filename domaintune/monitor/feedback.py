"""Feedback labels (delayed labels): score each version that answered live traffic, and keep the labelled rows.

`domaintune feedback FILE` (pipelines/feedback.py) runs:
1. read_feedback: FILE's `id,label` rows (CSV, TSV, JSONL or Parquet, read by the project's one reader per kind;
   the monitor's review queue data/review_queue.csv as it is: its `label` column, empty until a reviewer fills
   it; a row whose label is empty is not reviewed yet and is skipped, counted). A `text` column is kept if present.
2. join: the prediction log lines (domaintune/predict/log.py) of those ids, the latest per (id, version): every
   version that answered each id (served, shadow and predict lines alike).
3. problems: every id that no log holds, every id given twice, every label outside the label set of the versions
   that answered it (their logged probabilities name their labels: the export's labels.json) - each one line
   naming file, row and field; with any, nothing is written.
4. score: per version, accuracy, macro-F1 and ECE of its logged calibrated probabilities against the labels
   (domaintune.evaluate.calibration.single_label_metrics, the evaluate stage's own numbers).
compare_on_feedback: the paired difference in accuracy between two versions on the ids both answered, with a
seeded 95% bootstrap interval (the server's guard judges shadowed requests with monitor/guard.py instead, which
uses these labels through feedback_labels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from domaintune.core.errors import DataError, missing_column
from domaintune.data.sources import read_file
from domaintune.evaluate.calibration import single_label_metrics
from domaintune.monitor.guard import bootstrap_mean
from domaintune.predict.log import log_files, read_records

SOURCE_COLUMNS = ("id", "text", "label")  # the feedback source ingest reads (ingest.feedback)
HISTORY_COLUMNS = ("time", "file", "sha256", "version", "rows", "accuracy", "macro_f1", "ece")
# Every accepted label by id (text or not), appended by `domaintune feedback`: what the guard and
# `promote --from-shadow` judge live requests with (the feedback source keeps only rows with a text).
LABELS_LEDGER = Path("reports") / "feedback_labels.csv"


def feedback_labels(root: Path) -> dict[str, str]:
    """id -> label of every feedback label recorded under `root` (the latest wins); empty when there are none."""
    import csv

    path = Path(root) / LABELS_LEDGER
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", newline="") as fh:
        return {str(r["id"]): str(r["label"]) for r in csv.DictReader(fh) if r.get("id") and r.get("label")}


@dataclass
class Label:
    row: int             # the row number a person uses in the feedback file
    id: str
    label: str
    text: str | None = None


@dataclass
class Feedback:
    labels: list[Label] = field(default_factory=list)
    unlabelled: int = 0  # rows with an empty label (a review queue row not reviewed yet)


def _cell(v) -> str | None:
    """A cell as text: None for missing, blank or NaN; a whole float as an integer."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    v = str(v).strip()
    return v or None


def read_feedback(path: Path, id_column: str = "id", label_column: str = "label",
                  text_column: str = "text") -> Feedback:
    """The labelled rows of a feedback file (module doc); a bad file or cell raises DataError."""
    table = read_file(Path(path))
    for col in (id_column, label_column):
        if col not in table.frame.columns:
            raise missing_column(path, col, table.frame.columns)
    for i, problems in sorted(table.bad.items()):
        for fld, reason, detail in problems:
            if fld in (None, id_column, label_column, text_column) or reason == "malformed_row":
                raise DataError(path, table.rows[i], fld, detail)
    texts = table.frame[text_column].tolist() if text_column in table.frame.columns else [None] * len(table.rows)
    out = Feedback()
    for row, rid, lab, text in zip(table.rows, table.frame[id_column].tolist(), table.frame[label_column].tolist(),
                                   texts):
        lab = _cell(lab)
        if lab is None:
            out.unlabelled += 1
            continue
        text = text if isinstance(text, str) and text.strip() else None
        out.labels.append(Label(row, _cell(rid) or "", lab, text))
    return out


def read_logs(sources: list[Path], ids: set[str]) -> dict[str, dict[str, dict]]:
    """{id: {version: its latest log record}} for these ids, from the logs at `sources` (files or folders)."""
    found: dict[str, dict[str, dict]] = {}
    files = [f for src in sources for f in log_files(src)]
    for _, _, rec in read_records(files):
        if rec["id"] not in ids:
            continue
        mine = found.setdefault(rec["id"], {})
        old = mine.get(rec["version"])
        if old is None or str(rec.get("time", "")) >= str(old.get("time", "")):
            mine[rec["version"]] = rec
    return found


def problems(path: Path, fb: Feedback, logged: dict[str, dict[str, dict]], id_column: str = "id",
             label_column: str = "label") -> list[DataError]:
    """Every reason not to record this feedback, one per row and field (module doc)."""
    out, first = [], {}
    for lab in fb.labels:
        if not lab.id:
            out.append(DataError(path, lab.row, id_column, "empty id"))
            continue
        if lab.id in first:
            out.append(DataError(path, lab.row, id_column, f"id {lab.id!r} also on row {first[lab.id]}"))
            continue
        first[lab.id] = lab.row
        answers = logged.get(lab.id)
        if not answers:
            out.append(DataError(path, lab.row, id_column, f"unknown id {lab.id!r}: no prediction log holds it"))
            continue
        allowed = {name for rec in answers.values() for name in rec["probabilities"]}
        if lab.label not in allowed:
            versions = ", ".join(sorted(answers))
            out.append(DataError(path, lab.row, label_column, f"label {lab.label!r} is not a label of {versions} "
                                 f"(labels: {', '.join(sorted(allowed))})"))
    return out


def joined_rows(fb: Feedback, logged: dict[str, dict[str, dict]]) -> list[dict]:
    """One row per (labelled id, version that answered it): id, version, role, true label, predicted label,
    the version's labels and calibrated probabilities. What score_versions and compare_on_feedback read."""
    rows = []
    for lab in fb.labels:
        for version, rec in sorted(logged.get(lab.id, {}).items()):
            rows.append({"id": lab.id, "version": version, "role": rec.get("role"), "label": lab.label,
                         "predicted": rec["label"], "labels": list(rec["probabilities"]),
                         "probabilities": list(rec["probabilities"].values()),
                         "multi_label": rec.get("problem_type") == "multi_label"})
    return rows


def score_versions(rows: list[dict]) -> dict[str, dict]:
    """Per version: rows, accuracy, macro-F1 and ECE against the feedback labels (single-label classifiers; a
    version's label set is the one it logged; a multi-label version is scored on exact label-set match)."""
    by_version: dict[str, list[dict]] = {}
    for r in rows:
        by_version.setdefault(r["version"], []).append(r)
    out = {}
    for version, rs in sorted(by_version.items()):
        roles = sorted({r["role"] for r in rs if r["role"]})
        if any(r["multi_label"] for r in rs):
            acc = float(np.mean([r["predicted"] == r["label"] for r in rs]))
            out[version] = {"rows": len(rs), "accuracy": acc, "macro_f1": None, "ece": None, "roles": roles}
            continue
        labels = list(rs[0]["labels"])
        for r in rs:  # labels of this version's other lines, then feedback labels it never predicts
            labels += [x for x in [*r["labels"], r["label"]] if x not in labels]
        index = {lab: j for j, lab in enumerate(labels)}
        probs = np.zeros((len(rs), len(labels)))
        for i, r in enumerate(rs):
            probs[i, [index[x] for x in r["labels"]]] = r["probabilities"]
        y = np.array([index[r["label"]] for r in rs])
        m = single_label_metrics(probs, y, len(labels))
        out[version] = {"rows": len(rs), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "ece": m["ece"],
                        "roles": roles}
    return out


def compare_on_feedback(rows: list[dict], version_a: str, version_b: str, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict:
    """The paired difference in feedback accuracy, b - a (a: the champion), on the ids both versions answered,
    with a seeded percentile bootstrap interval over those ids (monitor.guard.bootstrap_mean, the guard's own).
    `rows`: joined_rows' rows (id, version, label, predicted).
    Returns {"rows", "a", "b", "diff", "low", "high", "level", "resamples", "seed"}; with no shared id, rows 0
    and None for the numbers."""
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples must be >= 1 and level in (0, 1), got {resamples}, {level}")
    correct: dict[str, dict[str, bool]] = {version_a: {}, version_b: {}}
    for r in rows:
        if r["version"] in correct:
            correct[r["version"]][r["id"]] = r["predicted"] == r["label"]
    shared = sorted(set(correct[version_a]) & set(correct[version_b]))
    out = {"rows": len(shared), "a": None, "b": None, "diff": None, "low": None, "high": None, "level": level,
           "resamples": resamples, "seed": seed}
    if not shared:
        return out
    a = np.array([correct[version_a][i] for i in shared], dtype=float)
    b = np.array([correct[version_b][i] for i in shared], dtype=float)
    boot = bootstrap_mean(b - a, resamples, seed, level)  # the guard's one bootstrap of a paired difference
    return {**out, "a": float(a.mean()), "b": float(b.mean()), "diff": boot["diff"], "low": boot["low"],
            "high": boot["high"]}
