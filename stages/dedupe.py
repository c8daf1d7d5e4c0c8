"""Stage dedupe: data/ingested -> data/deduped + manifest.json (content hashes, every removal and why).

The work is base.task's hook, domaintune/tasks/<task>/dedupe.py (library code: domaintune/data/dedupe.py and
the modules it imports); this file only parses the command line that dvc.yaml runs.
"""
from __future__ import annotations

import sys

from domaintune import tasks
from domaintune.core.stage import StageIO, run_stage, stage_parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = stage_parser("dedupe", __doc__.splitlines()[0],
                      inp="input dataset folder (ingest output)", out="output dataset folder")
    return run_stage("dedupe", lambda args: tasks.run_hook("dedupe", StageIO.of(args, argv)), ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
