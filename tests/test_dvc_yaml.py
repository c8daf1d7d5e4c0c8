"""dvc.yaml must list, for each stage, every project module the stage's code imports.

Otherwise a change to, say, domaintune/modeling.py leaves the stages that use it
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


def project_imports(rel: str) -> set[str]:
    """Project modules (paths relative to the repo) imported anywhere in a file, function bodies included."""
    found = set()
    for node in ast.walk(ast.parse((REPO / rel).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            if node.module in PACKAGES:  # from domaintune import x
                found |= {f"{node.module}/{a.name}.py" for a in node.names}
            else:
                found.add(node.module.replace(".", "/") + ".py")
        elif isinstance(node, ast.Import):
            found |= {a.name.replace(".", "/") + ".py" for a in node.names if a.name.split(".")[0] in PACKAGES}
    return {p for p in found if (REPO / p).is_file()}


def import_closure(rel: str) -> set[str]:
    seen, todo = set(), [rel]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += project_imports(path)
    return seen


@pytest.mark.parametrize("stage", sorted(DVC["stages"]))
def test_stage_deps_cover_the_code_it_runs(stage):
    code = import_closure(f"stages/{stage}.py")
    missing = sorted(code - set(DVC["stages"][stage]["deps"]))
    assert not missing, f"dvc.yaml: stage {stage!r} imports {missing} but does not list them as deps"


def test_the_closure_follows_function_level_imports():
    # finetune imports training inside main(); training imports modeling at module level.
    assert {"domaintune/training.py", "domaintune/modeling.py"} <= import_closure("stages/finetune.py")
