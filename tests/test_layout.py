"""The shape of the source tree: layers kept, no import cycle, no overlong module, the Coordinator wired from app.py only.

The layers: ``common`` (what both sides read: wire, codec, formats) imports
neither ``server`` nor ``client``; ``client`` (what a site installs: worker,
export, demo) does not import ``server`` (the aggregator daemon), so a site's
install does not carry the daemon.

A small AST check, no dependency: every ``import`` and ``from … import``
statement of a module counts, wherever it stands (module level, under
``if TYPE_CHECKING:``, inside a function), because each of them ties the two
modules together for whoever reads or changes them. ``from pkg import name``
counts as an import of ``pkg.name`` when that is a module. Imports made by
name at run time (``importlib.import_module("server.cli")`` in common/cli.py)
are not statements and do not count. The generated ``common/pb`` is left out.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping, Set
from pathlib import Path

from tests.scripted import ROOT

PACKAGES = ("server", "client", "common")
GENERATED = ("common.pb",)
MAX_LINES = 500
MAX_COORDINATOR_LINES = 200
# package -> the packages none of its modules may import
LAYERS: dict[str, tuple[str, ...]] = {"common": ("server", "client"), "client": ("server",)}
Graph = Mapping[str, Set[str]]


# ---------------------------------------------------------------- the import graph


def module_files(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under ``packages`` (generated code aside)."""
    out: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join(parts)
            if not _generated(name):
                out[name] = path
    return out


def _generated(name: str) -> bool:
    return any(name == g or name.startswith(g + ".") for g in GENERATED)


def imports_of(name: str, path: Path, modules: Set[str]) -> set[str]:
    """The modules of ``modules`` that ``name`` (at ``path``) imports, by any statement anywhere in it."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(_deepest(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_package, node.module, node.level)
            for alias in node.names:
                # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself.
                found.add(_deepest(f"{base}.{alias.name}" if base else alias.name, modules))
    found.discard("")
    found.discard(name)
    return found


def _absolute(name: str, is_package: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    package = name.split(".") if is_package else name.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _deepest(dotted: str, modules: Set[str]) -> str:
    """The longest prefix of ``dotted`` that is one of ``modules`` ("" if none is)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return ""


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    files = module_files(root, packages)
    return {name: imports_of(name, path, files.keys()) for name, path in files.items()}


# ---------------------------------------------------------------- cycles


def find_cycles(graph: Graph) -> list[list[str]]:
    """The cycles of ``graph``, each as a path ``[a, b, …, a]``; empty when it is acyclic.

    For every node on a cycle, the shortest cycle through it, each cycle once (written from its
    smallest node), so every module of a tangle shows. Edges to nodes that are not keys are ignored.
    """
    cycles: set[tuple[str, ...]] = set()
    for component in _components(graph):
        if len(component) == 1:
            (node,) = component
            if node in graph[node]:
                cycles.add((node, node))
            continue
        for start in component:
            ring = _shortest_cycle(graph, start, component)[:-1]
            first = ring.index(min(ring))
            ring = ring[first:] + ring[:first]
            cycles.add((*ring, ring[0]))
    return sorted(list(c) for c in cycles)


def _components(graph: Graph) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative: no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    out.append(component)
    return out


def _shortest_cycle(graph: Graph, start: str, within: Set[str]) -> list[str]:
    """The shortest path start → … → start inside ``within`` (breadth first, names in sorted order)."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node]):
            if nxt not in within:
                continue
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def describe(cycle: Iterable[str]) -> str:
    return " → ".join(cycle)


# ---------------------------------------------------------------- layers


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_violations(graph: Graph, layers: Mapping[str, Iterable[str]] = LAYERS) -> list[str]:
    """``"a → b"`` for every import of ``graph`` by which a module of a layer reaches a package it may not."""
    return sorted(
        f"{name} → {target}"
        for name, targets in graph.items()
        for package, forbidden in layers.items()
        if _in(name, package)
        for target in targets
        if any(_in(target, f) for f in forbidden)
    )


# ---------------------------------------------------------------- the checker itself


def test_find_cycles_on_synthetic_graphs() -> None:
    assert find_cycles({}) == []
    assert find_cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []  # a diamond
    assert find_cycles({"a": {"outside"}}) == []  # edges out of the graph are not followed
    assert find_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]
    # Two separate cycles, and a node that reaches one without being on it.
    graph = {"x": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}, "p": {"q"}, "q": {"p"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["p", "q", "p"]]
    # One component with a long and a short way round through a: each node's shortest cycle, once.
    graph = {"a": {"b", "e"}, "b": {"c"}, "c": {"d"}, "d": {"a"}, "e": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "d", "a"], ["a", "e", "a"]]
    graph = {"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}
    assert find_cycles(graph) == [["a", "b", "a"], ["a", "c", "a"]]
    assert describe(["a", "b", "a"]) == "a → b → a"


def test_import_graph_counts_type_checking_and_local_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "b.py": "def f():\n    import pkg.c\n",
        "c.py": "from pkg import sub\nfrom . import d as _d\n",
        "d.py": "from .sub.e import x\nimport os\n",
        "sub/__init__.py": "",
        "sub/e.py": "from .. import a\nfrom pkg import missing\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    assert import_graph(tmp_path, ["pkg"]) == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.c"},
        "pkg.c": {"pkg.sub", "pkg.d"},
        "pkg.d": {"pkg.sub.e"},
        "pkg.sub": set(),
        "pkg.sub.e": {"pkg.a", "pkg"},
    }
    assert find_cycles(import_graph(tmp_path, ["pkg"])) == [
        ["pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.sub.e", "pkg.a"]
    ]


def test_layer_violations_on_synthetic_graphs(tmp_path: Path) -> None:
    graph = {
        "common.a": {"common.b"},
        "common.b": {"server.x"},
        "client.w": {"common.a", "server"},
        "client.v": {"client.w"},
        "server.x": {"common.a", "client.w"},
        "commons.z": {"server.x"},  # another package that merely starts with the same letters
    }
    assert layer_violations(graph) == ["client.w → server", "common.b → server.x"]
    assert layer_violations(graph, {"server": ("client",)}) == ["server.x → client.w"]
    # Read from files: a function-local import and one under TYPE_CHECKING count like any other.
    for package, text in {
        "common": "def f():\n    from client import w\n",
        "client": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import server.x\n",
        "server": "",
    }.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / ("x.py" if package == "server" else "w.py")).write_text(text)
    assert layer_violations(import_graph(tmp_path)) == ["client.w → server.x", "common.w → client.w"]


# ---------------------------------------------------------------- the tree


def test_common_imports_neither_server_nor_client_and_client_not_server() -> None:
    leaks = layer_violations(import_graph(ROOT))
    assert not leaks, (
        "imports across layers (common may import neither server nor client; client may not import server; "
        "type-only and function-local imports count). Move what both sides read into common/:\n"
        + "\n".join(f"  {leak}" for leak in leaks)
    )


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph(ROOT))
    assert not cycles, "import cycles (type-only and function-local imports count):\n" + "\n".join(
        f"  {describe(c)}" for c in cycles
    )


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_over_500_lines() -> None:
    long = sorted(
        ((_lines(path), name) for name, path in module_files(ROOT).items() if _lines(path) > MAX_LINES),
        reverse=True,
    )
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(f"  {n:5d} {name}" for n, name in long)


def test_coordinator_is_wiring_only() -> None:
    lines = _lines(ROOT / "server" / "coordinator.py")
    assert lines <= MAX_COORDINATOR_LINES, (
        f"server/coordinator.py has {lines} lines; at most {MAX_COORDINATOR_LINES} (wiring, recovery, start/stop)"
    )


def test_only_app_imports_the_coordinator() -> None:
    graph = import_graph(ROOT)
    importers = sorted(
        name
        for name, targets in graph.items()
        if name.startswith("server.")
        and name not in ("server.app", "server.coordinator")
        and any(t == "server.coordinator" or t.startswith("server.coordinator.") for t in targets)
    )
    assert not importers, (
        "modules of server/ other than server.app that import server.coordinator:\n"
        + "\n".join(f"  {name}" for name in importers)
    )
