"""The import graph runs one way: collectors write, watchdog reads, detects, correlates, acts; the
demo and the benches stand beside the product and use it, never the reverse.

Imports are read from the source (``ast``), function-local ones included: an import moved into a
function still runs, so it cannot hide a cycle or a dependency from this test.
"""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("watchdog", "collectors")

# The command line is the composition root: it registers every command, the demo's and the
# benches' included, and nothing imports it.
ENTRY_POINTS = frozenset({"watchdog.cli", "watchdog.bench.cli"})

# What the analyzer may reach: records, key rules, the analyzer itself. No module here does I/O.
PURE = frozenset({"collectors.format", "collectors.jsonrecords", "watchdog.types", "watchdog.keys"})
IO_STDLIB = frozenset(
    {"mmap", "os", "io", "socket", "subprocess", "shutil", "tempfile", "threading", "multiprocessing", "signal",
     "select", "selectors", "asyncio", "fcntl", "urllib", "http", "pathlib", "logging", "psutil", "ctypes"}
)  # fmt: skip


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import statement in the module, at any depth."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
            yield from ((s, node.lineno) for s in subs)
            if len(subs) < len(node.names):
                yield mod, node.lineno


def _project_edges() -> dict[str, dict[str, int]]:
    """module -> {project module it imports: first line}. A parent package loaded on the way to a
    submodule is not an edge: it is not what the importing code depends on."""
    edges: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        out: dict[str, int] = {}
        for mod, line in _imports(name, path):
            target = mod
            while target and target not in MODULES:
                target = target.rpartition(".")[0]  # ``import a.b.C``-like names: the module that holds them
            if target and target != name and mod.split(".")[0] in PACKAGES:
                out.setdefault(target, line)
        edges[name] = out
    return edges


EDGES = _project_edges()


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:
        members, start = set(comp), min(comp)
        path, seen = [start], {start}
        while True:  # walk inside the component until a module repeats
            nxt = min(w for w in edges[path[-1]] if w in members)
            if nxt in seen:
                out.append([*path[path.index(nxt) :], nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return out


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(EDGES[m])
    return seen


def _is_beside(name: str) -> bool:
    """The demo and the benches: they stand beside the product."""
    return name == "watchdog.demo" or name.startswith(("watchdog.demo.", "watchdog.bench"))


def test_the_reader_sees_every_import_including_function_local_ones() -> None:
    """The parser itself: a known function-local import and a known relative one are found."""
    assert "collectors.vllm.install" in EDGES["collectors.vllm"]  # imported inside register()
    assert "watchdog.demo.cuda" in EDGES["watchdog.demo.run"]  # imported inside run_demo (torch)
    assert len(MODULES) > 50 and all(m.split(".")[0] in PACKAGES for m in MODULES)


def test_no_import_cycles() -> None:
    cycles = _cycles(EDGES)
    assert not cycles, "import cycles:\n" + "\n".join(
        " -> ".join(f"{a} (line {EDGES[a][b]})" for a, b in itertools.pairwise(c)) + f" -> {c[-1]}" for c in cycles
    )


def test_the_cycle_finder_finds_a_cycle() -> None:
    found = _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}})
    assert found == [["a", "b", "c", "a"]]


def test_the_product_never_imports_the_demo_or_the_benches() -> None:
    bad = [
        f"{m} imports {t} (line {line})"
        for m, targets in EDGES.items()
        if m.startswith("watchdog") and not _is_beside(m) and m not in ENTRY_POINTS
        for t, line in targets.items()
        if _is_beside(t) or t in ENTRY_POINTS
    ]
    assert not bad, "\n".join(bad)


def test_the_demo_never_imports_the_benches() -> None:
    """The benches drive the demo (bench detect, bench recorder); the demo (the GPU checks included)
    takes what it measures from the demo's own modules, so the two never import each other both ways."""
    bad = [
        f"{m} imports {t} (line {line})"
        for m, targets in EDGES.items()
        if m.startswith("watchdog.demo")
        for t, line in targets.items()
        if t.startswith("watchdog.bench")
    ]
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_command_line() -> None:
    bad = [f"{m} imports {t}" for m, ts in EDGES.items() if m not in ENTRY_POINTS for t in ts if t in ENTRY_POINTS]
    assert not bad, "\n".join(bad)


def test_collectors_never_import_watchdog() -> None:
    bad = [
        f"{m} imports {mod} (line {line})"
        for m, path in MODULES.items()
        if m.startswith("collectors")
        for mod, line in _imports(m, path)
        if mod.split(".")[0] == "watchdog"
    ]
    assert not bad, "\n".join(bad)


def test_the_analyzer_reaches_only_pure_modules() -> None:
    """Everything ``watchdog.analyzer`` imports, transitively, is the analyzer itself or a pure records /
    rules module, and none of them imports a stdlib module that does I/O."""
    reach = _closure("watchdog.analyzer")
    impure = sorted(
        m for m in reach if not m.startswith("watchdog.analyzer") and m != "watchdog.analyzer" and m not in PURE
    )
    assert not impure, f"the analyzer imports modules outside the pure set: {impure}"
    io = sorted(
        f"{m} imports {mod} (line {line})"
        for m in reach
        for mod, line in _imports(m, MODULES[m])
        if mod.split(".")[0] in IO_STDLIB
    )
    assert not io, "\n".join(io)


def test_importing_the_analyzer_loads_no_ledger_io() -> None:
    """In a fresh interpreter: the analyzer (and the records it reads) without the mmap reader or writer."""
    code = (
        "import sys, watchdog.analyzer, watchdog.types, collectors.format\n"
        "bad = sorted(m for m in ('mmap', 'collectors.reader', 'collectors.recorder', 'collectors.capture',"
        " 'socket', 'subprocess') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing the analyzer loaded: {out.stdout.strip()}"


def test_expected_verdicts_live_with_the_fault_catalogue() -> None:
    from watchdog.demo.faults import EXPECTED_VERDICTS, FAULTS
    from watchdog.types import Verdict

    assert set(EXPECTED_VERDICTS) == set(FAULTS) - {"none"}
    assert {Verdict(v) for v in EXPECTED_VERDICTS.values()}  # each one a verdict the analyzer can give
    # and the golden scenario of each fault class, captured from a real demo hang, says the same
    for expected in (ROOT / "tests" / "scenarios").glob("*/expected.json"):
        assert json.loads(expected.read_text())["verdict"] == EXPECTED_VERDICTS[expected.parent.name]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_long_modules_say_why(name: str) -> None:
    """A module over ~400 lines says at its top why it is one module (a newcomer reads one in a sitting)."""
    text = MODULES[name].read_text()
    lines = len(text.splitlines())
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert lines <= 420 or "Why one module:" in doc, f"{name}: {lines} lines and no 'Why one module:' in its docstring"
