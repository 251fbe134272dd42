"""The package's imports run one way: from the command line down to the values, with no circle.

Every ``import`` and ``from ... import`` in src/dycoke_cli is read with ``ast`` (imports inside
functions too: a lazy import is still an edge), resolved to the package's own modules, and the
graph is checked. Nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "dycoke_cli"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (a ``from pkg import sub`` counts as ``pkg.sub``)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name and target != PACKAGE:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_graph_resolves_relative_and_lazy_imports():
    graph = import_graph()
    assert "dycoke_cli.models.registry" in graph["dycoke_cli.models.loader"]  # from .registry import families
    assert "dycoke_cli.video.read" in graph["dycoke_cli.models.qwen2_5_vl"]  # imported inside a method
    assert "dycoke_cli.cli.interrupts" in graph["dycoke_cli.cli.app"]  # from . import interrupts


def test_no_import_circle_in_the_package():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def _inside(graph, prefix: str) -> dict[str, set[str]]:
    return {m: deps for m, deps in graph.items() if m == prefix or m.startswith(prefix + ".")}


def _reaching(deps: set[str], *prefixes: str) -> set[str]:
    return {d for d in deps if any(d == p or d.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("module", ["results", "values", "options", "errors"])
def test_the_values_import_no_stage(module):
    deps = import_graph()[f"{PACKAGE}.{module}"]
    assert deps <= {f"{PACKAGE}.{m}" for m in ("errors", "options", "results", "values")}, deps


@pytest.mark.parametrize("folder,forbidden", [
    ("video", ("models", "decoding", "compression", "cli")),
    ("compression", ("decoding", "models", "cli")),
    ("decoding", ("cli",)),
    ("models", ("decoding", "cli")),
])
def test_stages_import_downward_only(folder, forbidden):
    graph = import_graph()
    bad = {m: sorted(_reaching(deps, *(f"{PACKAGE}.{f}" for f in forbidden)))
           for m, deps in _inside(graph, f"{PACKAGE}.{folder}").items()}
    assert not {m: d for m, d in bad.items() if d}


def test_the_family_seam_imports_no_family_and_only_the_registry_lists_them():
    graph = import_graph()
    families = {f"{PACKAGE}.models.{name}" for name in ("llava_onevision", "qwen2_5_vl", "qwen3_vl", "qwen3_5")}
    assert not graph[f"{PACKAGE}.models.base"] & families
    importers = {m for m, deps in graph.items() if deps & families}
    # a family may build on another (Qwen3.5 shares Qwen3-VL's video and prompt code); nothing
    # else but the registry names one
    assert importers == {f"{PACKAGE}.models.registry", f"{PACKAGE}.models.qwen3_5"}
    assert graph[f"{PACKAGE}.models.qwen3_5"] & families == {f"{PACKAGE}.models.qwen3_vl"}


def test_only_the_entry_points_import_the_command_line():
    graph = import_graph()
    cli = f"{PACKAGE}.cli"
    importers = {m for m, deps in graph.items() if _reaching(deps, cli) and not m.startswith(cli + ".")}
    assert importers == {f"{PACKAGE}.__main__"}


def test_the_product_never_imports_its_test_support():
    graph = import_graph()
    testing = f"{PACKAGE}.testing"
    importers = {m for m, deps in graph.items() if _reaching(deps, testing) and not m.startswith(testing)}
    assert not importers


MAX_FUNCTION_LINES = 60  # issue 30: a function a reader takes in at once
MAX_APP_LINES = 250  # server/app.py: middleware, routes and run only


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long


def test_the_server_app_holds_routes_only():
    assert len((ROOT / "server" / "app.py").read_text().splitlines()) <= MAX_APP_LINES
