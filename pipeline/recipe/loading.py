"""Reading a recipe: YAML file -> key=value overrides -> ${...} interpolation -> typed ``Recipe``.

    recipe = load_recipe("recipes/demo_cpu.yaml", ["sft.lr=1e-5", "cluster.nodes=2"])

``${name}`` and ``${run_dir}`` are the recipe's own; any other ``${X}`` comes from the environment
(left as is when unset: a dataset card may define it, and the path check names it if not).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.recipe.schema import STAGE_ORDER, Recipe
from pipeline.recipe.typed_yaml import RecipeError, build

# Names other trainers use (HF Trainer, torchtune, DeepSpeed) -> ours, for "did you mean".
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
           "per_device_train_batch_size": "micro_batch_size", "batch_size": "micro_batch_size",
           "train_batch_size": "global_batch_size", "gradient_accumulation": "gradient_accumulation_steps",
           "max_grad_norm": "gradient_clipping", "clip_grad_norm": "gradient_clipping", "warmup": "warmup_ratio",
           "output_dir": "run_dir", "bf16": "precision", "fp16": "precision", "device": "backend"}


def apply_override(data: dict, assignment: str, source: str = "<override>") -> None:
    """``a.b.c=value`` into the raw recipe mapping; the value is parsed as YAML (1e-5, true, [1,2])."""
    if "=" not in assignment:
        raise RecipeError(f"override {assignment!r} is not of the form key=value (e.g. sft.lr=1e-5)")
    dotted, _, raw = assignment.partition("=")
    keys = dotted.strip().split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    for depth, key in enumerate(keys[:-1]):
        if node.get(key) is None:
            if depth == 0 and key in STAGE_ORDER:
                raise RecipeError(f"override {assignment!r}: {source} has no '{key}' section, so the {key} stage "
                                  f"does not run; add the section to the recipe to configure it")
            node[key] = {}
        if not isinstance(node[key], dict):
            raise RecipeError(f"override {assignment!r}: {'.'.join(keys[:depth + 1])} is not a mapping")
        node = node[key]
    node[keys[-1]] = value


def _interpolate(value: Any, variables: dict[str, str], used: dict[str, str]) -> Any:
    """``${run_dir}`` / ``${name}``, then ``${X}`` set in the environment, in string values; an unset
    ``${X}`` stays (a dataset card may define it, and a path check names it if it is not). The
    environment variables substituted are recorded in ``used`` (name -> value)."""
    if isinstance(value, str):
        value = re.sub(r"\$\{(run_dir|name)\}", lambda m: variables[m.group(1)], value)

        def from_environment(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                return match.group(0)
            used[name] = os.environ[name]
            return os.environ[name]

        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", from_environment, value)
    if isinstance(value, list):
        return [_interpolate(v, variables, used) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, variables, used) for k, v in value.items()}
    return value


def parse_recipe(data: Any, overrides: list[str] = (), source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of keys, got {type(data).__name__}")
    data = dict(data)
    for assignment in overrides:
        apply_override(data, assignment, source)
    if isinstance(data.get("run_dir"), str):  # run_dir may itself use ${name}
        data["run_dir"] = data["run_dir"].replace("${name}", str(data.get("name", "")))
    used: dict[str, str] = {}
    data = _interpolate(data, {"name": str(data.get("name", "")), "run_dir": str(data.get("run_dir", ""))}, used)
    recipe = build(Recipe, data, "", source, ALIASES)
    recipe.source = source
    recipe.environment = used
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    return parse_recipe(data, overrides, str(path))


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe mappings."""
    keys = sorted(set(old) | set(new))
    changed = []
    for key in keys:
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += differences(a, b, f"{path}.")
        elif a != b:
            changed.append(path)
    return changed
