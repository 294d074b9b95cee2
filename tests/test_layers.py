"""One direction for every import (docs/design.md, "Where things live"): each package imports
only from the packages before it, no private name crosses a package, and the check itself fails
on a planted backward import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("common", "models", "train", "export", "calibration", "validate", "tools")


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``: a module's own entry point, which nothing imports."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def project_imports(source: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of a project package, at any depth (function-level
    imports count), except under a ``__main__`` guard."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.lineno, child.module, [a.name for a in child.names]))
            elif isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, []) for a in child.names)
            visit(child)

    visit(ast.parse(source))
    return [(line, mod, names) for line, mod, names in found if mod.split(".")[0] in ORDER]


def violations(package: str, source: str, where: str) -> list[str]:
    """Backward imports and private names taken from another package."""
    rank = ORDER.index(package)
    wrong = []
    for line, module, names in project_imports(source):
        target = module.split(".")[0]
        if ORDER.index(target) > rank:
            wrong.append(f"{where}:{line} imports {module} ({target} comes after {package})")
        if target != package:
            private = [n for n in names if n.startswith("_")]
            private += [part for part in module.split(".")[1:] if part.startswith("_")]
            if private:
                wrong.append(f"{where}:{line} takes private {private} from {module}")
    return wrong


def test_every_import_points_down():
    wrong = []
    for package in ORDER:
        for path in sorted((ROOT / package).rglob("*.py")):
            wrong += violations(package, path.read_text(), str(path.relative_to(ROOT)))
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package, planted", [
    ("export", "from validate.parity import run_parity\n"),
    ("models", "def f():\n    from export import pipeline\n"),
    ("train", "import tools.render\n"),
    ("validate", "from export.pipeline import _nafnet_graphs\n"),
])
def test_a_planted_backward_or_private_import_is_caught(package, planted):
    assert violations(package, planted, "planted.py")


def test_an_entry_point_alias_and_downward_imports_pass():
    source = ("from common.errors import UserError\nfrom models.nafnet import NAFNet\n"
              "if __name__ == '__main__':\n    from validate.quant_report import main\n")
    assert violations("calibration", source, "alias.py") == []
