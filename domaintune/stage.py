"""What every stage's command line shares: argument parsing and error reporting.

A stage fails on bad input with one line that names the file, row and field
(DataError) or the params key (ParamsError), and a non-zero exit code, instead
of a traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from domaintune.data import DataError
from domaintune.params import ParamsError

class StageError(RuntimeError):
    """A stage refused to continue (e.g. a failed quality gate); the message says why."""


def stage_parser(name: str, description: str, *, inp: str | None = None, out: str | None = None,
                 metrics: str | None = "metrics JSON (dvc metrics)") -> argparse.ArgumentParser:
    """--params plus the flags most stages share; each given help text adds its flag.

    --in (args.in_dir) is the stage's input dataset folder, --out its main output,
    --metrics the small JSON that `dvc metrics` reads.
    """
    ap = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=description)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if inp:
        ap.add_argument("--in", dest="in_dir", required=True, help=inp)
    if out:
        ap.add_argument("--out", required=True, help=out)
    if metrics:
        ap.add_argument("--metrics", required=True, help=metrics)
    return ap


def run_stage(name: str, fn: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
              argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s", stream=sys.stderr)
    args = parser.parse_args(argv)
    try:
        fn(args)
    except (DataError, ParamsError, StageError, OSError) as exc:  # OSError: a missing/unreadable path, a folder
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    return 0
