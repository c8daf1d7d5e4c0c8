"""dapt stage: domain-adaptive pre-training (continued masked-language modelling).

The work is base.task's hook, domaintune/tasks/<task>/dapt.py (library code: domaintune/train/dapt.py and
the modules it imports); this file only parses the command line that dvc.yaml runs.
"""
from __future__ import annotations

import sys

from domaintune import tasks
from domaintune.core.stage import StageIO, run_stage, stage_parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = stage_parser("dapt", "Domain-adaptive MLM pre-training of the base encoder (or a pass-through when disabled).",
                      inp="audited dataset folder (only its train split is read)", out="output encoder folder")
    ap.add_argument("--checkpoints", default="models/dapt_checkpoints",
                    help="resumable training state (a persisted DVC out); default: models/dapt_checkpoints")
    ap.add_argument("--live", default="reports/dapt/live",
                    help="DVCLive log folder (MLM loss, held-out perplexity); default: reports/dapt/live")
    ap.add_argument("--no-progress", action="store_true", help="no console progress bar")
    return run_stage("dapt", lambda args: tasks.run_hook("dapt", StageIO.of(args, argv)), ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
