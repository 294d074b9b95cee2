"""One direction for every import (docs/design.md, "Where things live"): each package imports
only from the packages before it, no private name crosses a package, and every hole the check
could have is closed by a planted violation that must fail it.

What counts as an import: `import` and `from` statements at any depth (relative ones resolved
against the file's package), `importlib.import_module("...")` and `__import__("...")` with a
literal, and "package.module:function" entry-point strings (the CLI's dispatch tables). Only the
entry-point alias files named in MAIN_ALIASES may import backwards, and only under an exact
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("common", "models", "train", "export", "calibration", "validate", "tools")
# Files whose `__main__` block is a command alias that may reach a later package.
MAIN_ALIASES = {"calibration/report.py"}
# Top-level folders that hold Python but are not packages of the product.
NOT_PACKAGES = {"tests", "build", "docs"}
ENTRY_POINT = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)*):\w+$")


def _is_main_guard(node: ast.AST) -> bool:
    """Exactly ``if __name__ == "__main__":`` (either side), nothing looser."""
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)):
        return False
    test = node.test
    if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    texts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(texts) == 1


def _package_of(where: str) -> list[str]:
    """The dotted package a file lives in: `export/pipeline.py` -> ["export"]."""
    parts = Path(where).with_suffix("").parts
    return list(parts[:-1]) if parts[-1] != "__init__" else list(parts[:-1])


def _absolute(node: ast.ImportFrom, where: str) -> str:
    if node.level == 0:
        return node.module or ""
    base = _package_of(where)
    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def _literal_import(node: ast.Call) -> str | None:
    """The module of `importlib.import_module("x")` / `import_module("x")` / `__import__("x")`."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name in ("import_module", "__import__") and node.args:
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def project_imports(source: str, where: str = "planted.py",
                    allow_main: bool = False) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of a project package, at any depth. Code under an
    exact ``__main__`` guard is skipped only when `allow_main` (the named alias files)."""
    found = []
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> project module it is bound to

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if allow_main and _is_main_guard(child):
                continue
            if isinstance(child, ast.ImportFrom):
                module = _absolute(child, where)
                found.append((child.lineno, module, [a.name for a in child.names]))
                for a in child.names:
                    aliases[a.asname or a.name] = f"{module}.{a.name}"
            elif isinstance(child, ast.Import):
                for a in child.names:
                    found.append((child.lineno, a.name, []))
                    aliases[a.asname or a.name.split(".")[0]] = a.asname and a.name or \
                        a.name.split(".")[0]
            elif isinstance(child, ast.Call) and (module := _literal_import(child)):
                found.append((child.lineno, module, []))
            elif isinstance(child, ast.Constant) and isinstance(child.value, str) and \
                    (match := ENTRY_POINT.match(child.value)):
                found.append((child.lineno, match.group(1), []))
            visit(child)

    visit(tree)
    # Private names reached as attributes of an imported project module: `mod._x`.
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and \
                not node.attr.startswith("__"):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                module = ".".join([aliases[base.id]] + chain[:-1])
                found.append((node.lineno, module, [node.attr]))
    return [(line, mod, names) for line, mod, names in found if mod.split(".")[0] in ORDER]


def violations(package: str, source: str, where: str = "planted.py") -> list[str]:
    """Backward imports and private names taken from another package."""
    rank = ORDER.index(package)
    wrong = []
    for line, module, names in project_imports(source, where, where in MAIN_ALIASES):
        target = module.split(".")[0]
        if ORDER.index(target) > rank:
            wrong.append(f"{where}:{line} imports {module} ({target} comes after {package})")
        if target != package:
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [part for part in module.split(".")[1:] if part.startswith("_")]
            if private:
                wrong.append(f"{where}:{line} takes private {private} from {module}")
    return wrong


def top_level_packages() -> set[str]:
    """Every top-level folder of the repository that holds Python source."""
    return {p.parent.relative_to(ROOT).parts[0] for p in ROOT.glob("*/**/*.py")
            if not p.relative_to(ROOT).parts[0].startswith(".")} - NOT_PACKAGES


def test_every_import_points_down():
    wrong = []
    for package in ORDER:
        for path in sorted((ROOT / package).rglob("*.py")):
            wrong += violations(package, path.read_text(), str(path.relative_to(ROOT)))
    assert not wrong, "\n".join(wrong)


def test_every_package_has_a_place_in_the_order():
    assert top_level_packages() <= set(ORDER), top_level_packages() - set(ORDER)
    assert set(ORDER) <= top_level_packages()


@pytest.mark.parametrize("package, where, planted", [
    ("export", "export/x.py", "from validate.parity import run_parity\n"),
    ("models", "models/x.py", "def f():\n    from export import pipeline\n"),
    ("train", "train/x.py", "import tools.render\n"),
    ("validate", "validate/x.py", "from export.pipeline import _nafnet_graphs\n"),
    ("export", "export/x.py", "from ..validate import parity\n"),
    ("export", "export/x.py", "from ..validate.parity import run_parity\n"),
    ("models", "models/sub/x.py", "from ...export import pipeline\n"),
    ("models", "models/x.py", "import importlib\nm = importlib.import_module('export.pipeline')\n"),
    ("models", "models/x.py", "from importlib import import_module\nimport_module('tools.cli')\n"),
    ("models", "models/x.py", "m = __import__('validate.parity')\n"),
    ("validate", "validate/x.py", "VERBS = {'render': 'tools.render:main'}\n"),
    ("calibration", "calibration/x.py",
     "if __name__ != '__main__':\n    from validate.quant_report import main\n"),
    ("calibration", "calibration/x.py",
     "if __name__ == 'not main':\n    from validate.quant_report import main\n"),
    ("calibration", "calibration/x.py",
     "if __name__ == '__main__':\n    from validate.quant_report import main\n"),
    ("validate", "validate/x.py", "from export import pipeline\npipeline._nafnet_graphs()\n"),
    ("validate", "validate/x.py", "import export.pipeline\nexport.pipeline._nafnet_graphs()\n"),
    ("validate", "validate/x.py", "import export.pipeline as p\np._stage()\n"),
])
def test_a_planted_violation_is_caught(package, where, planted):
    assert violations(package, planted, where), planted


def test_a_package_missing_from_the_order_is_caught(tmp_path, monkeypatch):
    (tmp_path / "extras").mkdir()
    (tmp_path / "extras" / "x.py").write_text("")
    for package in ORDER:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert top_level_packages() - set(ORDER) == {"extras"}


def test_the_named_alias_and_downward_imports_pass():
    source = ("from common.errors import UserError\nfrom models.nafnet import NAFNet\n"
              "from . import dataset\nfrom .dataset import x\nimport export.pipeline as p\n"
              "p.export()\nprint(p.__name__)\n"
              "if __name__ == '__main__':\n    from validate.quant_report import main\n")
    assert violations("calibration", source, "calibration/report.py") == []
    assert violations("calibration", source, "calibration/other.py")
