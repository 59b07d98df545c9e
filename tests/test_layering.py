"""The package's modules import in one direction only, read from the source (``ast``):
no import circle between files, and, one level up, no circle between its rooms (each
folder of ``dm_agent/``, and each module at its top), which therefore stand in layers
that every import runs down. Lazy imports inside functions and ``TYPE_CHECKING`` imports
count: they hide a circle from Python, not from a reader."""

from __future__ import annotations

import ast
import itertools
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import dm_agent

PACKAGE = Path(dm_agent.__file__).parent


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """The dm_agent modules ``path`` imports, wherever the import statement sits."""
    root = package.parent
    name = module_name(path, package)
    parent = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dm_agent"))
        elif isinstance(node, ast.ImportFrom):
            base = parent
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            if node.level:
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("dm_agent"):
                continue
            # "from . import x" names a module, "from .x import y" a member of one
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if (root / (sub.replace(".", "/") + ".py")).exists()
                          or (root / sub.replace(".", "/")).is_dir() else target)
    found.discard(name)
    found.discard("dm_agent")  # the package's __init__ holds only the version
    return found


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(p, package): imports(p, package) for p in package.rglob("*.py")}


def cycle(g: Mapping[str, set[str] | Mapping[str, object]]) -> list[str] | None:
    """One import circle of ``g``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


# --- one level up: the rooms of the package -------------------------------------------

def room(module: str) -> str:
    """The room a module stands in: its folder under dm_agent/ (``dm_agent.round.agent``
    -> ``round``), or itself for a module at the top (``dm_agent.cli`` -> ``cli``)."""
    return module.split(".")[1]


def rooms(g: Mapping[str, set[str]]) -> dict[str, dict[str, list[str]]]:
    """room -> the rooms it imports -> the imports that tie them, ``module -> module``."""
    out: dict[str, dict[str, list[str]]] = {}
    for module, targets in g.items():
        if module == "dm_agent":
            continue
        ties = out.setdefault(room(module), {})
        for target in sorted(targets):
            if room(target) != room(module):
                ties.setdefault(room(target), []).append(f"{module} -> {target}")
    return out


def circles(r: Mapping[str, Mapping[str, object]]) -> list[list[str]]:
    """The groups of rooms that import each other in a circle (Tarjan's strongly
    connected components of more than one room), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for n in sorted(r.get(name, ())):
            if n not in index:
                visit(n)
                low[name] = min(low[name], low[n])
            elif n in stack:
                low[name] = min(low[name], index[n])
        if low[name] == index[name]:
            group = []
            while True:
                n = stack.pop()
                group.append(n)
                if n == name:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for name in sorted(r):
        if name not in index:
            visit(name)
    return sorted(found)


def running_up(r: Mapping[str, Mapping[str, list[str]]]) -> set[tuple[str, str]]:
    """The fewest imports (counted module by module) that must run up for the rooms to
    stand in an order: none when there is no circle between them. Within each circle the
    order of its rooms is searched whole (over subsets: a dozen rooms are 4,096 of them),
    so what a circle is blamed on is the import with the fewest modules behind it, not
    the one a walk happens to reach last."""
    weight = {(a, b): len(ties) for a, targets in r.items() for b, ties in targets.items()}
    up: set[tuple[str, str]] = set()
    for names in circles(r):
        assert len(names) <= 16, f"a circle of {len(names)} rooms: {names}"
        # best[placed] = (modules' imports running up, the order) of ``placed``, top first
        best: dict[frozenset[str], tuple[int, tuple[str, ...]]] = {frozenset(): (0, ())}
        for size in range(len(names)):
            for placed, (cost, order) in [(p, c) for p, c in best.items() if len(p) == size]:
                for name in names:
                    if name in placed:
                        continue
                    key = placed | {name}
                    here = (cost + sum(weight.get((name, a), 0) for a in placed), (*order, name))
                    if key not in best or here < best[key]:
                        best[key] = here
        rank = {name: i for i, name in enumerate(best[frozenset(names)][1])}
        up |= {(a, b) for a, b in weight if a in rank and b in rank and rank[a] > rank[b]}
    return up


def layers(r: Mapping[str, Mapping[str, list[str]]]) -> dict[str, int]:
    """Each room's layer, counted from the imports: 1 for a room that imports none, else
    one above the highest room it imports. The imports that must run up (``running_up``)
    are left out of the count, so that they stand out as what they are (``upward``)."""
    skip = running_up(r)
    layer: dict[str, int] = {}

    def visit(name: str) -> int:
        if name not in layer:
            layer[name] = 0  # a guard: the imports left are a circle-free graph
            below = [visit(n) for n in sorted(r.get(name, ())) if (name, n) not in skip]
            layer[name] = 1 + max(below, default=0)
        return layer[name]

    for name in sorted(set(r) | {b for targets in r.values() for b in targets}):
        visit(name)
    return layer


def upward(r: Mapping[str, Mapping[str, list[str]]], layer: Mapping[str, int]) -> list[str]:
    """Every import from a room to one that stands on its layer or above, with the
    imports that make it."""
    return [f"{a} (layer {layer[a]}) imports {b} (layer {layer[b]}): {'; '.join(ties)}"
            for a, targets in sorted(r.items()) for b, ties in sorted(targets.items())
            if layer[a] <= layer[b]]


def by_layer(layer: Mapping[str, int]) -> list[list[str]]:
    """The rooms, one list per layer, from the top down."""
    top = max(layer.values())
    return [sorted(n for n, lv in layer.items() if lv == level) for level in range(top, 0, -1)]


def test_the_checker_finds_a_circle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_a_circle_is_blamed_on_its_thinnest_import() -> None:
    """Three imports tie ``low`` to ``high``'s two modules; one ties them back: that one
    runs up, whatever the names' order."""
    r = {"high": {"low": ["h.a -> l.x", "h.b -> l.x", "h.b -> l.y"]},
         "low": {"high": ["l.y -> h.a"]}, "ground": {}}
    assert running_up(r) == {("low", "high")}
    layer = layers(r)
    assert (layer["low"], layer["high"]) == (1, 2)
    assert upward(r, layer) == ["low (layer 1) imports high (layer 2): l.y -> h.a"]


def test_the_graph_sees_lazy_imports() -> None:
    g = graph()
    assert "dm_agent.commands.status" in g["dm_agent.cli"]  # imported inside a function
    assert "dm_agent.commands.parser" in g["dm_agent.commands.status"]
    assert "dm_agent.round.agent" in g["dm_agent.process.state"]  # under TYPE_CHECKING


def test_no_import_circle() -> None:
    assert cycle(graph()) is None


def test_the_rooms_stand_in_layers_and_every_import_runs_down() -> None:
    r = rooms(graph())
    assert circles(r) == [], rooms_circle(r)
    layer = layers(r)
    assert upward(r, layer) == []
    # the ground holds what every room shares; the command line stands on top
    assert by_layer(layer)[-1] == ["errors", "logs", "net"]
    assert by_layer(layer)[:2] == [["__main__"], ["cli"]]


def rooms_circle(r: Mapping[str, Mapping[str, list[str]]]) -> str:
    found = cycle(r) or []
    return "; ".join(f"{a} -> {b}: {r[a][b]}" for a, b in itertools.pairwise(found))


def test_an_import_up_a_layer_is_found(tmp_path: Path) -> None:
    """The check can fail: in a copy of the package, the settings' converters are made
    to import the loop (inside a function, as a lazy import would), and the import is
    named, as a circle between the rooms and as the one import that runs up."""
    copy = tmp_path / "dm_agent"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    values = copy / "config" / "values.py"
    values.write_text(values.read_text() + "\n\ndef _up() -> None:\n"
                      "    from ..process import loop  # noqa: F401\n")
    r = rooms(graph(copy))
    assert circles(r) == [["config", "gateway", "process", "round", "tunnel"]]
    assert "config -> process" in rooms_circle(r) or "process -> config" in rooms_circle(r)
    assert upward(r, layers(r)) == [
        "config (layer 2) imports process (layer 4): "
        "dm_agent.config.values -> dm_agent.process.loop"]
    # and the package as it is passes the same check
    assert upward(rooms(graph()), layers(rooms(graph()))) == []


def test_the_developer_guide_shows_the_layers_as_they_are() -> None:
    """docs/developer-guide.md's Architecture table gives each room its layer: the same
    as the imports make it, every room in it."""
    guide = (PACKAGE.parent / "docs" / "developer-guide.md").read_text(encoding="utf-8")
    section = guide.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    shown: dict[str, int] = {}
    for row in re.findall(r"^\| (\d+) \| ([^|]+) \|", section, re.M):
        for name in re.findall(r"`([\w]+)/?`", row[1]):
            shown[name] = int(row[0])
    assert shown == layers(rooms(graph()))
