"""finetune stage: train the classifier on the audited data over the (DAPT) encoder.

The work is base.task's hook, domaintune/tasks/<task>/finetune.py (library code: domaintune/train/classifier.py and
the modules it imports); this file only parses the command line that dvc.yaml runs.
"""
from __future__ import annotations

import sys

from domaintune import tasks
from domaintune.core.stage import StageIO, run_stage, stage_parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = stage_parser("finetune", __doc__.splitlines()[0], inp="dataset folder (train/validation parquet, labels.json)",
                      out="output model folder")
    ap.add_argument("--encoder", required=True, help="encoder folder to fine-tune (e.g. models/dapt)")
    ap.add_argument("--checkpoints", default="models/checkpoints",
                    help="resumable training state (a persisted DVC out)")
    ap.add_argument("--live", default="reports/finetune/live", help="DVCLive log folder (training curves)")
    ap.add_argument("--no-progress", action="store_true", help="no console progress bar")
    return run_stage("finetune", lambda args: tasks.run_hook("finetune", StageIO.of(args, argv)), ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
