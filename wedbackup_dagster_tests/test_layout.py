"""The layout's promises for the wiring and the command line (issue 15): no import cycle between the package's
modules (lazy imports inside functions count too), and no module importing another module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

import wedbackup_dagster

PACKAGE = Path(wedbackup_dagster.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names imported from it) for every import statement of the module, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            out.append((base, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports: `from pkg import sub` counts as importing pkg.sub."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, names in _imports(name, path):
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for candidate in submodules or [target]:
                if candidate in modules and candidate != name:
                    graph[name].add(candidate)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_wiring_or_the_command_line_imports_itself_back_through_others():
    # The core imports nothing outside it, so a cycle through the wiring stays outside the core.
    graph = {m: {t for t in to if not t.startswith("wedbackup_dagster.core")}
             for m, to in _graph().items() if not m.startswith("wedbackup_dagster.core")}
    assert "wedbackup_dagster.definitions" in graph["wedbackup_dagster.backups.launch"]  # lazy imports count
    assert _cycle(graph) is None


def test_the_wiring_and_the_command_line_import_no_private_names_of_other_modules():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("wedbackup_dagster.core"):
            continue  # the core's own layout is issue 15's other half
        for target, names in _imports(name, path):
            if target.startswith("wedbackup_dagster") and target != name:
                offenders += [f"{name}: {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert offenders == []
