"""The tree shows the architecture (docs/architecture.md): walks every import with `ast` and fails on
an import circle, a spine or library module of pipeline/ that imports stages/, a stage that imports
another stage, or a source file over the size a reader takes in whole."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "trainer")
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports, at any depth of the file (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    graph = import_graph()  # a package's __init__ counts: importing a submodule runs it first
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_spine_and_libraries_never_import_stages():
    """Only entry points (pipeline/tools) may know the registry; the runner gets it passed in."""
    offenders = {m: sorted(d for d in deps if d == "stages" or d.startswith("stages."))
                 for m, deps in import_graph().items()
                 if m.startswith("pipeline") and not m.startswith("pipeline.tools")}
    assert not {m: d for m, d in offenders.items() if d}


def test_no_stage_imports_another_stage():
    offenders = {m: sorted(d for d in deps if d.startswith("stages.") and d != m)
                 for m, deps in import_graph().items() if m.startswith("stages.")}
    assert not {m: d for m, d in offenders.items() if d}


def test_libraries_do_not_import_tools():
    """media/, models/ and webds/ are usable without a command line or a demo."""
    offenders = {m: sorted(d for d in deps if d.startswith("pipeline.tools"))
                 for m, deps in import_graph().items()
                 if m.startswith(("pipeline.media", "pipeline.models", "pipeline.webds", "stages"))}
    assert not {m: d for m, d in offenders.items() if d}


def test_no_source_file_is_too_long_to_read_whole():
    sources = [p for folder in (*PACKAGES, "bench") for p in (ROOT / folder).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_the_checker_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_tests_take_fixtures_instead_of_importing_conftest():
    offenders = [p.name for p in (ROOT / "tests").glob("test_*.py")
                 if any(isinstance(n, ast.ImportFrom) and n.module == "conftest" or
                        isinstance(n, ast.Import) and any(a.name == "conftest" for a in n.names)
                        for n in ast.walk(ast.parse(p.read_text())))]
    assert not offenders
