"""finetune stage: train the classifier on the audited data over the (DAPT) encoder.

The work is base.task's hook, domaintune/tasks/<task>/finetune.py (library code: domaintune/train/classifier.py and
the modules it imports); this file only parses the command line that dvc.yaml runs. With finetune.init served or
vX.Y.Z (a warm start), it materialises that version first through the registry (the layer below never imports it):
its models/export and data/audited, every file md5-verified against the version's dvc.lock as rollback does, outside
the workspace (.domaintune/releases/<tag>/), and hands their paths to the hook as --init-model / --init-data.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from domaintune import tasks
from domaintune.core.errors import StageError
from domaintune.core.params import load_params
from domaintune.core.stage import StageIO, run_stage, stage_parser
from domaintune.registry import release
from domaintune.registry.plumbing import RegistryError

INIT_OUTS = ("models/export", "data/audited")  # the version's classifier, and the rows it was trained on


def materialise_init(args: argparse.Namespace) -> list[str]:
    """finetune.init served / vX.Y.Z -> the version's verified folders on args (and as flags for a relaunch under
    torchrun); nothing for init base or when --init-model is given."""
    if args.init_model:
        return []
    init = load_params(args.params, "finetune").init
    if init == "base":
        return []
    root = Path(args.params).resolve().parent
    try:
        model = release.materialise(root, None if init == "served" else init, out=INIT_OUTS[0])
        data = release.materialise(root, model.version.version, out=INIT_OUTS[1])
    except RegistryError as exc:
        raise StageError(f"finetune.init {init}: {exc}") from None
    args.init_model, args.init_data, args.init_version = str(model.path), str(data.path), model.version.version
    return ["--init-model", args.init_model, "--init-data", args.init_data, "--init-version", args.init_version]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = stage_parser("finetune", __doc__.splitlines()[0], inp="dataset folder (train/validation parquet, labels.json)",
                      out="output model folder")
    ap.add_argument("--encoder", required=True, help="encoder folder to fine-tune (e.g. models/dapt)")
    ap.add_argument("--checkpoints", default="models/checkpoints",
                    help="resumable training state (a persisted DVC out)")
    ap.add_argument("--live", default="reports/finetune/live", help="DVCLive log folder (training curves)")
    ap.add_argument("--extra-rows", default=None,
                    help="parquet of the rows added to train (finetune.augment, finetune.replay), each with its "
                         "source id (a DVC out)")
    ap.add_argument("--init-model", default=None,
                    help="warm start from this classifier folder instead of materialising finetune.init")
    ap.add_argument("--init-data", default=None, help="with --init-model: the dataset folder it was trained on")
    ap.add_argument("--init-version", default=None, help="with --init-model: the version name the records give")
    ap.add_argument("--no-progress", action="store_true", help="no console progress bar")

    def work(args: argparse.Namespace):
        flags = materialise_init(args)
        return tasks.run_hook("finetune", StageIO.of(args, argv + flags))

    return run_stage("finetune", work, ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
