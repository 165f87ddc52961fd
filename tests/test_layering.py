"""The package's modules import one way, down this table; no import loop.

    0  leaves        features (the input-feature registry), checks, reference, files (file formats), data
                     (dataset files), argtypes (option value types), _C, _runtime_check
    1  ops           the op wrappers
    2  nets          net (CoordinatewiseLSTM), grouped (GroupedLSTM, ParamGroup)
    3  pretrained    shipped and exported optimizers, and a meta-training run's files, loaded as nets
    4  optim         LearnedOptimizer; the package's own __init__ (ops, net, optim)
    5  tasks         the optimizees and their registry
    6  meta          meta-training and evaluation
    7  cli           the l2l-fast command

A module may import its own layer and the layers below it. The one documented exception:
net -> pretrained, the lazy import inside CoordinatewiseLSTM.from_pretrained (a convenience).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "l2l_fast"

LAYERS = [
    ("leaves", {"l2l_fast._C", "l2l_fast._runtime_check", "l2l_fast.features", "l2l_fast.checks",
                "l2l_fast.reference", "l2l_fast.files", "l2l_fast.data", "l2l_fast.argtypes"}),
    ("ops", {"l2l_fast.ops"}),
    ("nets", {"l2l_fast.net", "l2l_fast.grouped"}),
    ("pretrained", {"l2l_fast.pretrained"}),
    ("optim", {"l2l_fast.optim", "l2l_fast"}),
    ("tasks", {"l2l_fast.tasks"}),
    ("meta", {"l2l_fast.meta"}),
    ("cli", {"l2l_fast.cli"}),
]
# (importer, imported): why it is allowed. Only imports inside a function (lazy) may be excepted.
EXCEPTIONS = {("l2l_fast.net", "l2l_fast.pretrained"): "CoordinatewiseLSTM.from_pretrained, a lazy convenience"}


def module_files() -> dict[str, Path]:
    """{dotted module name: its file} for every Python module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest entry that is `module` or a package holding it."""
    best, index = -1, None
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            inside = module == entry or (entry != "l2l_fast" and module.startswith(entry + "."))
            if inside and len(entry) > best:
                best, index = len(entry), i
    if index is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to this file's docstring)")
    return index


def imports_of(module: str, path: Path, known: set[str]):
    """(imported l2l_fast module, line, inside a function) for every import statement of the file, at module
    level and in functions. `from X import name` counts as an import of X.name when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    lazy_nodes = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for node in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for target in targets:
            if target == "l2l_fast" or target.startswith("l2l_fast."):
                # an import of a name defined in a module (not a module itself) is one of that module
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                yield target, node.lineno, id(node) in lazy_nodes


def import_graph():
    modules = module_files()
    known = set(modules) | {"l2l_fast._C"}
    return {module: list(imports_of(module, path, known)) for module, path in modules.items()}


def test_every_import_goes_down_the_layers():
    wrong = []
    for module, imports in import_graph().items():
        for target, line, lazy in imports:
            if layer_of(target) <= layer_of(module):
                continue
            if (module, target) in EXCEPTIONS and lazy:
                continue
            wrong.append(f"{module}:{line} imports {target} ({LAYERS[layer_of(module)][0]} -> "
                         f"{LAYERS[layer_of(target)][0]}{', at module level' if not lazy else ''})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(set(wrong)))


def test_the_exceptions_are_still_needed_and_lazy():
    graph = import_graph()
    for (module, target), why in EXCEPTIONS.items():
        found = [lazy for t, _, lazy in graph[module] if t == target]
        assert found, f"{module} no longer imports {target}: drop the exception ({why})"
        assert all(found), f"{module} imports {target} at module level: only a lazy import is excepted ({why})"


def test_no_import_loop():
    """Also within a layer: a cycle of imports, lazy ones included, other than the excepted edges."""
    graph = {module: {t for t, _, _ in imports if (module, t) not in EXCEPTIONS and t != module}
             for module, imports in import_graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import loop: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_every_layer_entry_exists():
    """A stale entry would hide a module that moved."""
    known = set(module_files()) | {"l2l_fast._C"}
    for name, entries in LAYERS:
        for entry in entries:
            assert entry in known, f"LAYERS[{name!r}] names {entry}, which is no module of the package"


@pytest.mark.parametrize("code", [
    "l2l_fast.LearnedOptimizer([torch.nn.Parameter(torch.zeros(3))])",
    "l2l_fast.CoordinatewiseLSTM.from_pretrained('quadratic')",
    f"l2l_fast.CoordinatewiseLSTM.from_pretrained({str(ROOT / 'tests/fixtures/meta_runs_v1/quadratic/best.pt')!r})",
], ids=["optimizer-defaults", "shipped-net", "run-file"])
def test_using_an_optimizer_imports_no_meta_training(code):
    """The optimizer with its defaults and the loader of nets (a meta-training run's files included) need no
    meta-training code and no task."""
    script = (f"import sys, torch, l2l_fast; {code}; "
              "print(sorted(m for m in sys.modules if m.startswith(('l2l_fast.meta', 'l2l_fast.tasks'))))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
