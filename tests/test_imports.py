"""modasm's modules import each other one way: the import graph has no cycle."""
import ast
from pathlib import Path

from conftest import ROOT


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, from every import statement in it (also those inside functions:
    a lazy import still makes the two modules depend on each other). ``from P import n`` counts as importing the
    module P.n when there is one, else P; relative imports are resolved against the importing module."""
    root = package.parent
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]  # the package of a relative import
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a list of its modules."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_and_relative_imports():
    g = import_graph(ROOT / "modasm")
    assert "modasm.data.contract" in g["modasm.data.transforms"]  # from .contract import ... (relative)
    assert "modasm.config" in g["modasm.data.transforms"]  # from ..config import ... (two levels up)
    assert "modasm.data.tensor_aug" in g["modasm.data.dali"]  # from . import tensor_aug (a module by name)
    assert "modasm.data.wds" in g["modasm.data"]  # imported inside build_datasets (lazy)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modasm_has_no_import_cycles():
    found = cycles(import_graph(ROOT / "modasm"))
    assert not found, "modules that import each other (directly or around a circle): " + "; ".join(
        " <-> ".join(c) for c in found)
