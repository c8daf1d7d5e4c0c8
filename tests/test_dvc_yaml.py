"""dvc.yaml must list, for each stage, every project module the stage's code imports.

Otherwise a change to, say, domaintune/modeling/encoders.py leaves the stages that use it
cached and stale after `dvc repro`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("domaintune", "stages")
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def module_file(dotted: str) -> str | None:
    """The file Python runs for a dotted project module: a module file or a package's __init__.py."""
    path = dotted.replace(".", "/")
    for candidate in (f"{path}.py", f"{path}/__init__.py"):
        if (REPO / candidate).is_file():
            return candidate
    return None


def project_imports(rel: str) -> set[str]:
    """Project modules (paths relative to the repo) imported anywhere in a file, function bodies included.

    `from domaintune.train import engine` runs domaintune/__init__.py, domaintune/train/__init__.py and
    domaintune/train/engine.py: every package on the way counts. A project module that resolves to no
    file fails the test (it used to be dropped silently)."""
    found = set()
    for node in ast.walk(ast.parse((REPO / rel).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PACKAGES:
            assert module_file(node.module), f"{rel}: from {node.module} import ...: no such project module"
            dotted = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            dotted = [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
            for d in dotted:
                assert module_file(d), f"{rel}: import {d}: no such project module"
        else:
            continue
        for d in dotted:
            parts = d.split(".")
            found |= {f for f in (module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)) if f}
    return found


def import_closure(rel: str) -> set[str]:
    seen, todo = set(), [rel]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += project_imports(path)
    return seen


def task_names() -> list[str]:
    """domaintune/tasks/__init__.py's TASKS, read without importing the package."""
    for node in ast.walk(ast.parse((REPO / "domaintune/tasks/__init__.py").read_text())):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "TASKS":
            return list(ast.literal_eval(node.value))
    raise AssertionError("domaintune/tasks/__init__.py: no TASKS")


def stage_code(stage: str) -> set[str]:
    """The stage module's closure plus each task's hook for the stage (stages dispatch through
    domaintune.tasks.hook, an import by name that the static walk cannot follow)."""
    code = import_closure(f"stages/{stage}.py")
    for task in task_names():
        code |= import_closure(f"domaintune/tasks/{task}/{stage}.py")
    return code


@pytest.mark.parametrize("stage", sorted(DVC["stages"]))
def test_stage_deps_cover_the_code_it_runs(stage):
    code = stage_code(stage)
    missing = sorted(code - set(DVC["stages"][stage]["deps"]))
    assert not missing, f"dvc.yaml: stage {stage!r} imports {missing} but does not list them as deps"


def test_the_closure_follows_the_task_hooks_and_function_level_imports():
    # stages/finetune.py reaches the classifier through the task hook; the classifier imports modeling.
    assert {"domaintune/train/classifier.py", "domaintune/modeling/encoders.py",
            "domaintune/tasks/classification/finetune.py", "domaintune/tasks/generation/finetune.py",
            "domaintune/train/sft.py"} <= stage_code("finetune")
