"""The import rules of docs/ARCHITECTURE.md, checked by reading every import in the packages.

Imports inside functions count too: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MAY_IMPORT = {
    "jobs": set(),
    "site_app": {"jobs"},
    "server_app": {"jobs"},
    "researcher_app": {"jobs", "site_app", "server_app"},
    "simulator": {"jobs", "site_app", "server_app", "researcher_app"},
    "provisioning": {"jobs", "site_app"},
    "fedseg": {"jobs", "site_app", "server_app", "researcher_app", "simulator", "provisioning"},
}
"""Which of our packages each package may import (docs/ARCHITECTURE.md, "Import direction")."""


def _our_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names]
    return [(line, top) for line, top in found if top in MAY_IMPORT]


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_what_the_architecture_allows(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ holds no Python files: update MAY_IMPORT with the layout"
    broken = [
        f"{path.relative_to(ROOT)}:{line} imports {top}"
        for path in files
        for line, top in _our_imports(path)
        if top != package and top not in MAY_IMPORT[package]
    ]
    assert not broken, "\n".join(broken)


def test_every_package_of_the_distribution_has_a_rule():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert packages == set(MAY_IMPORT)
