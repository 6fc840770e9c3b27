"""The dependency direction of DESIGN.md §2: stages -> pipeline -> {ppllava, backends}."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "ppllava": {"backends", "pipeline", "stages"},
    "backends": {"ppllava", "pipeline", "stages"},
    # The runner imports stages by name at run time; statically, pipeline/ never depends on them.
    "pipeline": {"stages"},
    # Stages hand off through artifact directories, never by importing each other.
    "stages": {"stages"},
}


def imported_top_level_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_above_or_beside_it(package):
    offenders = {
        str(path.relative_to(REPO)): sorted(imported_top_level_packages(path) & FORBIDDEN[package])
        for path in (REPO / package).rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}
