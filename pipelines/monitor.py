"""Monitor flow: compare a new batch of texts (and the served model's predictions) with the drift baseline.

Reads a file of texts (CSV/TSV/JSONL/Parquet with a text column, or .txt with
one text per line), profiles it exactly like the drift stage profiled train,
runs evidently's drift tests per feature plus the prediction-distribution and
confidence checks, and writes report.html + verdict.json to --out. Exit code 0
for no drift, 1 for drift (so cron/CI can act on it), 2 for bad input.

    python -m pipelines.monitor --batch new_tickets.csv
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from prefect import flow, get_run_logger, task

from domaintune.data import DataError, atomic_output, write_json


def read_batch(path: str | Path, text_column: str = "text") -> list[str]:
    """The texts of a batch file: .txt (one per line) or anything ingest reads (csv, tsv, jsonl,
    parquet), with ingest's row numbering and undecodable-byte reporting."""
    from domaintune.sources import read_file

    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "batch file not found" if not path.exists() else "not a file")
    if path.suffix.lower() == ".txt":
        texts = _read_lines(path)
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


def _read_lines(path: Path) -> list[str]:
    """One text per line of a UTF-8 file (a BOM is dropped); bad bytes are a DataError naming the line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(path, line, None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                                          "save the file as UTF-8") from None
    return text.splitlines()


def check_arguments(batch: str, repo: str = ".", baseline: str = "models/drift_baseline",
                    model: str = "models/export", out: str = "reports/monitor", text_column: str = "text") -> list[str]:
    """Everything that can be checked before a Prefect flow starts or a model loads: the folders exist,
    --out is not a file, and the batch reads (bad bytes, missing column, empty texts). Returns the texts."""
    from domaintune.params import load_params

    root = Path(repo)
    for flag, value in (("--baseline", baseline), ("--model", model)):
        if not (root / value).is_dir():
            raise DataError(root / value, None, None, f"{flag}: no such folder; run the pipeline (dvc repro) first")
    if (root / out).exists() and not (root / out).is_dir():
        raise DataError(root / out, None, None, "--out: exists and is not a folder")
    load_params(root / "params.yaml", "drift")  # a bad params.yaml fails here, naming file and key
    return read_batch(root / batch, text_column)


@task(name="compare-batch")
def compare(batch: str, baseline: str, model: str, params_file: str, text_column: str, out: str) -> dict:
    from domaintune.params import load_params
    from stages.drift import Baseline, compare_batch

    from domaintune.device import stage_device

    base, params = load_params(params_file, "base", "drift")
    texts = read_batch(batch, text_column)
    with atomic_output(out) as tmp:
        tmp.mkdir(parents=True)
        verdict = compare_batch(Baseline(baseline), texts, model, params, params.batch_size,
                                html_path=tmp / "report.html", device=stage_device(base))
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


def run_from_args(args) -> int:
    """`domaintune monitor`: arguments and the batch are checked before the flow starts; bad input
    raises (DataError, ParamsError: the caller prints one line, exit 2). Returns 1 on drift, else 0."""
    check_arguments(args.batch, args.repo, args.baseline, args.model, args.out, args.text_column)
    v = monitor_flow(args.batch, args.repo, args.baseline, args.model, args.out, args.text_column)
    print(("DRIFT: " + "; ".join(v["reasons"])) if v["drift"] else
          f"no drift: {v['rows']} texts, {v['drifted_share']:.0%} of features drifted, "
          f"confidence {v['mean_confidence_current']:.3f} vs {v['mean_confidence_reference']:.3f}")
    print(f"report: {Path(args.repo) / args.out / 'report.html'}")
    return 1 if v["drift"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pipelines.monitor ARGS` is `domaintune monitor ARGS` (same checks, messages, exit codes)."""
    from pipelines.cli import main as cli_main

    return cli_main(["monitor", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
