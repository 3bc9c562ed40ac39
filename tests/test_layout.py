"""The repository layout (README, "Repository layout"): every top-level module imports on its own in a fresh
interpreter, imports sit at the top of their module, and the project's import graph has no cycle."""

import ast
import os
import subprocess
import sys

import pytest

from helpers import ROOT

MODULES = sorted(name[:-len(".py")] for name in os.listdir(ROOT) if name.endswith(".py"))
# The stage scripts; only the runners that drive them (and the tests) may import them.
SCRIPTS = {"prepare_data", "pretrain_vae", "train_ocl", "evaluate"}
RUNNERS = {"study", "bench"}
# Modules the scripts share, which the test expects to find.
LIBRARY = {"errors", "files", "config", "schedules", "devices", "grids", "runs", "training", "data", "model", "msf",
           "metrics", "figures", "checkpoints", "api", "tfrecord_reader"}
# The run plumbing, lowest first: each module imports, of the project, only modules before it, so the graph is one-way
# and every module above can import them (errors, files and config, which all the others use, stay below the torch
# machinery of runs and training).
PLUMBING = ["errors", "files", "config", "schedules", "devices", "grids", "runs", "training"]
# Third-party packages imported where they are used, not at the top: seconds of start-up (timm brings torchvision)
# that every stage process and loader forkserver would pay for the one path that needs them (a DINO encoder,
# separability's KMeans).
DEFERRED = {"timm", "sklearn"}


def parse(module: str) -> ast.Module:
    """The syntax tree of a top-level module."""
    with open(os.path.join(ROOT, module + ".py")) as f:
        return ast.parse(f.read(), module + ".py")


def imported_names(node) -> list:
    """The top-level module names an Import / ImportFrom statement loads."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    return [node.module.split(".")[0]] if node.module and not node.level else []


def project_imports(module: str) -> set:
    """The project modules `module` imports, wherever the statement is."""
    return {name for node in ast.walk(parse(module)) if isinstance(node, (ast.Import, ast.ImportFrom))
            for name in imported_names(node) if name in MODULES}


def optional_import(node, parents: dict) -> bool:
    """An import inside `try: ... except ImportError`: an optional extra that may be missing."""
    parent = parents.get(node)
    return isinstance(parent, ast.Try) and node in parent.body and any(
        isinstance(handler.type, ast.Name) and handler.type.id in ("ImportError", "ModuleNotFoundError")
        for handler in parent.handlers)


def test_the_layout_has_the_expected_modules():
    assert LIBRARY <= set(MODULES) and SCRIPTS <= set(MODULES) and RUNNERS <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_on_its_own(module):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("module", MODULES)
def test_imports_are_at_module_top(module):
    tree = parse(module)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    nested = [f"{module}.py:{node.lineno}" for node in ast.walk(tree)
              if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in tree.body
              and not optional_import(node, parents) and not set(imported_names(node)) <= DEFERRED]
    assert not nested, f"imports inside functions or blocks: {nested}"


@pytest.mark.parametrize("script", sorted(SCRIPTS - {"evaluate"}))
def test_the_training_scripts_start_without_the_deferred_packages(script):
    """A trainer without a DINO encoder never needs timm or sklearn: importing the script (what each loader
    forkserver does) leaves them unloaded. evaluate.py reports separability, so it may load sklearn."""
    code = f"import sys, {script}; print(sorted(p for p in {sorted(DEFERRED)} if p in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", result.stdout


def test_the_import_graph_has_no_cycle():
    graph = {module: project_imports(module) - {module} for module in MODULES}
    state = {}  # module -> "visiting" while on the current path, "done" after

    def visit(module: str, path: list) -> None:
        if state.get(module) == "done":
            return
        if state.get(module) == "visiting":
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        state[module] = "visiting"
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        state[module] = "done"

    for module in MODULES:
        visit(module, [])


def test_the_run_plumbing_is_layered():
    for index, module in enumerate(PLUMBING):
        below = set(PLUMBING[:index])
        assert project_imports(module) - {module} <= below, (module, project_imports(module) - below)
    assert project_imports("errors") == set() and project_imports("schedules") == set()
    assert project_imports("files") == {"errors"} and project_imports("config") <= {"errors", "files"}


def test_no_module_but_the_runners_imports_a_stage_script():
    assert project_imports("tfrecord_reader") == set()
    for module in set(MODULES) - RUNNERS:
        assert not project_imports(module) & SCRIPTS, (module, project_imports(module) & SCRIPTS)
