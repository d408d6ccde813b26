"""The shape of the code: no import cycle inside sae/ and dashboard/ (imports walked with ast, those inside
functions included), no module over about 500 lines, and every stage package says what it owns."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sae", "dashboard")
MAX_LINES = 500


def module_files() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file). `from a.b import c` names a.b.c when
    that is a module, else a.b; a submodule's import does not count as importing its parent package."""
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in modules else base)
        graph[name] = {edge for edge in edges if edge in modules and edge != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring the modules)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph(module_files()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) in (["a", "b", "c", "a"],)
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # and the walker sees imports inside functions
    pkg = tmp_path / "pkgx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("def f():\n    from pkgx import two\n")
    (pkg / "two.py").write_text("from pkgx.one import f\n")
    modules = {"pkgx": pkg / "__init__.py", "pkgx.one": pkg / "one.py", "pkgx.two": pkg / "two.py"}
    assert find_cycle(import_graph(modules)) == ["pkgx.one", "pkgx.two", "pkgx.one"]


def test_no_module_is_too_long():
    long = {name: n for name, path in module_files().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_stage_package_says_what_it_owns_and_may_import():
    for package in ("sae.store", "sae.collect", "sae.kernels", "sae.train", "sae.evaluate", "sae.analyze"):
        doc = importlib.import_module(package).__doc__ or ""
        assert "May import" in doc, package


def test_dashboard_never_imports_the_trainer():
    graph = import_graph(module_files())
    reach, todo = set(), [name for name in graph if name.startswith("dashboard")]
    while todo:
        name = todo.pop()
        for nxt in graph[name] - reach:
            reach.add(nxt)
            todo.append(nxt)
    assert not {name for name in reach if name.startswith(("sae.train", "sae.collect"))}
