"""opad's import graph, read from the source: no cycle among module-level imports, opad.kernels
independent of the trainer, and the op modules free of Triton and opad._C until a kernel runs.

``python tests/test_imports.py`` prints every cycle, module level and function level (an import
inside a function runs at its first call) alike.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "opad"


def _modules() -> dict[str, Path]:
    """Every module of opad by dotted name (a package by its own name, for its __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "export"):  # a link to ../export in a checkout, not the package
            continue
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported opad module, at module level?) for each import in ``path``. ``from a import b``
    imports a.b when that is a module, else a; importing a.b.c runs a and a.b's __init__ too,
    except the importer's own packages, which Python initialises before the importer runs."""
    is_package = path.name == "__init__.py"
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    found: list[tuple[str, bool]] = []

    def add(name: str, top: bool) -> None:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix != module and (prefix not in own or prefix == name):
                found.append((prefix, top))

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # never runs
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, top)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from the module's package, up level - 1
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                submodules = [f"{source}.{alias.name}" for alias in child.names]
                for name in submodules:
                    if name in known:
                        add(name, top)
                if not all(name in known for name in submodules):  # a name defined in source itself
                    add(source, top)
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    """Module -> the opad modules it imports (all of them, or those at module level only)."""
    known = _modules()
    return {m: {target for target, top in _imports(m, p, known) if top or not module_level_only}
            for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(out)


def test_the_walker_sees_imports_at_both_levels():
    graph, lazy = import_graph(module_level_only=True), import_graph(module_level_only=False)
    assert "opad.kernels.dispatch" in graph["opad.kernels.swd"]
    assert "opad.kernels.swd" in graph["opad.train.losses"]
    assert "opad.kernels._swd_triton" not in graph["opad.kernels.swd"]  # imported in a function ...
    assert "opad.kernels._swd_triton" in lazy["opad.kernels.swd"]  # ... which the full graph sees
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_cycle_among_module_level_imports():
    assert cycles(import_graph(module_level_only=True)) == []


def test_opad_kernels_imports_nothing_of_the_trainer():
    graph = import_graph(module_level_only=False)  # function-level imports too
    found = {m: sorted(t for t in targets if t == "opad.train" or t.startswith("opad.train."))
             for m, targets in graph.items() if m == "opad.kernels" or m.startswith("opad.kernels.")}
    assert {m: t for m, t in found.items() if t} == {}


def test_importing_the_ops_imports_neither_triton_nor_the_extension():
    code = ("import sys\n"
            "import opad.kernels.swd, opad.kernels.kv_proj, opad.kernels.feature_pass, opad.train.losses\n"
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.') or m == 'opad._C'))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


if __name__ == "__main__":
    for title, only_top in (("module-level imports", True), ("module- and function-level imports", False)):
        found = cycles(import_graph(module_level_only=only_top))
        print(f"{title}: {len(found)} cycle(s)")
        for component in found:
            print("  " + " <-> ".join(component))
