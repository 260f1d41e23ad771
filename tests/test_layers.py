"""The layer rule: lower layers never import upper ones; `import lowbit` stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"
BASE = {"errors", "version"}
LOW = BASE | {"formats"}
ALLOWED = {
    "formats": BASE,
    "observers": LOW,
    "kernels": LOW,
    "nn": LOW | {"kernels", "observers"},
    # (layer 3 holds the kernels: GPTQ's column loops run in lowbit's C library)
    "algorithms": LOW | {"observers", "kernels"},
    "runtime": LOW | {"kernels", "nn"},
    "model": LOW | {"observers", "kernels", "nn", "algorithms", "runtime", "model"},
}
# data sits on the model layer: it resolves tokenizer names through the model's loaders
ALLOWED["data"] = BASE | {"model"}
ALLOWED["eval"] = ALLOWED["model"] | {"model", "data", "eval"}
ALLOWED["training"] = ALLOWED["model"] | {"model", "data", "training"}
ALLOWED["export"] = ALLOWED["model"] | {"export"}
ALLOWED["cli"] = None  # the top: may import anything


def _lowbit_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lowbit" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layers_never_import_upper_ones(layer):
    folder = SRC / layer
    if not folder.exists():
        pytest.skip(f"lowbit.{layer} does not exist yet")
    allowed = ALLOWED[layer]
    if allowed is None:
        return
    allowed = allowed | {layer}
    bad = {
        f"{p.relative_to(SRC)} imports lowbit.{m}"
        for p in folder.rglob("*.py")
        for m in _lowbit_imports(p)
        if m not in allowed
    }
    assert not bad, sorted(bad)


def test_import_is_light():
    code = (
        "import sys, lowbit, lowbit.formats, lowbit.observers\n"
        "heavy = [m for m in ('transformers', 'onnx', 'matplotlib', 'gguf') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _module_name(path: Path) -> str:
    parts = ("lowbit",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the lowbit modules it imports anywhere in its file (lazy imports inside
    functions included: they only hide a cycle from the interpreter, not from a reader)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from pkg import mod" names a submodule when pkg.mod is one
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_inside_the_package():
    import sys

    sys.setrecursionlimit(10000)
    assert _cycles(_import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_shadowed_by_a_function_of_its_package():
    """After importing every module, ``package.name`` is still the module ``package.name``
    (a package that re-exports a function named like one of its modules hides the module)."""
    code = (
        "import importlib, pkgutil, sys, lowbit\n"
        "names = [m.name for m in pkgutil.walk_packages(lowbit.__path__, 'lowbit.')]\n"
        "for n in names: importlib.import_module(n)\n"
        "for n in names:\n"
        "    parent, _, child = n.rpartition('.')\n"
        "    attr = getattr(sys.modules[parent], child, None)\n"
        "    if attr is not None and attr is not sys.modules[n]: print(n)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []
