"""The shape of the code, checked from its source: imports go one way (runtime <- exporter <- distiller), no
import cycle among project modules at any depth of the code, small modules and functions."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "exporter", "distiller")
# Project imports inside functions: the CLI's commands load the training side when they run (``--help`` and the
# runtime-only install stay free of torch), and three places build a teacher (torch) for a run folder a
# runtime-only install also reads. Everything else imports at the top of the file.
LAZY = {"distiller.runfolder": {"distiller.teachers"}, "distiller.evaluation": {"distiller.teachers"},
        "distiller.bench": {"distiller.teachers"}}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(project module imported, whether inside a function, third-party top names) for every import in the file."""
    def owner(dotted: str) -> str | None:   # the project module a dotted name lives in
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    tree = ast.parse(path.read_text(encoding="utf-8"))
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges, third = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [owner(f"{base}.{a.name}") or base for a in node.names]
        else:
            continue
        for t in targets:
            mod = owner(t)
            if mod is None:
                third.add(t.split(".")[0])
            elif mod != name and not (path.name == "__init__.py" and mod.startswith(name + ".")):
                edges.append((mod, id(node) in inner))
    return edges, third


def _graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_project_modules():
    _, graph = _graph()
    assert _cycles({m: {t for t, _ in e} for m, (e, _) in graph.items()}) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_one_way():
    _, graph = _graph()
    up = [(m, t) for m, (e, _) in graph.items() for t, _ in e
          if (m.startswith("exporter") and t.startswith("distiller"))
          or (m.startswith("runtime") and not t.startswith("runtime"))]
    assert up == []
    torch_in_runtime = [m for m, (_, third) in graph.items() if m.startswith("runtime") and third & {"torch", "torchvision"}]
    assert torch_in_runtime == []


def test_project_imports_sit_at_the_top_of_files():
    _, graph = _graph()
    inner = sorted({(m, t) for m, (e, _) in graph.items() for t, lazy in e
                    if lazy and not m.startswith("distiller.cli") and t not in LAZY.get(m, ())})
    assert inner == []


def test_modules_and_functions_stay_small():
    modules, _ = _graph()
    long_modules, long_functions = [], []
    for name, path in modules.items():
        source = path.read_text(encoding="utf-8")
        if len(source.splitlines()) > 460:
            long_modules.append(name)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{name}.{node.name}")
    assert long_modules == [] and long_functions == []
