"""export: the calibrated model in every variant (float32, int8, ONNX, ONNX int8), gated, with a model card.

The work is base.task's hook, domaintune/tasks/<task>/export.py (library code: domaintune/export/classifier.py and
the modules it imports); this file only parses the command line that dvc.yaml runs.
"""
from __future__ import annotations

import sys

from domaintune import tasks
from domaintune.core.stage import StageIO, run_stage, stage_parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = stage_parser("export", __doc__.splitlines()[0],
                      inp="audited dataset folder (test split, hashes)", out="export folder")
    ap.add_argument("--model", required=True, help="fine-tuned classifier folder")
    ap.add_argument("--calibration", required=True, help="evaluate's report folder (calibration.json, metrics.json)")
    ap.add_argument("--audit", default=None, help="audit report folder (summary.json) for the model card")
    ap.add_argument("--dapt", default=None, help="DAPT encoder folder (dapt_info.json) for the model card")
    return run_stage("export", lambda args: tasks.run_hook("export", StageIO.of(args, argv)), ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
