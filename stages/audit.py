"""Audit: find likely label errors with cleanlab and act on them (report, drop or relabel).

The work is base.task's hook, domaintune/tasks/<task>/audit.py (library code: domaintune/evaluate/audit.py and
the modules it imports); this file only parses the command line that dvc.yaml runs.
"""
from __future__ import annotations

import sys

from domaintune import tasks
from domaintune.core.stage import StageIO, run_stage, stage_parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = stage_parser("audit", "Find likely label errors with cleanlab; report, drop or relabel them.",
                      inp="deduped dataset folder", out="audited dataset folder")
    ap.add_argument("--report", required=True, help="report folder (label_issues.csv, summary.json, ...)")
    ap.add_argument("--embeddings", default="data/embeddings",
                    help="embedding cache folder (a persistent DVC out; reused when its key matches)")
    ap.add_argument("--decisions", default=None, help="human-review decisions CSV (default: audit.decisions)")
    return run_stage("audit", lambda args: tasks.run_hook("audit", StageIO.of(args, argv)), ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
