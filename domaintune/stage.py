"""What every stage's command line shares: argument parsing and error reporting.

A stage fails on bad input with one line that names the file, row and field
(DataError) or the params key (ParamsError), and a non-zero exit code, instead
of a traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from domaintune.data import DataError
from domaintune.params import ParamsError

class StageError(RuntimeError):
    """A stage refused to continue (e.g. a failed quality gate); the message says why."""


# Command-line destinations that name what a stage writes; every other string argument
# (--in, --source, --params, --model, --decisions, ...) is read.
OUTPUT_ARGS = ("out", "metrics", "report", "embeddings", "checkpoints", "live")


def _flag(dest: str) -> str:
    return "--in" if dest == "in_dir" else "--" + dest.replace("_", "-")


def _overlap(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_paths_apart(args: argparse.Namespace) -> None:
    """Refuse, before anything is touched, an output that is, contains or sits inside an input
    or another output: replacing it would delete the input (e.g. --out equal to --source)."""
    given = {k: v for k, v in vars(args).items() if isinstance(v, str) and v and not v.startswith("hf:")}
    real = {k: Path(os.path.realpath(v)) for k, v in given.items()}
    outs = [k for k in OUTPUT_ARGS if k in real]
    for o in outs:
        for other in given:
            if other == o or (other in outs and outs.index(other) < outs.index(o)):
                continue
            how = _overlap(real[o], real[other])
            if how:
                kind = "output" if other in outs else "input"
                raise StageError(f"{_flag(o)} {given[o]} {how} the {kind} {_flag(other)} {given[other]}; an output "
                                 "must not be, contain or sit inside another path the stage uses (writing it would "
                                 "replace that path)")


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
        check_paths_apart(args)
        fn(args)
    except (DataError, ParamsError, StageError, OSError) as exc:  # OSError: a missing/unreadable path, a folder
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    return 0
