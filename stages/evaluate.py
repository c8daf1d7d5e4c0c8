"""evaluate: calibrate the fine-tuned classifier on validation, score it on test, gate it.

The work is base.task's hook, domaintune/tasks/<task>/evaluate.py (library code: domaintune/evaluate/classifier.py and
the modules it imports); this file only parses the command line that dvc.yaml runs.
"""
from __future__ import annotations

import sys

from domaintune import tasks
from domaintune.core.stage import StageIO, run_stage, stage_parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = stage_parser("evaluate", __doc__.splitlines()[0], inp="audited dataset folder",
                      out="report folder (calibration.json, report.md, plots)")
    ap.add_argument("--model", required=True, help="fine-tuned classifier folder (seeds/<seed>/ evaluated too)")
    return run_stage("evaluate", lambda args: tasks.run_hook("evaluate", StageIO.of(args, argv)), ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
