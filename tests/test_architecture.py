"""The import graph of the project's packages has no cycles, and its rooms are layered as docs/architecture.md
draws them.

grimp (the graph builder import-linter uses) reads every import statement, those inside functions too, so a
lazy import that closes a loop counts as much as a top-level one. scripts/ and tests/ are not packages:
nothing imports them, so they cannot be part of a cycle.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOMS = ("common", "bert", "data", "trainer", "launcher", "benchmarks")


def _graph():
    """grimp's ImportGraph of ROOMS as this checkout has them (grimp is imported here, not at module level:
    the GPU kit collects no test of this module and does not carry it)."""
    import grimp

    for room in ROOMS:
        found = Path(importlib.util.find_spec(room).origin).resolve().parent.parent
        if found != REPO:
            pytest.fail(f"package {room!r} is imported from {found}, not from this checkout ({REPO}); "
                        f"put the checkout first on PYTHONPATH")
    return grimp.build_graph(*ROOMS, cache_dir=None)  # no cache: nothing is written into the checkout


def cycles(graph) -> list[list[str]]:
    """Every import cycle closed by one direct import ``a -> b`` (the shortest way back from b to a), each
    once, as [a, b, ..., a]; shortest first."""
    found = {}
    for a in sorted(graph.modules):
        for b in sorted(graph.find_modules_directly_imported_by(a)):
            back = graph.find_shortest_chain(importer=b, imported=a) if a != b else None
            if back:
                loop = [a, *back]
                found.setdefault(frozenset(loop), loop)
    return sorted(found.values(), key=lambda c: (len(c), c))


def _describe(graph, loop: list[str]) -> str:
    steps = []
    for a, b in zip(loop, loop[1:]):
        where = graph.get_import_details(importer=a, imported=b)
        lines = ", ".join(f"line {d['line_number']}" for d in where) or "line unknown"
        steps.append(f"  {a} imports {b} ({lines})")
    return " -> ".join(loop) + "\n" + "\n".join(steps)


def _assert_acyclic(graph, what: str) -> None:
    found = cycles(graph)
    if found:
        pytest.fail(f"{len(found)} import cycle(s) between {what}; the shortest:\n"
                    + "\n".join(_describe(graph, c) for c in found[:5]), pytrace=False)


def test_modules_import_each_other_without_cycles():
    _assert_acyclic(_graph(), "modules")


def _route(route) -> str:
    return " -> ".join([" | ".join(sorted(route.heads)), *route.middle, " | ".join(sorted(route.tails))])


def test_rooms_are_layered_as_documented():
    """docs/architecture.md's order: common <- bert, data (independent) <- trainer <- benchmarks <- launcher.
    A lower room importing a higher one is named with its chain of imports."""
    import grimp

    layers = ["launcher", "benchmarks", "trainer", grimp.Layer("bert", "data", independent=True), "common"]
    illegal = _graph().find_illegal_dependencies_for_layers(layers=layers)
    if illegal:
        pytest.fail("imports against the layers of docs/architecture.md:\n" + "\n".join(
            f"  {d.importer} imports {d.imported}: " + "; ".join(sorted(_route(r) for r in d.routes))
            for d in sorted(illegal, key=lambda d: (d.importer, d.imported))), pytrace=False)


def test_a_cycle_is_named():
    """The check can fail, and says where: a made-up cycle of three imports is reported with each of them."""
    import grimp

    graph = grimp.ImportGraph()
    for a, b in (("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.a"), ("pkg.c", "pkg.d")):
        graph.add_import(importer=a, imported=b, line_number=3, line_contents=f"import {b}")
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    named = r"pkg.a -> pkg.b -> pkg.c -> pkg.a\n  pkg.a imports pkg.b \(line 3\)"
    with pytest.raises(pytest.fail.Exception, match=named):
        _assert_acyclic(graph, "modules")
