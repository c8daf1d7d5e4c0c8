"""Drift stage: the reference profile that `domaintune monitor` compares new batches with.

The work is base.task's hook, domaintune/tasks/<task>/drift.py (library code: domaintune/monitor/drift.py and
the modules it imports); this file only parses the command line that dvc.yaml runs.
"""
from __future__ import annotations

import sys

from domaintune import tasks
from domaintune.core.stage import StageIO, run_stage, stage_parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = stage_parser("drift", __doc__.splitlines()[0], inp="audited dataset folder", out="baseline folder to write")
    ap.add_argument("--model", required=True, help="exported model folder")
    return run_stage("drift", lambda args: tasks.run_hook("drift", StageIO.of(args, argv)), ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
