"""The package's layering: what a contributor relies on when adding a module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vbcompress"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Package module → the package modules it imports (at any depth in the file, lazy imports included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                if target.startswith("vbcompress"):
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("vbcompress"))
        graph[name] = found
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


def test_no_import_cycles_between_modules():
    graph = imports()
    # The package root re-exports the API; edges into it would be cycles by construction, so it is left out.
    graph = {m: {t for t in ts if t != "vbcompress"} for m, ts in graph.items() if m != "vbcompress"}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            assert state.get(t) != 1, "import cycle: " + " → ".join(path + [m, t])
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_module_imports_the_package_root():
    """The root re-exports the API and imports everything: a module importing it would import itself."""
    for name, targets in imports().items():
        if name != "vbcompress":
            assert "vbcompress" not in targets, f"{name} imports the package root"


def test_readers_bank_and_harness_take_local_paths_only():
    for name, targets in imports().items():
        if name.startswith(("vbcompress.formats", "vbcompress.bank", "vbcompress.basemodel")):
            assert "vbcompress.hub" not in targets, f"{name} imports the Hub module"


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for t in graph.get(todo.pop(), ()):
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def test_reading_a_collection_needs_no_hub_no_base_model_and_no_fit():
    """Someone who downloads a collection reads it with the store alone."""
    needs = reachable(imports(), "vbcompress.collection.store")
    for heavy in ("vbcompress.compress", "vbcompress.card", "vbcompress.hub", "vbcompress.basemodel", "vbcompress.bank.fit"):
        assert heavy not in needs, f"collection.store reaches {heavy}"


def test_no_module_is_much_over_450_lines():
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 480, f"{path.relative_to(PACKAGE.parent)} has {lines} lines: one concern per module"


def test_the_layout_map_names_every_module():
    design = (PACKAGE.parent / "docs" / "design.md").read_text()
    section = design.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if path.name != "__init__.py" or path.parent == PACKAGE:
            assert f"`{rel}`" in section, f"docs/design.md's layout section does not describe {rel}"
