"""The package's layering, read from the source (nothing is imported or run).

Every module of qs4d_np is parsed and its import statements collected, wherever
they stand (a deferred import inside a function counts), except

* imports under ``if TYPE_CHECKING:`` (annotations only, never executed), and
* the deprecated PTQ aliases (``LAZY_ALIASES``): ``qs4d_np.quant.ptq`` imports
  ``qs4d_np.train.ptq`` when an old name is used, never at import time.

An import names the module it loads: ``from qs4d_np.quant import scan`` is the
module ``qs4d_np.quant.scan``, ``from qs4d_np.quant import QuantConfig`` the
package file ``qs4d_np/quant/__init__.py``; importing ``qs4d_np.quant.scan``
from outside quant/ also runs that ``__init__``, which counts too. The
top-level ``qs4d_np/__init__.py``, which every import runs, does not: it is a
facade importing the models, so counting it would tie every module to it.

Checked: (a) no import cycle between files; (b) the package order below; (c) no
package reads a private attribute (``<expr>._name``, one leading underscore or
a mangled ``__name``, not a dunder) of another object: <expr> must be ``self``,
``cls`` or ``super()``. Objects of other libraries are not ours to police: an
access whose expression starts at a name the file imported from outside qs4d_np
(``argparse._SubParsersAction`` in an annotation, ``np._core``) is allowed;
(d) no file is longer than ``MAX_LINES`` lines.
``test_checks_catch_violations`` runs the four checks on a small package with
one violation of each kind, so a check that silently passes everything fails.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "qs4d_np"

# The package order, bottom first. A module may import modules of its own unit and of units in
# lower layers only (units of one layer do not import each other, except the PEER_IMPORTS).
# A unit is a subpackage, ``io`` (qs4d_np/io.py) or ``qs4d_np`` (the top-level __init__).
LAYERS = (
    ("kernels", "io"),       # Numba kernels; io: atomic .npz / JSON files. Neither imports any other unit.
    ("core",),               # Module, checks, the generic ops
    ("quant", "data"),       # quantizers, config, quantized scan; data: datasets (core's checks and io)
    ("ssm",),                # the S4D layer
    ("models",),             # blocks and S4DModel
    ("train", "golden", "hardware"),
    ("sweep",),              # sweeps and the bit-allocation search on Dask (the commands come from cli)
    ("cli", PACKAGE),        # the command line; the top-level __init__, a facade over core, ssm and
                             # models that nothing inside the package imports
)
# train -> hardware: noise-aware training perturbs weights with hardware.noise (hardware never imports train).
PEER_IMPORTS = {("train", "hardware")}

# Imports exempt from (a) and (b), by module and the function holding them: the deprecated aliases.
LAZY_ALIASES = {"qs4d_np.quant.ptq": {"moved_attribute"}}

# A module this long holds more than one job: split it along its seams (docs/ARCHITECTURE.md).
MAX_LINES = 450



# -- reading the package ----------------------------------------------------------------------
def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def unit(module: str) -> str:
    """The unit of a module: its subpackage, ``io``, or the top-level package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.AST, skip_functions: set[str]):
    """Every import statement of ``tree``, leaving out ``if TYPE_CHECKING:`` bodies and the named functions."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in skip_functions:
            continue
        else:
            stack.extend(ast.iter_child_nodes(node))


def module_imports(module: str, path: Path, known: dict[str, Path], package: str) -> list[tuple[str, int]]:
    """(imported module of ``package``, line) for each import in ``module`` (module docstring)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in _statements(tree, LAZY_ALIASES.get(module, set())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the current package, up level - 1
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:  # ``import a.b.c`` of a name inside a module
                target = target.rpartition(".")[0]
            if target.split(".")[0] != package:
                continue
            parts = target.split(".")
            runs = [".".join(parts[:i]) for i in range(2, len(parts))]  # subpackage __init__s on the way,
            runs = [t for t in runs if not module.startswith(t + ".")]   # except those of the module itself
            out += [(t, node.lineno) for t in runs + [target] if t != module]
    return out


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of its first import}, within ``package``."""
    known = package_modules(root, package)
    graph = {}
    for module, path in known.items():
        edges: dict[str, int] = {}
        for target, line in module_imports(module, path, known, package):
            edges.setdefault(target, line)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_violations(graph: dict[str, dict[str, int]], layers=LAYERS, peers=PEER_IMPORTS) -> list[str]:
    """Imports against the package order, and units missing from ``layers``."""
    rank = {u: i for i, layer in enumerate(layers) for u in layer}
    problems = sorted({f"unit {unit(m)!r} has no place in LAYERS" for m in graph if unit(m) not in rank})
    for module, edges in sorted(graph.items()):
        a = unit(module)
        for target, line in sorted(edges.items()):
            b = unit(target)
            if a == b or a not in rank or b not in rank or (a, b) in peers:
                continue
            if rank[b] >= rank[a]:
                where = "the layer of" if rank[b] == rank[a] else "a layer above"
                problems.append(f"{module} (line {line}) imports {target}: {b!r} is in {where} {a!r}")
    return problems


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def private_accesses(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, expression) of each ``<expr>._name`` in the file where <expr> is another object of ours."""
    tree = ast.parse(path.read_text(), str(path))
    foreign = set()  # names bound to other libraries' modules and objects
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            foreign |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] != package}
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] != package:
            foreign |= {a.asname or a.name for a in node.names}
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
            continue
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
            continue
        start = value
        while isinstance(start, ast.Attribute):
            start = start.value
        if isinstance(start, ast.Name) and start.id in foreign:
            continue
        out.append((node.lineno, ast.unparse(node)))
    return sorted(out)


def private_violations(root: Path, package: str) -> list[str]:
    """Every private access of another object in the package, as 'file:lines: expression ...'."""
    problems = []
    for path in package_modules(root, package).values():
        rel = path.relative_to(root).as_posix()
        found = private_accesses(path, package)
        for expr in sorted({e for _, e in found}):
            lines = ", ".join(str(line) for line, e in found if e == expr)
            problems.append(f"{rel}:{lines}: {expr} reads a private attribute of another object")
    return problems


def long_modules(root: Path, package: str, limit: int) -> list[str]:
    """'file: N lines' for every .py file of ``package`` under ``root`` with more than ``limit`` lines."""
    lines = {path.relative_to(root).as_posix(): path.read_text().count("\n")  # as ``wc -l`` counts
             for path in package_modules(root, package).values()}
    return [f"{name}: {n} lines" for name, n in sorted(lines.items()) if n > limit]


# -- the package ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(ROOT, PACKAGE)


def test_no_import_cycle_between_modules(graph):
    found = cycles(graph)
    assert not found, "import cycles (each a set of modules importing each other):\n" + "\n".join(map(str, found))


def test_packages_import_only_lower_layers(graph):
    problems = layer_violations(graph)
    assert not problems, "\n".join(problems)
    # spelled out for the bottom layer: the kernels need nothing of the package outside kernels/
    assert {t for m, e in graph.items() if unit(m) == "kernels" for t in e if unit(t) != "kernels"} == set()


def test_no_private_attribute_reads_of_other_objects():
    problems = private_violations(ROOT, PACKAGE)
    assert not problems, "\n".join(problems)


def test_no_module_over_450_lines():
    found = long_modules(ROOT, PACKAGE, MAX_LINES)
    assert not found, f"files over {MAX_LINES} lines (split each along its seams):\n" + "\n".join(found)


# -- the checks themselves ----------------------------------------------------------------------
SAMPLE = {  # one violation of each kind, and the exemptions, in a package named like ours
    "__init__.py": "",
    "kernels/__init__.py": "",
    "kernels/fast.py": "from qs4d_np.core.ops import check\n",               # kernels -> core: against the order
    "core/__init__.py": "",
    "core/ops.py": ("from typing import TYPE_CHECKING\n"
                    "import argparse\n"
                    "from qs4d_np.kernels import fast\n"                  # core -> kernels -> core: a cycle
                    "if TYPE_CHECKING:\n"
                    "    from qs4d_np.golden.reader import read\n"        # exempt: annotations only
                    "def check(op, p: argparse._SubParsersAction):\n"    # exempt: not our object
                    "    return op._params, self._cache, super()._x\n"),  # op._params counts
}


def test_checks_catch_violations(tmp_path):
    for name, text in SAMPLE.items():
        (tmp_path / PACKAGE / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PACKAGE / name).write_text(text)
    g = import_graph(tmp_path, PACKAGE)
    assert g["qs4d_np.core.ops"] == {"qs4d_np.kernels": 3, "qs4d_np.kernels.fast": 3}  # not the TYPE_CHECKING one
    assert cycles(g) == [["qs4d_np.core.ops", "qs4d_np.kernels.fast"]]
    assert layer_violations(g) == [
        "qs4d_np.kernels.fast (line 1) imports qs4d_np.core: 'core' is in a layer above 'kernels'",
        "qs4d_np.kernels.fast (line 1) imports qs4d_np.core.ops: 'core' is in a layer above 'kernels'"]
    assert layer_violations(g, layers=(("core",), ("kernels",))) == [
        "unit 'qs4d_np' has no place in LAYERS",
        "qs4d_np.core.ops (line 3) imports qs4d_np.kernels: 'kernels' is in a layer above 'core'",
        "qs4d_np.core.ops (line 3) imports qs4d_np.kernels.fast: 'kernels' is in a layer above 'core'"]
    assert private_accesses(tmp_path / PACKAGE / "core/ops.py", PACKAGE) == [(7, "op._params")]
    assert private_violations(tmp_path, PACKAGE) == [
        "qs4d_np/core/ops.py:7: op._params reads a private attribute of another object"]
    assert long_modules(tmp_path, PACKAGE, limit=6) == ["qs4d_np/core/ops.py: 7 lines"]
    assert long_modules(tmp_path, PACKAGE, limit=7) == []  # at the limit is within it
