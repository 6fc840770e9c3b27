"""Stages: one stage, one file, with its loop written out.

The runner (pipeline/runner.py) imports ``stages.<name>`` by name for every stage a recipe has,
in ``STAGE_ORDER`` (synth, shard, sft, dpo, export, eval). Each module follows ``Stage``. Stages
hand off through files in the run directory (pipeline/layout.py), never by importing each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pipeline.recipe import Recipe
    from pipeline.runner import StageContext


class Stage(Protocol):
    """What the runner needs of a stage module."""

    # True: every rank calls ``run`` (training, sharding); False: rank 0 does, the others wait at
    # a barrier (synth, export, eval).
    DISTRIBUTED: bool

    def inputs(self, recipe: Recipe, world_size: int) -> dict:
        """The recipe keys and files the outputs depend on (JSON-able). Their hash, chained with
        the previous stage's, is the stage's fingerprint: unchanged means skipped. Called on rank
        0 before anything runs, so a missing file is reported (RecipeError) up front."""

    def run(self, context: StageContext) -> dict:
        """Do the work into ``context.directory``; return a short summary (printed and stored in
        COMPLETE). With ``context.dry_run`` a training stage builds everything, runs one
        forward/backward and returns ``pipeline.runner.DRY_RUN_DONE``, which ends the run.
        ``context.stop`` is set by SIGTERM / SIGUSR1: a long stage checkpoints or stops and
        raises ``StoppedForRequeue``."""
