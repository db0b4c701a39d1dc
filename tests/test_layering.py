"""The package's layering, read from its own imports (top-level and inside functions).

Subpackages are ordered; a module may import from its own subpackage or from one earlier in
``LAYERS``, never from a later one, and the module graph has no cycle. No module imports
another module's ``_private`` name, and no module is over 400 lines. The checker works on any
tree, so its own failure is shown on a small package made for the purpose.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import flexsurgeon

# imports point from right to left only; the base modules (first entry) import no other part
LAYERS = (("errors", "utils", "version"), "hub", "layers", "surgery", "checkpoints", "runs", "data", "training",
          "plotting", "commands", ("cli", "launch"))
MAX_LINES = 400
PACKAGE = Path(flexsurgeon.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _imports(path: Path, name: str, modules: dict[str, Path]):
    """``(line, target module, imported names)`` for every import of the package in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = next(iter(modules)).split(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == top:
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != top:
                continue
            names = []
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:  # a submodule: the import points at it
                    yield node.lineno, f"{target}.{alias.name}", []
                else:
                    names.append(alias.name)
            if names:
                yield node.lineno, target, names


def _rank(name: str) -> int | None:
    """Where a module sits in LAYERS; None for the package itself (its lazy public surface) and __main__."""
    parts = name.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return None
    for i, layer in enumerate(LAYERS):
        if parts[1] in ((layer,) if isinstance(layer, str) else layer):
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def layering_problems(root: Path) -> list[str]:
    """Every import against the order, every cycle and every private name crossing modules, as text
    naming both files."""
    modules = _modules(root)
    rel = {name: str(path.relative_to(root.parent)) for name, path in modules.items()}
    problems, graph = [], {name: set() for name in modules}
    for name, path in modules.items():
        for line, target, names in _imports(path, name, modules):
            if target not in modules:
                problems.append(f"{rel[name]}:{line} imports {target}, which does not exist")
                continue
            graph[name].add(target)
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != name:
                problems.append(f"{rel[name]}:{line} imports private {', '.join(private)} from {rel[target]}")
            here, there = _rank(name), _rank(target)
            if here is None:
                continue
            if there is None or there > here:
                problems.append(f"{rel[name]}:{line} imports upwards from {rel[target]}")
    # cycles: depth-first search over the module graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                problems.append("import cycle: " + " -> ".join(rel[c] for c in cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return problems


def test_the_package_imports_one_way_with_no_cycle_and_no_private_name():
    assert layering_problems(PACKAGE) == []


def test_an_upward_import_a_cycle_and_a_private_name_are_each_named(tmp_path):
    pkg = tmp_path / "flexsurgeon"
    for folder in ("layers", "surgery", "cli"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "layers" / "pools.py").write_text("def make():\n    from ..surgery.apply import apply_plan\n")
    (pkg / "surgery" / "apply.py").write_text("from . import plan\ndef apply_plan(): pass\n")
    (pkg / "surgery" / "plan.py").write_text("from .apply import apply_plan\n")
    (pkg / "cli" / "main.py").write_text("from ..layers.pools import _secret\n")
    problems = layering_problems(pkg)
    assert "flexsurgeon/layers/pools.py:2 imports upwards from flexsurgeon/surgery/apply.py" in problems
    assert any(p.startswith("import cycle:") and "flexsurgeon/surgery/apply.py" in p
               and "flexsurgeon/surgery/plan.py" in p for p in problems)
    assert "flexsurgeon/cli/main.py:1 imports private _secret from flexsurgeon/layers/pools.py" in problems
    assert len(problems) == 3


def test_tests_import_public_names_only():
    modules = _modules(PACKAGE)
    private = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flexsurgeon"):
                private += [f"{path.name}:{node.lineno} {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")
                            and f"{node.module}.{a.name}" not in modules]
    assert private == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_plan_record_imports_no_torch():
    """Reading a plan (a folder's config.json) needs the standard library only."""
    code = ("import sys, flexsurgeon.surgery.plan; "
            "print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
