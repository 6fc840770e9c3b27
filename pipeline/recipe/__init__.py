"""Recipes: YAML -> typed dataclasses, validated before any device, model or data work.

    typed_yaml.py           the generic engine: dataclass hints -> checked values, errors naming the key
    sections.py             the model, data and cluster sections, each with validate(); how sections
                            validate
    training_sections.py    sft, dpo (and the keys they share, LoRA), export
    eval_sections.py        eval: question files, the paper's benchmarks
    schema.py               Recipe (the sections together, and what derives from them) and validate(),
                            which gives each section what it needs of the others (sections never
                            import schema)
    loading.py              load_recipe / parse_recipe: file, overrides, ${...} interpolation; differences
    checks.py               the value checks sections share

Every key and its meaning: docs/recipes.md. Errors name the file, the dotted key path, what was
expected and, for a misspelt key, the nearest allowed name. This package imports no torch, so a
bad recipe fails in well under a second.
"""

from pipeline.recipe.loading import apply_override, differences, load_recipe, parse_recipe
from pipeline.recipe.schema import STAGE_ORDER, Recipe, validate
from pipeline.recipe.eval_sections import EvalSection
from pipeline.recipe.sections import ClusterSection, DataSection, ModelSection
from pipeline.recipe.training_sections import DPOSection, ExportSection, SFTSection, TrainableParts, TrainingSection
from pipeline.recipe.typed_yaml import RecipeError

__all__ = ["STAGE_ORDER", "ClusterSection", "DataSection", "DPOSection", "EvalSection", "ExportSection", "ModelSection",
           "Recipe", "RecipeError", "SFTSection", "TrainableParts", "TrainingSection", "apply_override",
           "differences", "load_recipe", "parse_recipe", "validate"]
