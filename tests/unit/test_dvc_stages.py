"""dvc.yaml's `deps` and `params` match what each stage's code imports and reads, so DVC re-runs a
stage exactly when its code or its configuration changes.

For every stage whose cmd is `python -m pipelines.<name>`:

- deps: the project modules (under tasks/, pipelines/, flows/, deploy/) that the runner imports,
  transitively, must equal the stage's `.py` deps. Other deps (data, reports, deploy/bentofile.yaml)
  are not checked. A stage that runs a file without importing it names it in NON_IMPORT_ROUTES;
  that file's imports are followed too.
- params: every attribute chain rooted at the whole `Params` object (`params.train`,
  `params.ingest.columns.groups`) must be covered by a declared key (`ingest.columns` covers
  `ingest.columns.groups`), and every declared key must cover at least one read. `params.paths.*` is
  left out: paths reach DVC through `${...}` templating as deps and outs.

Limits of this static analysis (it parses, it never imports the stage code):
- Every import statement counts, wherever it is (inside functions, under `if`), whether or not it
  runs for this stage. Imports by string (`importlib`, `python -m`, a bentofile) are invisible
  unless listed in NON_IMPORT_ROUTES. Package `__init__.py` files are skipped; a test below keeps
  them free of code so that skipping them is safe.
- Params are read only where they are named: in the runner (and NON_IMPORT_ROUTES files) every
  chain on a name `params`, in imported modules every chain on an argument annotated `Params`.
  Every such function of an imported module counts, called by this stage or not. The whole object
  handed to a function that does not annotate it `Params`, stored under another name
  (`p = params`), or read with `getattr(params, name)` is missed. A section taken whole
  (`cfg = params.shift`, or `params.model.model_dump()`) is a read of that whole section, so the
  section must be declared even if only a few of its fields are used.
- A chain stops at the first attribute that is not a field of the config model (a method such as
  `model_dump`), and keys use the field's alias (`params.validate_` reads `validate`). A call of a
  method defined on `Params` itself (`params.report_file(...)`) counts as the `self.*` chains in
  that method's body; methods of the nested section models are not followed (their section is read
  whole anyway).
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tasks.config import Params

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("tasks", "pipelines", "flows", "deploy")
RUNNER_CMD = re.compile(r"^python -m pipelines\.(\w+)(\s|$)")

# Files a stage runs without importing them. Each is a dep, and its own imports are followed.
NON_IMPORT_ROUTES: dict[str, tuple[str, ...]] = {
    # package smoke-tests the Bento with `bentoml serve`, which loads deploy/service.py by the name
    # written in deploy/bentofile.yaml (`service: "deploy.service:Classifier"`).
    "package": ("deploy/service.py",),
}


@dataclass(frozen=True)
class Read:
    """One read of the configuration: its params.yaml key ("" for the whole object) and where."""

    key: str
    where: str


def load_stages(dvc_file: Path) -> dict[str, dict]:
    """The stages of a dvc.yaml whose cmd runs a runner in pipelines/, by stage name."""
    stages = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {name: stage for name, stage in stages.items()
            if isinstance(stage.get("cmd"), str) and RUNNER_CMD.match(stage["cmd"])}


def runner_file(stage: dict) -> str:
    return f"pipelines/{RUNNER_CMD.match(stage['cmd']).group(1)}.py"


@lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def module_file(name: str, root: Path) -> str | None:
    """The project file (relative to root) a dotted module name loads; None outside the project and
    for package `__init__.py` files."""
    parts = name.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    path = root.joinpath(*parts).with_suffix(".py")
    return path.relative_to(root).as_posix() if path.is_file() else None


def imported_files(rel: str, root: Path) -> set[str]:
    """Project files named by any import statement of one file."""
    package = rel.rsplit("/", 1)[0].split("/")
    found = set()
    for node in ast.walk(parse(root / rel)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from tasks import evaluate` loads the module tasks/evaluate.py
            names = [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
        else:
            continue
        found |= {file for name in names if (file := module_file(name, root))}
    return found


def import_closure(roots: tuple[str, ...], root: Path) -> dict[str, str]:
    """Every project file reached from `roots` by imports, mapped to a file that imports it."""
    reached = {file: "" for file in roots}
    queue = list(roots)
    while queue:
        current = queue.pop()
        for file in sorted(imported_files(current, root)):
            if file not in reached:
                reached[file] = current
                queue.append(file)
    return reached


def config_key(attrs: list[str]) -> str:
    """The params.yaml key an attribute chain on `Params` reads, cut at the first non-field."""
    model, keys = Params, []
    for attr in attrs:
        field = model.model_fields.get(attr) if model else None
        if field is None:
            break
        keys.append(field.alias or attr)
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return ".".join(keys)


@lru_cache(maxsize=None)
def params_methods() -> dict[str, ast.FunctionDef]:
    """The methods (and properties) defined on `Params`, parsed from its source file."""
    tree = parse(Path(inspect.getsourcefile(Params)))
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == Params.__name__)
    return {node.name: node for node in cls.body if isinstance(node, ast.FunctionDef)}


def method_keys(method: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """The keys a method of `Params` reads on `self`, following calls to its other methods."""
    function = params_methods()[method]
    keys = set()
    if not function.args.args:  # a staticmethod has no `self` to read through
        return keys
    for attrs, _ in chains(function, {function.args.args[0].arg}):
        keys |= attr_keys(attrs, seen | {method})
    return keys


def attr_keys(attrs: list[str], seen: frozenset[str] = frozenset()) -> set[str]:
    """The keys one chain on `Params` reads: a field path, or what a called method of `Params` reads."""
    key = config_key(attrs)
    if key == "" and attrs[0] in params_methods():
        return set() if attrs[0] in seen else method_keys(attrs[0], seen)
    return {key}


def chains(scope: ast.AST, names: set[str]) -> list[tuple[list[str], int]]:
    """Maximal attribute chains `name.a.b...` inside scope on any of `names`, with line numbers."""
    parent = {child: node for node in ast.walk(scope) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(scope):
        if isinstance(node, ast.Name) and node.id in names:
            attrs, top = [], node
            while isinstance(parent.get(top), ast.Attribute) and parent[top].value is top:
                top = parent[top]
                attrs.append(top.attr)
            if attrs:
                found.append((attrs, node.lineno))
    return found


def annotated_params(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Names of a function's arguments annotated as the whole `Params`."""
    args = function.args
    names = set()
    for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
        ann = arg.annotation
        if (isinstance(ann, ast.Name) and ann.id == "Params") or (isinstance(ann, ast.Attribute) and ann.attr == "Params") \
                or (isinstance(ann, ast.Constant) and ann.value == "Params"):
            names.add(arg.arg)
    return names


def param_reads(rel: str, root: Path, entry_point: bool) -> set[Read]:
    """Config reads of one file: in an entry point every chain on `params`, elsewhere chains on
    arguments annotated `Params`. `paths.*` is left out."""
    tree = parse(root / rel)
    scopes: list[tuple[ast.AST, set[str]]] = [(tree, {"params"})] if entry_point else []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (names := annotated_params(node)):
            scopes.append((node, names))
    reads = set()
    for scope, names in scopes:
        for attrs, line in chains(scope, names):
            for key in attr_keys(attrs):
                if key != "paths" and not key.startswith("paths."):
                    reads.add(Read(key, f"{rel}:{line}"))
    return reads


def covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(declared + ".")


def declared_params(stage: dict) -> list[str]:
    """The stage's params.yaml keys (plain entries, or entries under a `params.yaml:` mapping)."""
    keys = []
    for entry in stage.get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):
            keys += [key for key in entry.get("params.yaml") or []]
    return keys


def dep_problems(name: str, stage: dict, root: Path) -> list[str]:
    runner = runner_file(stage)
    if not (root / runner).is_file():
        return [f"stage {name!r}: cmd {stage['cmd']!r} names {runner}, which does not exist"]
    reached = import_closure((runner, *NON_IMPORT_ROUTES.get(name, ())), root)
    declared = {dep for dep in stage.get("deps") or [] if isinstance(dep, str) and dep.endswith(".py")}
    problems = []
    for file in sorted(set(reached) - declared):
        how = f"imported by {reached[file]}" if reached[file] else "run by this stage"
        problems.append(f"stage {name!r}: {file} ({how}) is not a dep; add `- {file}` to stages.{name}.deps")
    for file in sorted(declared - set(reached)):
        problems.append(f"stage {name!r}: dep {file} is not imported by {runner} (directly or not); remove it "
                        f"from stages.{name}.deps, or if the stage runs it without importing it, list it in "
                        f"NON_IMPORT_ROUTES of tests/unit/test_dvc_stages.py with the reason")
    return problems


def param_problems(name: str, stage: dict, root: Path) -> list[str]:
    runner = runner_file(stage)
    entry_points = {runner, *NON_IMPORT_ROUTES.get(name, ())}
    reads = set()
    for file in import_closure(tuple(sorted(entry_points)), root):
        reads |= param_reads(file, root, entry_point=file in entry_points)
    declared = declared_params(stage)
    problems = []
    by_key: dict[str, list[str]] = {}
    for read in reads:
        by_key.setdefault(read.key, []).append(read.where)
    missing = {key for key in by_key if not any(covers(d, key) for d in declared)}
    for key in sorted(missing):
        # one suggestion per missing section: `model` also covers the reads of `model.max_length`
        if any(other != key and covers(other, key) for other in missing):
            continue
        places = sorted(where for other in missing if covers(key, other) for where in by_key[other])
        where = ", ".join(places[:3]) + (" ..." if len(places) > 3 else "")
        if key == "":
            problems.append(f"stage {name!r}: the whole params object is read at {where}; read named keys instead "
                            "so the stage's params can be declared")
        else:
            problems.append(f"stage {name!r}: reads params key {key!r} ({where}) that dvc.yaml does not declare; "
                            f"add `- {key}` to stages.{name}.params")
    for key in declared:
        if not any(covers(key, read) for read in by_key):
            problems.append(f"stage {name!r}: params key {key!r} is declared but never read by its code; remove it "
                            f"from stages.{name}.params")
        elif parent := next((d for d in declared if d != key and covers(d, key)), None):
            problems.append(f"stage {name!r}: params key {key!r} is already covered by {parent!r}; remove it "
                            f"from stages.{name}.params")
    return problems


STAGES = load_stages(REPO / "dvc.yaml")


def test_dvc_yaml_has_runner_stages():
    assert STAGES, "no stage of dvc.yaml runs `python -m pipelines.<name>`; this test checks nothing"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_the_modules_it_imports(name):
    problems = dep_problems(name, STAGES[name], REPO)
    if problems:
        pytest.fail("dvc.yaml deps drifted from the code:\n" + "\n".join(problems), pytrace=False)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_params_are_the_keys_it_reads(name):
    problems = param_problems(name, STAGES[name], REPO)
    if problems:
        pytest.fail("dvc.yaml params drifted from the code:\n" + "\n".join(problems), pytrace=False)


def test_non_import_routes_name_stages_and_files():
    for name, files in NON_IMPORT_ROUTES.items():
        assert name in STAGES, f"NON_IMPORT_ROUTES names stage {name!r}, which dvc.yaml does not run from pipelines/"
        for file in files:
            assert (REPO / file).is_file(), f"NON_IMPORT_ROUTES[{name!r}] names {file}, which does not exist"


@pytest.mark.parametrize("package", PROJECT_PACKAGES)
def test_package_inits_hold_no_code(package):
    """Imports skip `__init__.py` files, which is safe only while they hold at most a docstring."""
    init = REPO / package / "__init__.py"
    if init.is_file():
        body = parse(init).body
        code = body[1:] if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else body
        assert not code, f"{init.relative_to(REPO)} holds code; list it as a dep of the stages that import {package}"


def write_project(root: Path, files: dict[str, str], dvc: str) -> dict[str, dict]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "dvc.yaml").write_text(dvc, encoding="utf-8")
    return load_stages(root / "dvc.yaml")


TOY_FILES = {
    "pipelines/toy.py": (
        "from tasks.config import Params\n"
        "def main(params: Params) -> int:\n"
        "    from tasks import toy_logic\n"
        "    return toy_logic.run(params, params.train.epochs, params.paths.model)\n"
    ),
    "tasks/toy_logic.py": (
        "from tasks.config import Params\n"
        "def run(params: Params, epochs: int, path) -> int:\n"
        "    cfg = params.validate_\n"
        "    return epochs + len(params.ingest.columns.groups) + params.model.model_dump()['max_length']\n"
    ),
    "tasks/config.py": "",
}


@pytest.mark.parametrize(
    ("deps", "params", "expected"),
    [
        ("[pipelines/toy.py, tasks/toy_logic.py, tasks/config.py]", "[train.epochs, validate, ingest.columns, model]", []),
        ("[pipelines/toy.py, tasks/config.py]", "[train, validate, ingest, model]",
         ["tasks/toy_logic.py (imported by pipelines/toy.py) is not a dep; add `- tasks/toy_logic.py`"]),
        ("[pipelines/toy.py, tasks/toy_logic.py, tasks/config.py, tasks/other.py]", "[train, validate, ingest, model]",
         ["dep tasks/other.py is not imported by pipelines/toy.py"]),
        ("[pipelines/toy.py, tasks/toy_logic.py, tasks/config.py]", "[train, ingest.columns.groups, model]",
         ["reads params key 'validate' (tasks/toy_logic.py:3) that dvc.yaml does not declare; add `- validate`"]),
        ("[pipelines/toy.py, tasks/toy_logic.py, tasks/config.py]", "[train, validate, ingest, model, gate]",
         ["params key 'gate' is declared but never read by its code; remove it"]),
        ("[pipelines/toy.py, tasks/toy_logic.py, tasks/config.py]", "[train, train.epochs, validate, ingest, model]",
         ["params key 'train.epochs' is already covered by 'train'"]),
    ],
    ids=["in-sync", "missing-dep", "stale-dep", "missing-param", "stale-param", "redundant-param"],
)
def test_drift_is_reported(tmp_path, deps, params, expected):
    stages = write_project(tmp_path, TOY_FILES, f"stages:\n  toy:\n    cmd: python -m pipelines.toy\n"
                                                f"    deps: {deps}\n    params: {params}\n")
    problems = dep_problems("toy", stages["toy"], tmp_path) + param_problems("toy", stages["toy"], tmp_path)
    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected):
        assert problem.startswith("stage 'toy': ") and fragment in problem, problem
