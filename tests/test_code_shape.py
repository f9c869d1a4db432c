"""House rules of the code's shape, checked on the source text alone (ast, no import of the package).

  * no function longer than MAX_FUNCTION_LINES;
  * the package's layers (LAYERS below): a module imports only from its own layer entry or lower ones,
    and two entries of one layer only in the direction SAME_LAYER_DIRECTIONS allows;
  * no import cycle between modules;
  * no public function with more than MAX_ARGS parameters, but for today's debt (TOO_MANY_ARGS).

Every import counts wherever it stands: at the top, inside a function, under `if TYPE_CHECKING:`. The
checkers are plain functions of in-memory sources, tested on a synthetic package at the end of the file.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "audio_residual"

# ----------------------------------------------------------------------------------------------- the rules
# The layers of audio_residual, lowest first. An entry is a package (covering all its modules) or a module.
# A new top-level package or module must be placed here: a module in no entry fails the test.
LAYERS: list[tuple[str, ...]] = [
    ("audio_residual.io", "audio_residual.layout", "audio_residual.names"),  # 0
    ("audio_residual.clap", "audio_residual.data_processing"),  # 1
    ("audio_residual.workspace",),  # 2
    ("audio_residual.tasks",),  # 3
    ("audio_residual.analysis", "audio_residual.residual"),  # 4
    ("audio_residual.training",),  # 5
    ("audio_residual.methods",),  # 6
    ("audio_residual.evaluation",),  # 7
    ("audio_residual.experiments",),  # 8
    ("audio_residual.cli", "audio_residual.demo", "audio_residual.notebook", "audio_residual.__main__"),  # 9
]

# Within one layer, the (importer, imported) pairs of entries allowed, in that direction only: never both
# ways, and a pair of entries not listed may not import each other at all. These are exactly the
# directions that exist today:
#   layer 0: io, layout and names import nothing of each other;
#   layer 1: clap and data_processing import nothing of each other (neither direction is allowed: to let
#            one use the other, add that one pair here, never its reverse);
#   layer 4: residual imports analysis (residual.units fits on analysis.stats); analysis imports nothing
#            of residual;
#   layer 9: cli and notebook import demo; demo imports neither, and cli and notebook not each other.
SAME_LAYER_DIRECTIONS: set[tuple[str, str]] = {
    ("audio_residual.residual", "audio_residual.analysis"),
    ("audio_residual.cli", "audio_residual.demo"),
    ("audio_residual.notebook", "audio_residual.demo"),
    ("audio_residual.__main__", "audio_residual.cli"),
}

MAX_FUNCTION_LINES = 80  # from the `def` line to the end of the body, decorators excluded

MAX_ARGS = 10  # = [tool.ruff.lint.pylint] max-args; self/cls excluded, *args and **kwargs one each

# Public functions over MAX_ARGS today, by file: this list may only shrink. Fix an offender (group its
# options in a dataclass, split the function) and remove it here; the test fails on stale entries too.
TOO_MANY_ARGS: dict[str, set[str]] = {
    "src/audio_residual/analysis/stats.py": {"ResidualStatistics.fit"},
}


# ------------------------------------------------------------------------------------------- the sources
def package_sources(src: Path = SRC, package: str = PACKAGE) -> dict[str, tuple[str, bool]]:
    """Module name → (source, is a package's __init__) for every .py file of the package."""
    sources = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        sources[name] = (path.read_text(encoding="utf-8"), is_package)
    return sources


def _functions(
    tree: ast.AST, prefix: str = "", in_class: bool = False
) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
    """(qualified name, node, is a method) of every function at any depth: `Class.method`, `outer.inner`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield f"{prefix}{node.name}", node, in_class
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.", in_class=True)
        else:
            yield from _functions(node, prefix, in_class)  # functions under if/try/with blocks


def _source_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


# ------------------------------------------------------------------------------------- function length
def long_functions(files: Mapping[str, str], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`path:line name (N lines)` of every function whose def line to last body line exceeds `limit`."""
    found = []
    for path, source in files.items():
        for name, node, _ in _functions(ast.parse(source)):
            lines = node.end_lineno - node.lineno + 1  # node.lineno is the def line, after any decorator
            if lines > limit:
                found.append(f"{path}:{node.lineno} {name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_80_lines():
    files = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in _source_files()}
    offenders = long_functions(files)
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines, split them:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------------------- argument count
def _is_public(qualname: str) -> bool:
    """Every part public: no leading underscore, but dunders (`__init__`, `__call__`) are public."""
    return all(not part.startswith("_") or (part.startswith("__") and part.endswith("__")) for part in qualname.split("."))


def argument_count(node: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> int:
    """Parameters of a definition: self/cls of a method excluded, *args and **kwargs one each."""
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    if is_method and positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    return len(positional) + len(args.kwonlyargs) + (args.vararg is not None) + (args.kwarg is not None)


def too_many_args(files: Mapping[str, str], limit: int = MAX_ARGS) -> dict[str, dict[str, int]]:
    """path → {qualified name: parameter count} of the public functions taking more than `limit`.

    Functions nested in a function are local, not public, and are left out."""
    found: dict[str, dict[str, int]] = {}
    for path, source in files.items():
        tree = ast.parse(source)
        nested = {
            id(inner)
            for outer in ast.walk(tree)
            if isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef)
            for inner in ast.walk(outer)
            if inner is not outer and isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        for name, node, is_method in _functions(tree):
            if id(node) in nested or not _is_public(name):
                continue
            if (count := argument_count(node, is_method)) > limit:
                found.setdefault(path, {})[name] = count
    return found


def test_public_functions_take_at_most_max_args_parameters():
    files = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in _source_files()}
    found = too_many_args(files)
    new = [
        f"{path}: {name} ({count} parameters)"
        for path, names in sorted(found.items())
        for name, count in sorted(names.items())
        if name not in TOO_MANY_ARGS.get(path, set())
    ]
    stale = [
        f"{path}: {name}"
        for path, names in sorted(TOO_MANY_ARGS.items())
        for name in sorted(names)
        if name not in found.get(path, {})
    ]
    message = ""
    if new:
        message += f"public functions over {MAX_ARGS} parameters (group options in a dataclass):\n" + "\n".join(new)
    if stale:
        message += "\nno longer over the limit, remove them from TOO_MANY_ARGS:\n" + "\n".join(stale)
    assert not message, message


# ---------------------------------------------------------------------------------------- import graph
def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest prefix of a dotted name that is a module of ours (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if (candidate := ".".join(parts[:end])) in modules:
            return candidate
    return None


def imports_of(module: str, source: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of `modules` that `module` imports anywhere in its source (functions, TYPE_CHECKING…).

    `import a.b.c` and `from a.b import c` count as importing the most specific module named (a.b.c if
    it is one, else a.b); the parent packages' __init__ that Python runs on the way are not counted, so
    that a package's __init__ re-exporting its modules is no cycle with them.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for name in names if (target := _resolve(name, modules)) is not None}
    found.discard(module)
    return found


def module_graph(sources: Mapping[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """Module → the modules of the same sources it imports."""
    modules = set(sources)
    return {name: imports_of(name, source, is_package, modules) for name, (source, is_package) in sources.items()}


def _entry(module: str, layers: list[tuple[str, ...]]) -> tuple[str, int] | None:
    """The layer entry covering `module` (itself or a package above it) and its layer."""
    for layer, entries in enumerate(layers):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):
                return entry, layer
    return None


def layer_violations(
    graph: Mapping[str, set[str]],
    layers: list[tuple[str, ...]],
    same_layer: set[tuple[str, str]],
    root: str = PACKAGE,
) -> list[str]:
    """Each package or module in no layer, each upward import `importer -> imported (layer a -> layer b)`, and each
    import between two entries of one layer in a direction `same_layer` does not allow.

    The root package (`root`'s __init__, which every import of the package runs first) is in no layer: any
    module may import it, it may import none of them.
    """
    stray: dict[str, int] = {}  # the package or module right under the root, and how many modules it has
    for module in graph:
        if module != root and _entry(module, layers) is None:
            top = ".".join(module.split(".")[: len(root.split(".")) + 1])
            stray[top] = stray.get(top, 0) + 1
    found = [
        f"{top}: in no layer of the table ({n} module{'s' if n > 1 else ''})" for top, n in sorted(stray.items())
    ]
    for importer in sorted(graph):
        for imported in sorted(graph[importer]):
            if imported == root:
                continue
            if importer == root:
                found.append(f"{importer} -> {imported} (the root package must import nothing of the package)")
                continue
            source, target = _entry(importer, layers), _entry(imported, layers)
            if source is None or target is None:
                continue  # reported above
            (a_entry, a), (b_entry, b) = source, target
            if b > a:
                found.append(f"{importer} -> {imported} (layer {a} -> layer {b})")
            elif a == b and a_entry != b_entry and (a_entry, b_entry) not in same_layer:
                found.append(
                    f"{importer} -> {imported} (layer {a} -> layer {b}: {a_entry} may not import {b_entry})"
                )
    return found


def _strongly_connected(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module, each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _shortest_cycle(graph: Mapping[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest import path from `start` back to itself inside one component (breadth first), written
    from its smallest module so that one cycle always reads the same."""
    parents: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node] & within):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                cycle = path[::-1]  # start ... node, and node imports start
                first = cycle.index(min(cycle))
                cycle = cycle[first:] + cycle[:first]
                return [*cycle, cycle[0]]
            if nxt not in parents:
                parents[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is on no cycle of its component")


def import_cycles(graph: Mapping[str, set[str]]) -> list[str]:
    """`a -> b -> a` for the shortest cycle through each module of each cyclic component, once each."""
    found: list[str] = []
    for component in _strongly_connected(graph):
        members = set(component)
        for start in component:
            cycle = " -> ".join(_shortest_cycle(graph, start, members))
            if cycle not in found:
                found.append(cycle)
    return found


def test_the_layer_table_is_well_formed():
    entries = [entry for layer in LAYERS for entry in layer]
    assert len(entries) == len(set(entries)), "an entry is in two layers"
    nested = [(a, b) for a in entries for b in entries if b.startswith(a + ".")]
    assert not nested, f"an entry inside another one makes its layer ambiguous: {nested}"
    for importer, imported in SAME_LAYER_DIRECTIONS:
        assert importer in entries and imported in entries, (importer, imported)
        assert _entry(importer, LAYERS)[1] == _entry(imported, LAYERS)[1], f"{importer}, {imported}: not one layer"
        assert (imported, importer) not in SAME_LAYER_DIRECTIONS, f"{importer} <-> {imported}: one direction only"


def test_every_module_is_in_a_layer_and_imports_only_down():
    violations = layer_violations(module_graph(package_sources()), LAYERS, SAME_LAYER_DIRECTIONS)
    assert not violations, "imports against the layers (see LAYERS in this file):\n" + "\n".join(violations)


def test_no_import_cycle_between_modules():
    cycles = import_cycles(module_graph(package_sources()))
    assert not cycles, "import cycles between modules:\n" + "\n".join(cycles)


# ------------------------------------------------------------------------- the checkers, on a toy package
TOY_LAYERS = [("toy.base",), ("toy.left", "toy.right"), ("toy.top",)]
TOY_SOURCES = {
    "toy": ('"""Root: imports nothing."""\n', True),
    "toy.base": ("from __future__ import annotations\nimport os\n", False),
    "toy.left": ("from toy import base\n", True),
    "toy.left.a": (  # a function-local upward import, and the first half of a cycle
        "from .b import thing\n\ndef f():\n    from toy.top import run\n    return run\n",
        False,
    ),
    "toy.left.b": (  # closes the cycle a -> b -> a under TYPE_CHECKING; imports right, the allowed way
        "from typing import TYPE_CHECKING\nimport toy.right.c\nif TYPE_CHECKING:\n    from toy.left import a\n",
        False,
    ),
    "toy.right": ("", True),
    "toy.right.c": ("from ..base import x\nimport toy\n", False),
    "toy.top": ("import toy.left.a\n", False),
    "toy.stray": ("", False),
}


def test_the_checkers_find_an_upward_import_a_cycle_and_a_stray_module():
    graph = module_graph(TOY_SOURCES)
    assert graph["toy.left.a"] == {"toy.left.b", "toy.top"}
    assert graph["toy.left.b"] == {"toy.left.a", "toy.right.c"}
    assert graph["toy.right.c"] == {"toy.base", "toy"}
    assert layer_violations(graph, TOY_LAYERS, {("toy.left", "toy.right")}, root="toy") == [
        "toy.stray: in no layer of the table (1 module)",
        "toy.left.a -> toy.top (layer 1 -> layer 2)",
    ]
    assert layer_violations(graph, TOY_LAYERS, set(), root="toy")[-1] == (
        "toy.left.b -> toy.right.c (layer 1 -> layer 1: toy.left may not import toy.right)"
    )
    # a -> top -> a is a cycle too (through the function-local import)
    assert import_cycles(graph) == ["toy.left.a -> toy.left.b -> toy.left.a", "toy.left.a -> toy.top -> toy.left.a"]
    assert import_cycles({"x": {"y"}, "y": {"z"}, "z": set()}) == []


def test_the_shape_checkers_count_lines_and_public_parameters():
    source = (
        "import functools\n\n"
        "@functools.cache\n"
        "def long(a, b, *args, c, **kwargs):\n" + "    x = 1\n" * 80 + "\n"
        "class K:\n"
        "    def method(self, a, b, c):\n        pass\n\n"
        "    def _private(self, a, b, c, d):\n        pass\n"
    )
    assert long_functions({"m.py": source}) == ["m.py:4 long (81 lines)"]
    assert too_many_args({"m.py": source}, limit=3) == {"m.py": {"long": 5}}
