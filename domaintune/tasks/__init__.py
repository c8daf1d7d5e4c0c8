"""Tasks: what a model is trained to do, and each stage's hook for it.

A task is a folder here with one module per hook in HOOKS; each hook module has `run(io: StageIO)`
(a stage's work: read its deps, call the library, write its outs atomically, return the "done" line),
except `predictor`, whose `load(folder, ...)` opens an export for prediction. Stages dispatch through
`run_hook`; `predict`, `serve` and `monitor` open every export through `load_predictor`.

Adding a task: a new folder with the hook modules, plus its name in TASKS (one line). A hook module
imports only library code (core, data, modeling, train, evaluate, export, predict, monitor), never
stages/ or pipelines/; each stage's DVC deps list the hook modules of every task
(tests/test_dvc_yaml.py checks).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from domaintune.core.errors import DataError, ParamsError
from domaintune.core.io import read_json
from domaintune.core.params import load_all
from domaintune.core.stage import StageIO
from domaintune.export.variants import check_variants

TASKS = ("classification", "generation", "token_classification")  # the registration: one line per task folder
HOOKS = ("ingest", "dedupe", "audit", "dapt", "finetune", "evaluate", "export", "drift", "predictor")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ParamsError(f"params.yaml: base.task: expected one of {list(TASKS)}, got {task!r}")
    return task


def hook(task: str, name: str) -> ModuleType:
    """The module implementing hook `name` for `task` (imported on demand: a stage loads one task's code)."""
    if name not in HOOKS:
        raise ValueError(f"unknown hook {name!r}; hooks are {HOOKS}")
    return importlib.import_module(f"{__name__}.{check_task(task)}.{name}")


def run_hook(stage: str, io: StageIO):
    """What every stage's main() calls: the hook of params.yaml's base.task. Every section of params.yaml
    is validated here (unknown keys, types, and the names checked above core, such as export variants),
    so a typo anywhere stops the first stage that runs, in milliseconds, not the stage that reads it."""
    params = load_all(io.params)
    check_variants(params["export"].variants)
    return hook(params["base"].task, stage).run(io)


def export_task(folder: str | Path) -> str:
    """The task an export folder was made for, from its own record: the generation export's
    export_info.json names its task; a classifier export has model.json."""
    folder = Path(folder)
    info = folder / "export_info.json"
    if info.is_file() and not (folder / "model.json").exists():
        task = read_json(info).get("task")
        if task in TASKS:
            return task
        raise DataError(info, None, "task", f"unknown task {task!r}; this domaintune knows {list(TASKS)}")
    if (folder / "model.json").is_file():
        return "classification"
    if not folder.is_dir():
        raise DataError(folder, None, None, "no such model folder (an export holds model.json, or export_info.json "
                        "for a causal LM); run the export stage first")
    raise DataError(folder, None, None, "not an export (no model.json or export_info.json); run the export stage "
                    "first, or name the export folder (e.g. models/export)")


def load_predictor(folder: str | Path, **kw):
    """The one loader: every export of every task, for predict, serve, drift and monitor alike.

    The files it reads are first checked against the export's checksums.json (written by the export stage;
    a changed or missing file is a DataError naming it); verify=False skips that (it costs one md5 pass over
    the variant's files). An export without checksums.json loads unverified, with a warning when the export
    stage wrote it (before checksums were recorded)."""
    return hook(export_task(folder), "predictor").load(folder, **kw)
