"""The package's shape: no import cycles, the studies stay outside the algorithm and the runner, short functions.

The import graph is read from the source (every `import`, at module level or inside a function, except under
`if TYPE_CHECKING:`), so a lazy import that closes a cycle counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import adarank

ROOT = Path(adarank.__file__).resolve().parent
#: the two command-line entry points of the studies: `python -m adarank.report`, `python -m adarank.analyze`
STUDY_SHIMS = {"adarank.report", "adarank.analyze"}
#: functions allowed past MAX_LINES: the training loop, which reads top to bottom in one place
LONG_ALLOWED = {("adarank.runner.train", "train"): 130}
MAX_LINES = 80


def module_name(path: Path) -> str:
    parts = ("adarank",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes, skipping `if TYPE_CHECKING:` blocks (annotations only, never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str) -> set[str]:
    """The adarank modules that module `name` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: imports_of(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-loops."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_there_are_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_algorithm_and_the_runner_never_import_the_studies():
    offenders = {v: sorted(w for w in ws if w.startswith("adarank.studies"))
                 for v, ws in GRAPH.items() if not v.startswith("adarank.studies") and v not in STUDY_SHIMS}
    assert {v: ws for v, ws in offenders.items() if ws} == {}


def test_the_algorithm_never_imports_the_runner():
    algorithm = [v for v in GRAPH if not v.startswith(("adarank.runner", "adarank.studies", "adarank.fast"))
                 and v not in STUDY_SHIMS | {"adarank.run", "adarank.export_topk"}]
    assert {v: sorted(w for w in GRAPH[v] if w.startswith("adarank.runner")) for v in algorithm
            if any(w.startswith("adarank.runner") for w in GRAPH[v])} == {}


def test_the_fast_path_imports_neither_the_runner_nor_the_studies():
    fast = [v for v in GRAPH if v.startswith("adarank.fast")]
    assert {v: sorted(GRAPH[v]) for v in fast if any(w.startswith(("adarank.runner", "adarank.studies")) for w in GRAPH[v])} == {}


def _is_triton_kernel(fn: ast.FunctionDef) -> bool:
    return any("jit" in ast.unparse(d) for d in fn.decorator_list)


def long_functions() -> list[str]:
    out = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONG_ALLOWED.get((name, node.name), MAX_LINES):
                    out.append(f"{name}.{node.name}: {lines} lines")
    return out


def test_no_function_is_longer_than_80_lines():
    assert long_functions() == []


@pytest.mark.parametrize("entry", ["adarank.run", "adarank.report", "adarank.analyze", "adarank.export_topk"])
def test_the_entry_points_exist(entry):
    assert entry in MODULES and "__main__" in MODULES[entry].read_text()
