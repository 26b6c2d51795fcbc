"""The house's floors only point down (../shared/DESIGN.md): no import circle among fastdino's modules, and no
lower floor reaching up.

Read with `ast`, nothing imported. Every `import` counts, at module level or inside a function: a function-level
import only delays the arrow, it does not remove it, so a lazy import that closes a circle is still a circle. The
one exception is the allow-list below, each entry with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Function-level arrows that close no real dependency: (importer, imported) -> why.
LAZY_ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":  # installed as fastdino.kernels (setup.py package_dir)
        parts.insert(0, "fastdino")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / "fastdino").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import mod` names a submodule when one exists, else a name in pkg.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and (name, target) not in LAZY_ALLOWED:
                    graph[name].add(target)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_no_import_circle():
    assert _circles(_import_graph()) == []


def test_no_upward_import():
    rules = [  # (importers, what they must not import, why)
        (("fastdino.models", "fastdino.kernels"), ("fastdino.engine", "fastdino.methods", "fastdino.data"),
         "models and kernels know no loop, method or data"),
        (("fastdino.kernels",), ("fastdino",), "kernels are standalone ops"),
        (("fastdino.data",), ("fastdino.models", "fastdino.methods", "fastdino.engine", "fastdino.config"),
         "data knows no model, method, loop or config"),
        (("fastdino.eval", "fastdino.interop", "fastdino.reports"), ("fastdino.engine.trainer",),
         "evaluation and exports read checkpoints, never the training loop"),
        (("fastdino.errors", "fastdino.schedules", "fastdino.telemetry", "fastdino.file_modes"), ("fastdino",),
         "floor 1 imports no floor"),
    ]
    wrong = []
    for importer, imported in sorted((a, b) for a, targets in _import_graph().items() for b in targets):
        for sources, forbidden, why in rules:
            if _under(importer, *sources) and _under(imported, *forbidden):
                if _under(imported, *sources) and forbidden == ("fastdino",):
                    continue  # a kernel importing a kernel
                wrong.append(f"{importer} -> {imported}: {why}")
    assert wrong == []


def test_graph_sees_known_arrows():
    """The reader itself works: arrows that must exist are found (a test that cannot fail is a bug)."""
    graph = _import_graph()
    assert "fastdino.errors" in graph["fastdino.config"]
    assert "fastdino.engine.backends.base" in graph["fastdino.engine.backends.ddp"]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
