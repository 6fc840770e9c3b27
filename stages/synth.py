"""Synth stage: the CPU demo's data, written into run_dir/synth/ (media, annotations, cards), and
with ``synth.clip_pretrain_steps`` the demo's starting model in run_dir/synth/model: a tiny
PPLLaVA whose CLIP is pretrained on the same shapes (pipeline/model/tiny_clip.py says why).

The recipe's `synth` section holds SynthSettings; its cards land in run_dir/synth/cards/, which
the recipe's `data.cards` then names (e.g. ${run_dir}/synth/cards/synthetic_video.yaml).
"""

from __future__ import annotations

from dataclasses import asdict

from pipeline.data.synthetic import generate
from pipeline.recipe import Recipe
from pipeline.runner import StageContext

DISTRIBUTED = False  # rank 0 writes; the other ranks wait
START_MODEL = "model"  # run_dir/synth/model, for `model.source: pretrained`


def inputs(recipe: Recipe, world_size: int) -> dict:
    return {"synth": asdict(recipe.synth)}


def run(context: StageContext) -> dict:
    settings = context.recipe.synth
    counts = generate(context.directory, settings)
    report = {key.replace("_", " "): value for key, value in counts.items()}
    if settings.clip_pretrain_steps > 0:
        from pipeline.model.tiny_clip import write_start_model

        directory = context.directory / START_MODEL
        report.update(write_start_model(directory, settings.clip_pretrain_steps, settings.seed))
        report["start model"] = str(directory)
    return report
