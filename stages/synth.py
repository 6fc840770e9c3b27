"""Synth stage: the CPU demo's data, written into run_dir/synth/ (media, annotations, cards).

The recipe's `synth` section holds SynthSettings; its cards land in run_dir/synth/cards/, which
the recipe's `data.cards` then names (e.g. ${run_dir}/synth/cards/synthetic_video.yaml).
"""

from __future__ import annotations

from dataclasses import asdict

from pipeline.data.synthetic import generate
from pipeline.recipe import Recipe
from pipeline.runner import StageContext

DISTRIBUTED = False  # rank 0 writes; the other ranks wait


def inputs(recipe: Recipe, world_size: int) -> dict:
    return {"synth": asdict(recipe.synth)}


def run(context: StageContext) -> dict:
    counts = generate(context.directory, context.recipe.synth)
    return {key.replace("_", " "): value for key, value in counts.items()}
