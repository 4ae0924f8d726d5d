"""The layout's promises (issue 15), each guarded by one test over the package's source, read with `ast`:
the plain-Python core imports no Dagster (directly or through the package modules it imports); no module
imports another module's private (`_name`) names; the package's modules import each other without
cycles. Each checker is also run on a small planted package, so a checker that cannot fail is caught."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "wedbackup_dagster"
CORE = f"{PACKAGE}.core"

# Known exceptions. Each entry would have to still exist, so the lists can only shrink.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()
KNOWN_CYCLES: list[list[str]] = []


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module


def modules(root: Path, package: str) -> dict[str, Module]:
    """Every module of `package` under `root`, by dotted name (a package by its own name)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = Module(name, path, ast.parse(path.read_text(), filename=str(path)))
    return out


def _imported_module(module: Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.name.split(".")
    if module.path.name != "__init__.py":
        parts = parts[:-1]  # a module's relative imports start from its package
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imports(module: Module, known: dict[str, Module]) -> list[tuple[str, int]]:
    """(module imported, line) for every import in `module`, top-level or inside a function, that names a
    module of `known`: `from pkg import mod` counts as importing `pkg.mod`."""
    out = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _imported_module(module, node)
            for a in node.names:
                out.append((f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, node.lineno))
    return out


def dagster_imports(root: Path, package: str, subtree: str) -> list[str]:
    """Where the modules of `subtree`, or a package module they import (at any depth), import Dagster."""
    known = modules(root, package)
    seen, todo, found = set(), [m for m in known if m == subtree or m.startswith(subtree + ".")], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for target, line in imports(known[name], known):
            top = target.split(".")[0]
            if top == "dagster" or top.startswith("dagster_"):
                found.append(f"{name}:{line} imports {target}")
            elif target in known:
                todo.append(target)
    return sorted(found)


def private_imports(root: Path, package: str) -> set[tuple[str, str, str]]:
    """(importer, module, name) for every `from <package module> import _name` and every `<module>._name`
    where <module> is a package module bound by an import, across the package."""
    known = modules(root, package)
    found = set()
    for module in known.values():
        bound: dict[str, str] = {}  # local name -> package module
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ImportFrom):
                base = _imported_module(module, node)
                for a in node.names:
                    if f"{base}.{a.name}" in known:
                        bound[a.asname or a.name] = f"{base}.{a.name}"
                    elif base in known and a.name.startswith("_") and not a.name.startswith("__"):
                        found.add((module.name, base, a.name))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in known and a.asname:
                        bound[a.asname] = a.name
        for node in ast.walk(module.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and bound[node.value.id] != module.name):
                found.add((module.name, bound[node.value.id], node.attr))
    return found


def import_cycles(root: Path, package: str) -> list[list[str]]:
    """The package's import cycles (strongly connected components of more than one module, or a module
    importing itself), counting imports inside functions too: a cycle there still ties two modules."""
    known = modules(root, package)
    graph = {name: sorted({t for t, _ in imports(m, known) if t in known}) for name, m in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan, iterative (no recursion limit to meet)
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for succ in edges:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(graph[succ])))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    return sorted(cycles)


# --- the promises, on the real package ---------------------------------------------------------------

def test_core_imports_no_dagster():
    assert dagster_imports(REPO, PACKAGE, CORE) == []


def test_core_imports_no_dagster_when_loaded():
    """The same promise checked by a different path: load every core module in a fresh interpreter."""
    names = sorted(m for m in modules(REPO, PACKAGE) if m == CORE or m.startswith(CORE + "."))
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dagster' or m.startswith('dagster_')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert len(names) > 30 and out.stdout.strip() == "[]"


def test_no_module_imports_another_modules_private_names():
    found = private_imports(REPO, PACKAGE)
    assert found - KNOWN_PRIVATE_IMPORTS == set()
    assert KNOWN_PRIVATE_IMPORTS - found == set(), "fixed: remove them from KNOWN_PRIVATE_IMPORTS"


def test_no_import_cycles():
    cycles = import_cycles(REPO, PACKAGE)
    assert [c for c in cycles if c not in KNOWN_CYCLES] == []
    assert [c for c in KNOWN_CYCLES if c not in cycles] == [], "fixed: remove it from KNOWN_CYCLES"


# --- each checker fails on a planted violation ----------------------------------------------------------

def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


CLEAN = {
    "pkg/__init__.py": "",
    "pkg/core/__init__.py": "",
    "pkg/core/a.py": "from pkg.core import b\nfrom .b import public\n",
    "pkg/core/b.py": "import json\n\ndef public():\n    return json\n\ndef _private():\n    pass\n",
    "pkg/wiring.py": "import dagster\nfrom pkg.core.a import b\n",
}


def test_the_checkers_pass_a_clean_package(tmp_path):
    root = plant(tmp_path, CLEAN)
    assert dagster_imports(root, "pkg", "pkg.core") == []
    assert private_imports(root, "pkg") == set()
    assert import_cycles(root, "pkg") == []


@pytest.mark.parametrize("planted", [
    "import dagster as dg\n",
    "def f():\n    from dagster_aws.s3 import S3Resource\n",
    "from pkg import helper\n",  # through a package module that imports Dagster
])
def test_the_dagster_checker_finds_a_planted_import(tmp_path, planted):
    root = plant(tmp_path, {**CLEAN, "pkg/core/c.py": planted, "pkg/helper.py": "import dagster\n"})
    assert dagster_imports(root, "pkg", "pkg.core") != []


@pytest.mark.parametrize("planted, expected", [
    ("from pkg.core.b import _private\n", ("pkg.core.c", "pkg.core.b", "_private")),
    ("from .b import public, _private\n", ("pkg.core.c", "pkg.core.b", "_private")),
    ("from pkg.core import b as bee\n\ndef f():\n    return bee._private()\n",
     ("pkg.core.c", "pkg.core.b", "_private")),
])
def test_the_private_import_checker_finds_a_planted_import(tmp_path, planted, expected):
    root = plant(tmp_path, {**CLEAN, "pkg/core/c.py": planted})
    assert private_imports(root, "pkg") == {expected}


def test_the_cycle_checker_finds_a_planted_cycle(tmp_path):
    root = plant(tmp_path, {**CLEAN, "pkg/core/b.py": CLEAN["pkg/core/b.py"] + "\ndef g():\n    from . import a\n"})
    assert import_cycles(root, "pkg") == [["pkg.core.a", "pkg.core.b"]]
