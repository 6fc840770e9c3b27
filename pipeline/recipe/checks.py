"""Value checks the recipe sections share; every error starts with the recipe file and the key."""

from __future__ import annotations

import os
import re

from pipeline.recipe.typed_yaml import RecipeError


def positive(source: str, path: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise RecipeError(f"{source}: {path}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def fraction(source: str, path: str, value: float, below_one: bool = False) -> None:
    """A value in [0, 1] (or [0, 1) with ``below_one``)."""
    if not (0 <= value < 1 if below_one else 0 <= value <= 1):
        raise RecipeError(f"{source}: {path}: expected a fraction in [0, {'1)' if below_one else '1]'}, got {value}")


def existing(source: str, path: str, value: str | None, kind: str, missing: list[str] | None) -> None:
    """A required path: absent from the recipe is always an error; not found on disk is an error,
    or with ``missing`` given (``validate`` on a login node) a note appended to it."""
    if not value:
        raise RecipeError(f"{source}: {path}: required here, expected a {kind}")
    if os.path.exists(value):
        return
    unset = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value)
    reason = (f"uses ${{{unset[0]}}}, which is not set in the environment" if unset else "does not exist")
    note(f"{source}: {path}: {value} {reason} (expected a {kind})", missing)


def note(message: str, missing: list[str] | None) -> None:
    """A missing file or directory: an error, or with ``missing`` given, collected there."""
    if missing is None:
        raise RecipeError(message)
    missing.append(message)


def written_by_synth(path: str | None, synth_dir: str | None) -> bool:
    """Whether ``path`` lies in the synth stage's directory (this run writes it: not there yet)."""
    return synth_dir is not None and os.path.normpath(path or "").startswith(os.path.normpath(synth_dir))
