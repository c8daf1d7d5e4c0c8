"""dvc.yaml must list, for each stage, every project module the stage's code imports.

Otherwise a change to, say, domaintune/modeling/encoders.py leaves the stages that use it
cached and stale after `dvc repro`.
"""
from __future__ import annotations

import ast
import sys
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


def package_names(init: str) -> set[str]:
    """Names a package's __init__.py defines at module level."""
    names = set()
    for node in ast.parse((REPO / init).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def project_imports(rel: str) -> set[str]:
    """Project modules (paths relative to the repo) imported anywhere in a file, function bodies included.

    `from domaintune.train import engine` runs domaintune/__init__.py, domaintune/train/__init__.py and
    domaintune/train/engine.py: every package on the way counts. A project module that resolves to no
    file fails the test (it used to be dropped silently)."""
    found = set()
    for node in ast.walk(ast.parse((REPO / rel).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PACKAGES:
            where = module_file(node.module)
            assert where, f"{rel}: from {node.module} import ...: no such project module"
            if where.endswith("__init__.py"):  # from a package: each name is a submodule or defined there
                defined = package_names(where)
                for a in node.names:
                    assert module_file(f"{node.module}.{a.name}") or a.name in defined, \
                        f"{rel}: from {node.module} import {a.name}: no such project module"
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


def test_package_paths_resolve_to_their_files():
    # The regression: `from domaintune.train import engine` was mapped to a non-existent domaintune/train.py
    # and dropped, so the engine was no dep of the stage.
    assert project_imports("domaintune/train/classifier.py") >= {
        "domaintune/__init__.py", "domaintune/train/__init__.py", "domaintune/train/engine.py"}
    assert module_file("domaintune.train") == "domaintune/train/__init__.py"
    assert module_file("domaintune.train.engine") == "domaintune/train/engine.py"
    assert module_file("domaintune.train.no_such_module") is None


def test_a_missing_project_module_fails_instead_of_being_dropped(tmp_path, monkeypatch):
    (tmp_path / "domaintune" / "train").mkdir(parents=True)
    (tmp_path / "domaintune" / "__init__.py").write_text("")
    (tmp_path / "domaintune" / "train" / "__init__.py").write_text('"""no names"""\n')
    (tmp_path / "domaintune" / "train" / "engine.py").write_text("")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "good.py").write_text("from domaintune.train import engine\n")
    (tmp_path / "stages" / "bad.py").write_text("from domaintune.train import no_such_module\n")
    (tmp_path / "stages" / "worse.py").write_text("from domaintune.nowhere import x\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert project_imports("stages/good.py") == {"domaintune/__init__.py", "domaintune/train/__init__.py",
                                                 "domaintune/train/engine.py"}
    for rel in ("stages/bad.py", "stages/worse.py"):
        with pytest.raises(AssertionError, match="no such project module"):
            project_imports(rel)


def test_every_task_has_every_stage_hook():
    for task in task_names():
        for stage in DVC["stages"]:
            assert (REPO / f"domaintune/tasks/{task}/{stage}.py").is_file(), f"task {task!r} has no {stage} hook"


@pytest.mark.parametrize("stage", sorted(DVC["stages"]))
def test_stage_deps_list_no_code_the_stage_does_not_run(stage):
    code = stage_code(stage)
    listed = {d for d in DVC["stages"][stage]["deps"] if d.startswith(("domaintune/", "stages/"))}
    assert not listed - code, f"dvc.yaml: stage {stage!r} lists {sorted(listed - code)} that it never imports"
