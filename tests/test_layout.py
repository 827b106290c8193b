"""The package's shape: stages as folders that import only downwards, small files and functions."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "specchat"
# The data flow, bottom to top: a folder may import its own modules and those of folders below it.
LAYERS = ("common", "sources", "weights", "model", "speculation", "engine", "app", "server", "bench", "cli")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE)  # the stages (not __init__/__main__)


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "specchat" else None


def imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_imports_only_its_own_stage_or_those_below(path):
    own = path.relative_to(PACKAGE).parts[0]
    assert own in LAYERS, f"{path} is in no stage folder"
    for name in imported(ast.parse(path.read_text())):
        other = stage(name)
        if other is not None:
            assert other in LAYERS and LAYERS.index(other) <= LAYERS.index(own), f"{path.name} imports {name} (upward)"


def test_no_relative_imports_and_no_module_of_the_old_flat_layout():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level], path
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path} has {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} is {length} lines"
