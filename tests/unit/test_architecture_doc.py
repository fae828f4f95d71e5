"""docs/architecture.md's import tables say what the code imports, so the document cannot go stale silently.

- The module table ("| module | imports when loaded | imports inside functions |") has one row for every module
  of flows/, pipelines/, tasks/ and deploy/ (empty package `__init__.py` files aside) and no other. Its cells name
  the project modules that module imports, grouped by package (`tasks: config, errors; flows: retrain`, or `—`
  for none): those imported when it is loaded, and those imported only inside a function, when it is called.
- The layer table ("| layer | imports from | never imports from |") is checked against every import of every
  module of the layer: each is covered by an "imports from" entry, none by a "never" entry, and every
  "imports from" entry is used by some module (the table claims no more than the code does).

The code is parsed, never imported. Every import statement counts as the code has it: one at module level
(under `if` or `try` too) is "when loaded", one in a function's body "inside functions"; a module imported
both ways is "when loaded" only. Imports by string (`python -m`, a bentofile) are not imports here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
PACKAGES = ("flows", "pipelines", "tasks", "deploy")  # the layers, in the order the module table lists them
MODULE_HEADER = ("module", "imports when loaded", "imports inside functions")
LAYER_HEADER = ("layer", "imports from", "never imports from")
NONE = "—"


def project_modules(root: Path = REPO) -> list[str]:
    """Every project module as a path relative to root (`tasks/config.py`), package by package."""
    return [path.relative_to(root).as_posix() for package in PACKAGES
            for path in sorted((root / package).glob("*.py")) if path.name != "__init__.py"]


def resolve(name: str, root: Path) -> str | None:
    """The project module a dotted name loads (`tasks.config` -> `tasks/config.py`); None outside the project and
    for packages."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    path = root.joinpath(*parts).with_suffix(".py")
    return path.relative_to(root).as_posix() if path.is_file() else None


def imported_names(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's own package upwards
        package = module.removesuffix(".py").split("/")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    # `from tasks import config` loads tasks/config.py; `from tasks.config import Params` loads tasks/config.py.
    return [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]


def imports(module: str, root: Path = REPO) -> tuple[set[str], set[str]]:
    """(imported when loaded, imported only inside functions): the project modules one module imports."""
    loaded: set[str] = set()
    called: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found = {file for name in imported_names(node, module) if (file := resolve(name, root))} - {module}
            (called if in_function else loaded).update(found)
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse((root / module).read_text(encoding="utf-8"), filename=module), False)
    return loaded, called - loaded


def cell(modules: set[str]) -> str:
    """Modules as the table writes them: `flows: dag, retrain; tasks: config`, packages in layer order."""
    groups = []
    for package in PACKAGES:
        names = sorted(Path(m).stem for m in modules if m.startswith(f"{package}/"))
        if names:
            groups.append(f"{package}: {', '.join(names)}")
    return "; ".join(groups) or NONE


def parse_cell(text: str) -> set[str]:
    text = text.strip()
    if text == NONE:
        return set()
    modules = set()
    for group in text.split(";"):
        package, sep, names = group.partition(":")
        assert sep, f"{group!r}: expected `package: module, module`"
        modules |= {f"{package.strip()}/{name.strip()}.py" for name in names.split(",")}
    return modules


def table(header: tuple[str, ...], text: str) -> list[list[str]]:
    """The rows of the Markdown table with this header (cells stripped, backticks kept)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and tuple(cells) == header:
            rows = []
            for row in lines[i + 2:]:
                if not row.lstrip().startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"{DOC.relative_to(REPO)} has no table headed | {' | '.join(header)} |")


def code_name(text: str) -> str:
    match = re.fullmatch(r"`([^`]+)`", text.strip())
    assert match, f"{text!r}: expected one `path` in backticks"
    return match.group(1)


def expected_row(module: str) -> str:
    loaded, called = imports(module)
    return f"| `{module}` | {cell(loaded)} | {cell(called)} |"


def test_the_module_table_has_a_row_for_every_module_and_no_other():
    rows = [code_name(row[0]) for row in table(MODULE_HEADER, DOC.read_text(encoding="utf-8"))]
    duplicated = sorted({m for m in rows if rows.count(m) > 1})
    assert not duplicated, f"listed more than once: {duplicated}"
    missing = [m for m in project_modules() if m not in rows]
    assert not missing, "add to the module table of docs/architecture.md:\n" + "\n".join(map(expected_row, missing))
    gone = sorted(set(rows) - set(project_modules()))
    assert not gone, f"no such module, remove its row from docs/architecture.md: {gone}"


@pytest.mark.parametrize("module", project_modules())
def test_the_module_table_lists_what_the_module_imports(module):
    rows = {code_name(row[0]): row for row in table(MODULE_HEADER, DOC.read_text(encoding="utf-8"))}
    if module not in rows:
        pytest.skip("no row: the test above reports it")
    loaded, called = imports(module)
    row = rows[module]
    assert (parse_cell(row[1]), parse_cell(row[2])) == (loaded, called), \
        f"docs/architecture.md's row for {module} is stale; the code says:\n{expected_row(module)}"


def covers(entry: str, module: str) -> bool:
    """A layer table entry: a folder (`tasks/`) covers the modules in it, a file (`pipelines/stage_io.py`) itself."""
    return module.startswith(entry) if entry.endswith("/") else module == entry


def entries(text: str) -> list[str]:
    return [] if text.strip() == NONE else [code_name(part) for part in text.split(",")]


def test_the_layer_table_says_what_each_layer_imports():
    rows = table(LAYER_HEADER, DOC.read_text(encoding="utf-8"))
    layers = {code_name(row[0]): (entries(row[1]), entries(row[2])) for row in rows}
    assert sorted(layers) == sorted(f"{package}/" for package in PACKAGES), "one row per layer: " + ", ".join(PACKAGES)
    for layer, (allowed, never) in layers.items():
        members = [m for m in project_modules() if covers(layer, m)]
        used = {entry: False for entry in allowed}
        for module in members:
            loaded, called = imports(module)
            for target in sorted(loaded | called):
                covering = [entry for entry in allowed if covers(entry, target)]
                assert covering, f"{module} imports {target}, which the layer table does not list for {layer}"
                assert not any(covers(entry, target) for entry in never), \
                    f"{module} imports {target}: the layer table says {layer} never does"
                used.update(dict.fromkeys(covering, True))
        unused = [entry for entry, was in used.items() if not was]
        assert not unused, f"no module of {layer} imports from {unused}: the layer table claims more than the code"
