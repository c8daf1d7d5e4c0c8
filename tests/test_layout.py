"""The house rules of the layout (README "Architecture"), checked on the code itself."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(p.relative_to(REPO).as_posix() for top in ("domaintune", "stages", "pipelines")
                 for p in (REPO / top).rglob("*.py"))


@pytest.mark.parametrize("rel", MODULES)
def test_every_module_opens_with_what_it_owns(rel):
    doc = ast.get_docstring(ast.parse((REPO / rel).read_text()))
    assert doc and doc.splitlines()[0].strip(), f"{rel}: no module docstring saying what it owns"


def test_no_stage_branches_on_the_task():
    for stage in (REPO / "stages").glob("*.py"):
        assert not re.search(r"task\s*[!=]=", stage.read_text()), f"{stage}: dispatch through domaintune.tasks"


def test_library_functions_never_take_argparse_namespaces():
    """Only core/stage.py (which turns the command line into a StageIO) may handle argparse."""
    for rel in MODULES:
        if not rel.startswith("domaintune/") or rel == "domaintune/core/stage.py":
            continue
        tree = ast.parse((REPO / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "main":
                names = [a.arg for a in node.args.args + node.args.kwonlyargs]
                assert "args" not in names, f"{rel}:{node.lineno}: {node.name}(args): pass the values, not argparse's"


def test_project_imports_inside_functions_say_why():
    """Project code is imported at module level; one left in a function has a reason on the line above."""
    for rel in MODULES:
        lines = (REPO / rel).read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and id(node) not in top and \
                    node.module.split(".")[0] in ("domaintune", "stages", "pipelines"):
                above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                reasons = ("# lazy:", "# per call:", "try:", "if ")
                assert above.startswith(reasons) or lines[node.lineno - 3].strip().startswith(reasons), \
                    f"{rel}:{node.lineno}: from {node.module} import ... inside a function without a reason"


@pytest.mark.parametrize("package", sorted(p.parent.relative_to(REPO).as_posix()
                                           for p in (REPO / "domaintune").glob("*/__init__.py")
                                           if p.parent.name != "tasks"))
def test_each_package_docstring_lists_exactly_its_modules(package):
    doc = ast.get_docstring(ast.parse((REPO / package / "__init__.py").read_text()))
    listed = set(re.findall(r"^-?\s*(\w+\.py)\b", doc, flags=re.M))
    present = {p.name for p in (REPO / package).glob("*.py") if p.name != "__init__.py"}
    assert listed == present, f"{package}/__init__.py lists {sorted(listed - present)} that do not exist and " \
                              f"misses {sorted(present - listed)}"
