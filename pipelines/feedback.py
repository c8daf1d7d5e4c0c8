"""`domaintune feedback FILE`: delayed labels for logged predictions, scored per version and kept for retraining.

    domaintune feedback labels.csv                 # id,label rows (a text column is used when present)
    domaintune feedback data/review_queue.csv      # the monitor's review queue, once reviewers filled `label`

FILE's ids are looked up in the prediction logs `serve` and `predict` write (reports/predictions/ under --repo,
rotated files included; --log adds others). Every id no log holds, every id given twice and every label
outside the label set of the versions that answered it is one line naming file, row and field, exit 2, and
nothing is written. Then (domaintune/monitor/feedback.py):
- metrics/feedback.json (replaced atomically): per version that answered those ids, rows, accuracy, macro-F1
  and ECE on the labelled live traffic;
- reports/feedback_history.csv: one line per version appended (time, file, sha256, version, rows, metrics);
- reports/feedback_labels.csv: every accepted id and label appended (with or without a text): the labels the
  guard and `domaintune promote --from-shadow` judge live requests by;
- the feedback source (params.yaml ingest.feedback, else labels/feedback/feedback.csv; `id,text,label`, rewritten
  atomically) gets each labelled row with its text - FILE's text column, else the text a log stored
  (`--log-text plain`); a row without either is scored but not added, and the command says how many. An id
  the source holds already is not added again. Ingest reads the source on the next retrain; dedupe removes
  rows that duplicate training rows as usual.
"""
from __future__ import annotations

import csv
import io
import sys
from datetime import datetime, timezone
from pathlib import Path

from domaintune.core.errors import DataError, ParamsError
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import load_params

LOGS = "reports/predictions"          # where serve and predict log by default (under --repo)
METRICS = "metrics/feedback.json"
HISTORY = "reports/feedback_history.csv"
SOURCE = "labels/feedback/feedback.csv"  # the feedback source when params.yaml sets no ingest.feedback


def register(add) -> None:
    p = add("feedback", cmd_feedback, "score each version on delayed labels (id,label rows) of logged predictions "
                                      "and keep the labelled rows for the next retrain",
            "domaintune feedback labels.csv", "domaintune feedback data/review_queue.csv",
            "domaintune feedback labels.csv --log /var/log/domaintune/serve.jsonl")
    p.add_argument("file", help="id,label rows (CSV, TSV, JSONL or Parquet); the monitor's review queue as it is")
    p.add_argument("--log", action="append", default=None, metavar="PATH",
                   help=f"a prediction log file or folder to read as well as {LOGS}/ (repeatable)")
    p.add_argument("--id-column", default="id", help="column holding the prediction ids (default: id)")
    p.add_argument("--label-column", default="label", help="column holding the labels (default: label)")
    p.add_argument("--text-column", default="text", help="column holding the texts, if any (default: text)")


def source_path(root: Path) -> Path:
    """params.yaml's ingest.feedback (relative to the project), else labels/feedback/feedback.csv."""
    try:
        configured = getattr(load_params(root / "params.yaml", "ingest"), "feedback", None)
    except ParamsError:
        if (root / "params.yaml").exists():
            raise
        configured = None
    return root / (configured or SOURCE)


def run(args) -> dict:
    # lazy: loads numpy, pandas
    from domaintune.monitor import feedback as fbk

    # lazy: loads only hashlib, but keeps this module's import light
    from domaintune.predict.log import file_sha256

    root, path = Path(args.repo), Path(args.file)
    fb = fbk.read_feedback(path, args.id_column, args.label_column, args.text_column)
    if not fb.labels:
        raise DataError(path, None, args.label_column, f"no labelled rows ({fb.unlabelled} rows with an empty label)")
    logs = [root / LOGS, *map(Path, args.log or [])]
    logged = fbk.read_logs(logs, {lab.id for lab in fb.labels})
    bad = fbk.problems(path, fb, logged, args.id_column, args.label_column)
    if bad:
        raise FeedbackRefused(bad)
    rows = fbk.joined_rows(fb, logged)
    scores = fbk.score_versions(rows)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    sha = file_sha256(path)
    source = source_path(root)
    added, known, textless = _new_source_rows(source, fb, logged)
    report = {"time": now, "file": str(path), "sha256": sha, "labelled": len(fb.labels),
              "unlabelled": fb.unlabelled, "versions": scores}
    with atomic_output(root / METRICS) as tmp:
        write_json(tmp, report)
    _append_history(root / HISTORY, [[now, str(path), sha, v, s["rows"], s["accuracy"], s["macro_f1"], s["ece"]]
                                     for v, s in scores.items()])
    if added:
        _add_to_source(source, added)
    _append_ledger(root / fbk.LABELS_LEDGER, [[lab.id, lab.label, now] for lab in fb.labels])
    return {**report, "source": str(source), "added": len(added), "already": known, "textless": textless}


class FeedbackRefused(DataError):
    """Every problem of a feedback file (each its own line); nothing was written."""

    def __init__(self, problems: list[DataError]):
        self.problems = problems
        super().__init__(problems[0].file, None, None, "\n".join(str(p) for p in problems))


def _new_source_rows(source: Path, fb, logged) -> tuple[list[list[str]], int, int]:
    """(rows to add to the feedback source, labelled ids it holds already, labelled rows without a text)."""
    have = set()
    if source.is_file():
        with source.open(encoding="utf-8", newline="") as fh:
            have = {row.get("id") for row in csv.DictReader(fh)}
    add, known, textless = [], 0, 0
    for lab in fb.labels:
        text = lab.text or next((r["text"] for r in logged[lab.id].values() if isinstance(r.get("text"), str)), None)
        if text is None:
            textless += 1
        elif lab.id in have:
            known += 1
        else:
            add.append([lab.id, text, lab.label])
    return add, known, textless


def _add_to_source(source: Path, rows: list[list[str]]) -> None:
    old = source.read_text(encoding="utf-8") if source.is_file() else ""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if not old.strip():
        old = ""
        w.writerow(["id", "text", "label"])
    elif not old.endswith("\n"):
        buf.write("\n")
    w.writerows(rows)
    source.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(source) as tmp:
        Path(tmp).write_text(old + buf.getvalue(), encoding="utf-8")


def _append_ledger(path: Path, rows: list[list[str]]) -> None:
    """Every accepted label, with or without a text (the guard's labels: monitor.feedback.feedback_labels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if new:
        w.writerow(["id", "label", "time"])
    w.writerows(rows)
    with path.open("a", encoding="utf-8", newline="") as fh:
        fh.write(buf.getvalue())


def _append_history(path: Path, rows: list[list]) -> None:
    # lazy: light, keeps the CLI's import of this module free of the library
    from domaintune.monitor.feedback import HISTORY_COLUMNS

    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if new:
        w.writerow(HISTORY_COLUMNS)
    w.writerows([[("" if x is None else round(x, 6) if isinstance(x, float) else x) for x in r] for r in rows])
    with path.open("a", encoding="utf-8", newline="") as fh:
        fh.write(buf.getvalue())


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def cmd_feedback(args) -> int:
    try:
        result = run(args)
    except FeedbackRefused as exc:
        for p in exc.problems:
            print(f"domaintune feedback: {p}", file=sys.stderr)  # one line each; nothing was written
        return 2
    except (DataError, ParamsError, ValueError) as exc:
        print(f"domaintune feedback: {exc}", file=sys.stderr)
        return 2
    if result["unlabelled"]:
        print(f"domaintune feedback: {result['unlabelled']} rows with an empty label skipped (not reviewed yet)")
    for v, s in result["versions"].items():
        print(f"domaintune feedback: {v}: {s['rows']} labelled predictions, accuracy {_num(s['accuracy'])}, "
              f"macro-F1 {_num(s['macro_f1'])}, ECE {_num(s['ece'])}")
    print(f"domaintune feedback: scores in {METRICS}, history in {HISTORY}")
    print(f"domaintune feedback: {result['added']} rows added to {result['source']}"
          + (f", {result['already']} already there" if result["already"] else "")
          + (f"; {result['textless']} rows without text (no text column, log stored none) scored but not added"
             if result["textless"] else ""))
    return 0
