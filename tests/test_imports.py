"""The package's import structure: every module imports on its own, no cycles, layers point downwards.

The graph is read from the source (every ``import``/``from … import`` of an ``orthotorch`` module, at any depth of
the file except under ``if TYPE_CHECKING:``), so a cycle hidden behind a function-local import counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import orthotorch

SRC = Path(orthotorch.__file__).resolve().parent
ALL_MODULES = sorted(
    ".".join(("orthotorch", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
    for p in SRC.rglob("*.py")
)

#: Layer of each top-level part: a module may import only from its own layer or lower ones.
LAYERS = {
    "_validation": 0,
    "_numerics": 0,
    "_compat": 0,
    "_threads": 0,
    "graph_sampling": 1,
    "manifolds": 1,
    "optim": 2,
    "parametrize": 2,
    "nn": 3,
    "attention": 3,
    "bilevel": 3,
    "rl": 4,
    "apps": 5,
    "__main__": 5,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> set[str]:
    """orthotorch modules imported anywhere in ``path`` (outside ``if TYPE_CHECKING``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("orthotorch"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("orthotorch"):
                found.add(target)
                # `from orthotorch.x import y` may name a submodule y
                found.update(
                    f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in ALL_MODULES
                )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {m for m in found if m in ALL_MODULES and m != module}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for p in SRC.rglob("*.py"):
        module = ".".join(("orthotorch", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        graph[module] = _imports(p, module)
    return graph


def _edges_without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # A package's __init__ re-exporting its submodules is not a cycle with them: importing a submodule
    # runs the parent __init__ first by Python's rules, which the graph would otherwise count as an edge.
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}


def test_no_import_cycle():
    graph = _edges_without_package_inits(_graph())
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = [*stack[stack.index(t) :], t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_layers_point_downwards():
    bad = []
    for module, targets in _graph().items():
        src = LAYERS.get(_part(module), 0)
        for t in targets:
            dst_part = _part(t)
            if dst_part and dst_part != _part(module) and LAYERS.get(dst_part, 0) > src:
                bad.append(f"{module} imports {t}")
    assert not bad, "imports that point upwards (docs/design.md, Layers):\n" + "\n".join(
        sorted(bad)
    )


def test_graph_reader_sees_a_function_local_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from orthotorch.optim import OrthogonalSGD\n")
    assert "orthotorch.optim" in _imports(f, "orthotorch.manifolds.m")


def test_every_module_imports_fresh():
    """Each module imported first, in a clean interpreter state (a broken import order shows up here)."""
    code = (
        "import importlib, sys\n"
        f"mods = {ALL_MODULES!r}\n"
        "failed = []\n"
        "for m in mods:\n"
        "    if m == 'orthotorch.__main__':\n"
        "        continue\n"
        "    for k in [k for k in sys.modules if k == 'orthotorch' or k.startswith('orthotorch.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
