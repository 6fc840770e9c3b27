"""The dependency direction of DESIGN.md §2: stages -> pipeline -> {ppllava, backends}; inside
pipeline/, the data floor below the model, eval's benchmarks and training; and the recipe's
sections below the schema that gathers them."""

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


# Inside pipeline/: modules of a lower floor never import a higher one. The data path (cards,
# readers, decoding, shards, the loader, collation) is what the model, eval and training read; the
# recipe's sections are what schema.py gathers into a Recipe.
FLOORS = {
    "pipeline/data": ("pipeline.model", "pipeline.benchmarks", "pipeline.training", "pipeline.checkpoint",
                      "pipeline.runner", "pipeline.recipe"),
    "pipeline/recipe/sections.py": ("pipeline.recipe.schema",),
    "pipeline/recipe/training_sections.py": ("pipeline.recipe.schema",),
    "pipeline/recipe/eval_sections.py": ("pipeline.recipe.schema",),
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function-level imports included),
    type-checking-only imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_a_pipeline_floor_imports_nothing_above_it(floor):
    target = REPO / floor
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files
    offenders = {str(path.relative_to(REPO)): sorted(name for name in imported_modules(path)
                                                     if name.startswith(FLOORS[floor]))
                 for path in files}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_recipe_schema_and_its_sections_import_in_one_direction():
    sections = ["pipeline/recipe/sections.py", "pipeline/recipe/training_sections.py",
                "pipeline/recipe/eval_sections.py"]
    schema = imported_modules(REPO / "pipeline/recipe/schema.py")
    assert {"pipeline.recipe.sections", "pipeline.recipe.training_sections", "pipeline.recipe.eval_sections"} <= schema
    for section in sections:
        assert not {name for name in imported_modules(REPO / section) if name.startswith("pipeline.recipe.schema")}
