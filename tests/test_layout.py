"""The package's shape (issue 21): no import cycles, function-level imports counted too; no
underscore name imported from another module; dependencies point down the layers; development
tools outside the runtime package; modules and functions of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[1] / "qwen3_vl_service"
NAME = "qwen3_vl_service"
# Lower layers first: a module may import from its own layer's package or from a lower one.
LAYERS = [
    "core",
    "machine",  # the node as it is: processes, GPUs
    "settings",
    "media download interconnect",  # the commands around the service, on the settings
    "planning",
    "deployment",
    "lifecycle",
    "batch",  # a client of the running service
]
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, str, bool, int]]:
    """(importer, imported module, name or "", function-level?, line) for every import inside the package."""
    found = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
                continue
            nested = not any(node is n for n in tree.body) and not _in_top_level_block(tree, node)
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(NAME):
                        found.append((mod, _owner(a.name, modules), "", nested, node.lineno))
                continue
            base = _resolve(mod, node, modules)
            if not base.startswith(NAME):
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in modules:
                    found.append((mod, full, "", nested, node.lineno))
                else:
                    found.append((mod, _owner(base, modules), a.name, nested, node.lineno))
    return found


def _in_top_level_block(tree: ast.Module, target: ast.AST) -> bool:
    """An import inside a module-level try/if (not in a def or class) is module-level."""
    return any(
        isinstance(stmt, (ast.Try, ast.If)) and any(n is target for n in ast.walk(stmt)) for stmt in tree.body
    )


def _resolve(mod: str, node: ast.ImportFrom, modules: dict[str, Path]) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = modules[mod].name == "__init__.py"
    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _owner(name: str, modules: dict[str, Path]) -> str:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    if len(parts) < 2:
        return None
    for i, names in enumerate(LAYERS):
        if parts[1] in names.split():
            return i
    return None


def test_no_import_cycles_counting_function_level_imports():
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for importer, imported, _name, _nested, _line in _imports(modules):
        if imported != importer and not importer.startswith(imported + "."):
            edges.setdefault(importer, set()).add(imported)
    assert _cycles(edges) == []


def test_no_underscore_name_imported_from_another_module():
    bad = [
        f"{importer}:{line} imports {imported}.{name}"
        for importer, imported, name, _nested, line in _imports(_modules())
        if name.startswith("_") and not name.startswith("__") and imported != importer
    ]
    assert bad == []


def test_dependencies_point_down_the_layers():
    bad = []
    for importer, imported, _name, _nested, line in _imports(_modules()):
        a, b = _layer(importer), _layer(imported)
        if a is not None and b is not None and b > a:
            bad.append(f"{importer}:{line} -> {imported}")
    assert bad == []


def test_every_subpackage_has_a_one_line_purpose():
    for init in PKG.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "\n" not in doc.strip(), init


def test_development_tools_are_not_in_the_runtime_package():
    shipped = {p.stem for p in PKG.rglob("*.py")}
    assert not shipped & {"tiny_model", "fp8_checkpoint", "sample_media", "gpu_smoke"}


def test_modules_and_functions_stay_readable():
    long = []
    for mod, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{mod}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{mod}.{node.name}: {size} lines")
    assert long == []


def test_no_module_of_the_package_is_imported_inside_a_function():
    assert function_level_imports() == []


def test_every_import_inside_a_function_says_why():
    """Inside a function only what is heavy or optional (torch, the Hub, NVML, POSIX-only), with its
    reason in a comment on the import (or on the line above a run of imports)."""
    silent = []
    for mod, path in _modules().items():
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    first = node.lineno - 1
                    while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                        first -= 1
                    if "#" not in lines[node.lineno - 1] and not lines[first - 1].strip().startswith("#"):
                        silent.append(f"{mod}:{node.lineno} {lines[node.lineno - 1].strip()}")
    assert silent == []


def function_level_imports() -> list[str]:
    """For the record (issue 21's note): every import inside a function, with its line."""
    return [
        f"{importer}:{line} {imported}{'.' + name if name else ''}"
        for importer, imported, name, nested, line in _imports(_modules())
        if nested
    ]
