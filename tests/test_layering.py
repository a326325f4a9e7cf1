"""Import layering of the source packages, checked on their source (ast; nothing is imported).

Imports run one way, from the top layer down:

    experiments -> serving -> benchmark -> sparse_engine -> deltakv -> data_prepare

A module may import its own package and any package below it, never one above. Package code does
not reach into tests/ (no ``sys.path`` edits, no imports of test modules), and imports across
packages use public names only (no ``from deltakv.reference import _private``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("data_prepare", "deltakv", "sparse_engine", "benchmark", "serving", "experiments")  # bottom -> top
RANK = {name: i for i, name in enumerate(LAYERS)}
# Files exempt from the upward-import check: re-export shims kept so that old import paths work.
SHIMS = {"sparse_engine/shipped.py"}
NO_SYS_PATH = ("benchmark", "serving", "experiments")  # installed packages: nothing to add to sys.path


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path, tree: ast.AST):
    """(line, absolute module name, imported names) of every import, relative ones resolved."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module, [a.name for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):  # importlib.import_module("pkg.mod")
                yield node.lineno, node.args[0].value, []


def _is_sys_path(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
        and node.value.id == "sys"


def _sys_path_edits(tree: ast.AST) -> list[int]:
    """Lines that change ``sys.path`` (insert/append/extend/..., assignment, ``site.addsitedir``)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if _is_sys_path(node.func.value) or node.func.attr == "addsitedir":
                lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if _is_sys_path(t) or (isinstance(t, ast.Subscript) and _is_sys_path(t.value)):
                    lines.append(node.lineno)
    return lines


def _test_modules() -> set[str]:
    """Top-level names importable only because tests/ is on sys.path (its modules and packages)."""
    names = {"tests"}
    for p in (REPO / "tests").iterdir():
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()):
            names.add(p.stem)
    return names - {"conftest"}


@pytest.mark.parametrize("package", LAYERS)
def test_imports_run_downward(package):
    """No module imports a package above its own layer (sparse_engine must not import benchmark...)."""
    bad = []
    for path in _sources(package):
        if _rel(path) in SHIMS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, module, _ in _imports(path, tree):
            top = module.split(".")[0]
            if top in RANK and RANK[top] > RANK[package]:
                bad.append(f"{_rel(path)}:{line} imports {module} ({top} is above {package})")
    assert not bad, "upward imports (order: " + " > ".join(reversed(LAYERS)) + "):\n" + "\n".join(bad)


@pytest.mark.parametrize("package", LAYERS)
def test_cross_package_imports_are_public(package):
    """A private name (``_x``) is only imported inside its own package."""
    bad = []
    for path in _sources(package):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, module, names in _imports(path, tree):
            top = module.split(".")[0]
            if top in RANK and top != package:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    bad.append(f"{_rel(path)}:{line} imports private {', '.join(private)} from {module}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", NO_SYS_PATH)
def test_package_code_does_not_reach_into_tests(package):
    """benchmark/ and experiments/ neither edit sys.path nor import test-only modules (fixtures
    they need live in package code, e.g. benchmark/fixtures.py)."""
    test_names = _test_modules()
    bad = []
    for path in _sources(package):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bad += [f"{_rel(path)}:{line} changes sys.path" for line in _sys_path_edits(tree)]
        for line, module, _ in _imports(path, tree):
            if module.split(".")[0] in test_names:
                bad.append(f"{_rel(path)}:{line} imports {module} from tests/")
    assert not bad, "\n".join(bad)


def test_every_layer_has_sources():
    """The walk above sees real code (a moved or renamed package would make it vacuous)."""
    for package in LAYERS:
        assert _sources(package), f"no Python files under {package}/"
