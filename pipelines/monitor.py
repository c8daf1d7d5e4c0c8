"""Monitor flow: compare a new batch of texts (and the served model's predictions) with the drift baseline.

Reads a file of texts (CSV/TSV/JSONL/Parquet with a text column, or .txt with
one text per line), profiles it exactly like the drift stage profiled train,
runs evidently's drift tests per feature plus the prediction-distribution and
confidence checks, and writes report.html + verdict.json to --out. Exit code 0
for no drift, 1 for drift (so cron/CI can act on it), 2 for bad input.

    python -m pipelines.monitor --batch new_tickets.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from prefect import flow, get_run_logger, task

from domaintune.data import DataError, atomic_output, write_json
from domaintune.params import ParamsError


def read_batch(path: str | Path, text_column: str = "text") -> list[str]:
    """The texts of a batch file: .txt (one per line) or anything ingest reads (csv, tsv, jsonl,
    parquet), with ingest's row numbering and undecodable-byte reporting."""
    from domaintune.sources import read_file

    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "batch file not found")
    if path.suffix.lower() == ".txt":
        texts = path.read_text(encoding="utf-8").splitlines()
        rows = list(range(1, len(texts) + 1))
    else:
        table = read_file(path)
        if text_column not in table.frame.columns:
            raise DataError(path, None, text_column, f"column missing; columns are {list(table.frame.columns)}")
        for i, problems in sorted(table.bad.items()):
            for field, _, detail in problems:
                if field in (None, text_column):
                    raise DataError(path, table.rows[i], field or text_column, detail)
        texts, rows = table.frame[text_column].tolist(), table.rows
    for text, row in zip(texts, rows):
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, row, text_column, "empty or missing text")
    return texts


@task(name="compare-batch")
def compare(batch: str, baseline: str, model: str, params_file: str, text_column: str, out: str) -> dict:
    from domaintune.params import load_params
    from stages.drift import Baseline, compare_batch

    params = load_params(params_file, "drift")
    texts = read_batch(batch, text_column)
    with atomic_output(out) as tmp:
        tmp.mkdir(parents=True)
        verdict = compare_batch(Baseline(baseline), texts, model, params, params.batch_size,
                                html_path=tmp / "report.html")
        verdict["batch"] = str(batch)
        write_json(tmp / "verdict.json", verdict)
    return verdict


@flow(name="domaintune-monitor")
def monitor_flow(batch: str, repo: str = ".", baseline: str = "models/drift_baseline", model: str = "models/export",
                 out: str = "reports/monitor", text_column: str = "text") -> dict:
    root = Path(repo).resolve()
    verdict = compare(str(root / batch), str(root / baseline), str(root / model), str(root / "params.yaml"),
                      text_column, str(root / out))
    log = get_run_logger()
    if verdict["drift"]:
        log.warning("DRIFT: %s", "; ".join(verdict["reasons"]))
    else:
        log.info("no drift (%d rows, %.0f%% of features drifted)", verdict["rows"], 100 * verdict["drifted_share"])
    return verdict


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch", required=True, help="file of new texts (csv, tsv, jsonl, parquet, txt)")
    ap.add_argument("--repo", default=".")
    ap.add_argument("--baseline", default="models/drift_baseline")
    ap.add_argument("--model", default="models/export")
    ap.add_argument("--out", default="reports/monitor", help="folder for report.html and verdict.json")
    ap.add_argument("--text-column", default="text")


def run_from_args(args) -> int:
    try:
        v = monitor_flow(args.batch, args.repo, args.baseline, args.model, args.out, args.text_column)
    except (DataError, ParamsError, FileNotFoundError) as exc:  # as the stages do: bad input -> exit 2
        print(f"monitor: error: {exc}", file=sys.stderr)
        return 2
    print(("DRIFT: " + "; ".join(v["reasons"])) if v["drift"] else
          f"no drift: {v['rows']} texts, {v['drifted_share']:.0%} of features drifted, "
          f"confidence {v['mean_confidence_current']:.3f} vs {v['mean_confidence_reference']:.3f}")
    print(f"report: {Path(args.repo) / args.out / 'report.html'}")
    return 1 if v["drift"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.monitor", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run_from_args(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
