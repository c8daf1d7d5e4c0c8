"""Stage ingest: a labelled source -> data/ingested (train/validation/test Parquet + labels + rejected rows).

The work is base.task's hook, domaintune/tasks/<task>/ingest.py (library code: domaintune/data/ingest.py and
the modules it imports); this file only parses the command line that dvc.yaml runs.
"""
from __future__ import annotations

import sys

from domaintune import tasks
from domaintune.core.stage import StageIO, run_stage, stage_parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = stage_parser("ingest", __doc__.splitlines()[0], out="output dataset folder")
    ap.add_argument("--source", required=True, help="file, folder or hf:<name> (overrides ingest.source)")
    return run_stage("ingest", lambda args: tasks.run_hook("ingest", StageIO.of(args, argv)), ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
