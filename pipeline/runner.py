"""Run a recipe's stages in order, skipping those already done with the same inputs.

    for each stage the recipe has (synth, shard, sft, ...), or those --stages names:
        inputs      = the recipe keys it depends on + the fingerprint of the stage before it
        fingerprint = sha256(inputs)
        run_dir/<stage>/COMPLETE holds the same fingerprint  -> skipped ("inputs unchanged")
        COMPLETE holds another one                          -> the old directory is kept as
                                                               <stage>.replaced-<time>, the stage re-runs
        otherwise                                           -> run (a training stage resumes from
                                                               its checkpoints with --resume)
        write COMPLETE {fingerprint, inputs, wall time, summary}

Chaining the previous stage's fingerprint means a changed input re-runs its stage and every stage
after it. Stages are modules `stages/<name>.py` following the contract written down as
``stages.Stage``: ``inputs(recipe, world_size) -> dict``, ``run(context) -> dict`` (or
``DRY_RUN_DONE``) and ``DISTRIBUTED``. They are imported by name, so this package never depends
on `stages/` statically. The runner installs the SIGTERM / SIGUSR1 handler (``StopFlag``) for
the whole run and hands it to every stage in its ``StageContext``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import backends
from backends import Backend, DistributedContext
from backends.distributed import barrier, broadcast_from_rank0, decided_on_rank0, is_distributed, sum_across_ranks
from pipeline.atomic import set_aside, write_text_atomically
from pipeline.layout import COMPLETE, RECIPE_FILE
from pipeline.recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)

# What a stage's ``run`` returns when ``context.dry_run`` made it stop after one training step:
# the runner then stops the whole run (nothing is marked complete).
class _DryRunDone:
    def __repr__(self) -> str:
        return "DRY_RUN_DONE"


DRY_RUN_DONE = _DryRunDone()


class StageFailed(RuntimeError):
    """A stage stopped for a reason its message explains fully (exit code 1, no traceback)."""


class StoppedForRequeue(Exception):
    """A stage checkpointed after SIGTERM/SIGUSR1; the run exits with the requeue code (3)."""


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (cluster pre-emption); the loop checkpoints at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # already stopping (SLURM may deliver a signal twice: directly and via srun)
            return
        self.received = signal.Signals(signum).name
        logger.warning("%s received: checkpointing at the next step boundary, then exiting for requeue", self.received)

    def __enter__(self) -> "StopFlag":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class StageContext:
    """What a stage's ``run`` receives."""

    stage: str
    recipe: Recipe
    backend: Backend
    ranks: DistributedContext  # this process's rank, local rank and world size
    fingerprint: str
    inputs: dict = field(default_factory=dict)  # what the fingerprint hashes (upstream included)
    resume: str | None = None   # None, "auto" or a checkpoint path
    dry_run: bool = False
    stop: StopFlag = field(default_factory=StopFlag)  # set by SIGTERM / SIGUSR1

    @property
    def directory(self) -> Path:
        return self.recipe.stage_dir(self.stage)

    def barrier(self) -> None:
        barrier()


def stage_module(name: str):
    return importlib.import_module(f"stages.{name}")


def fingerprint_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def read_complete(directory: Path) -> dict | None:
    marker = directory / COMPLETE
    return json.loads(marker.read_text()) if marker.is_file() else None


def check_stage_selection(recipe: Recipe, only: list[str] | None) -> None:
    unknown = [name for name in only or [] if name not in recipe.stages]
    if unknown:
        raise RecipeError(f"--stages names {', '.join(unknown)}, which {recipe.source} has no section for; "
                          f"its stages are: {', '.join(recipe.stages)}")


def decide(recipe: Recipe, stage: str, world_size: int, upstream: str, upstream_changed: bool,
           only: list[str] | None) -> tuple[str, dict, str]:
    """(fingerprint, inputs, action) of one stage, computed once the stages before it are done
    (its inputs may be their outputs). Action: run, rerun, skip, upstream (not selected, done)
    or stop (not selected, not done, and nothing selected after it)."""
    inputs = recipe.portable({"stage": stage, "upstream": upstream, **stage_module(stage).inputs(recipe, world_size)})
    fingerprint = fingerprint_of(inputs)
    done = read_complete(recipe.stage_dir(stage))
    if only is not None and stage not in only:
        if done is not None:
            return done["fingerprint"], inputs, "upstream"
        if any(later in only for later in recipe.stages[recipe.stages.index(stage) + 1:]):
            raise RecipeError(f"--stages {','.join(only)}: stage {stage} has not completed in {recipe.run_dir}; "
                              f"run it first (or include it in --stages)")
        return fingerprint, inputs, "stop"
    if done is not None and done["fingerprint"] == fingerprint and not upstream_changed:
        return fingerprint, inputs, "skip"
    # An unfinished directory (checkpoints of a stopped run) whose upstream just ran again was
    # made from other inputs: it must not be resumed.
    stale = done is not None or (upstream_changed and recipe.stage_dir(stage).exists())
    return fingerprint, inputs, "rerun" if stale else "run"


def check_shared_run_dir(run_dir: Path, context: DistributedContext, device) -> None:
    """Every rank must see rank 0's run directory (checkpoints are completed by rank 0 from files
    every rank wrote): rank 0 leaves a token there, every rank reads it, all agree or all stop."""
    if not is_distributed():
        return
    token = uuid.uuid4().hex if context.is_main else None
    if context.is_main:
        write_text_atomically(run_dir / ".rank0_token", token)
    token = broadcast_from_rank0(token)
    marker = run_dir / ".rank0_token"
    seen = marker.read_text() if marker.is_file() else None
    agreeing = sum_across_ranks([float(seen == token)], device)[0]
    if agreeing != context.world_size:
        raise RecipeError(f"run_dir {run_dir} is not the same directory on every rank ({int(agreeing)} of "
                          f"{context.world_size} ranks see rank 0's files there{'' if seen == token else ', not this one'}): "
                          f"put run_dir on storage every node shares")


def _set_aside(directory: Path) -> None:
    """A stage whose inputs changed keeps its old outputs beside the new ones, never deleted."""
    kept = set_aside(directory, "replaced")
    logger.warning("%s: inputs changed since it completed; its previous outputs are kept in %s", directory.name, kept)


def run_recipe(recipe: Recipe, only: list[str] | None = None, resume: str | None = None,
               dry_run: bool = False) -> None:
    """Run the stages in this process (which may be one rank of many).

    SIGTERM / SIGUSR1 are caught for the whole run: a training stage checkpoints at its next step
    boundary; between stages the run stops before starting the next one. Either way the caller
    sees :class:`StoppedForRequeue`.
    """
    check_stage_selection(recipe, only)
    backend = backends.select(recipe.backend)
    context = backends.init_distributed(backend, timeout_minutes=recipe.cluster.dist_timeout_minutes)
    backend.manual_seed(recipe.seed)
    run_dir = Path(recipe.run_dir)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(run_dir / RECIPE_FILE, f"# resolved from {recipe.source}\n" + recipe.to_yaml())
    check_shared_run_dir(run_dir, context, backend.device(context.local_rank))
    summaries, skipped, upstream, upstream_changed = {}, [], "", False
    with StopFlag() as stop:
        for stage in recipe.stages:
            if stop.received:
                raise StoppedForRequeue(f"{stop.received} received; stopping before stage {stage} (nothing to save)")
            directory = recipe.stage_dir(stage)
            # decided on rank 0 only: fingerprinting a dataset walks every media file once, not once per rank
            fingerprint, inputs, action = decided_on_rank0(
                lambda: decide(recipe, stage, context.world_size, upstream, upstream_changed, only),
                (RecipeError, ValueError))  # CardError is a ValueError
            if action == "stop":
                break
            upstream = fingerprint
            if action in ("skip", "upstream"):
                if action == "skip":
                    skipped.append(stage)
                    if context.is_main:
                        logger.info("stage %s: skipped (complete, inputs unchanged; %s)", stage, directory / COMPLETE)
                summaries[stage] = (read_complete(directory) or {}).get("summary", {})
                continue
            upstream_changed = True
            module = stage_module(stage)
            if context.is_main and action == "rerun":
                _set_aside(directory)
            stage_context = StageContext(stage, recipe, backend, context, fingerprint, inputs, resume, dry_run, stop)
            if context.is_main:
                directory.mkdir(parents=True, exist_ok=True)
                logger.info("stage %s: starting", stage)
            stage_context.barrier()
            start = time.perf_counter()
            summary = None
            if module.DISTRIBUTED or context.is_main:
                summary = module.run(stage_context)
            stage_context.barrier()
            wall = time.perf_counter() - start
            if summary is DRY_RUN_DONE:
                if context.is_main:
                    logger.info("dry run: %s built and ran one forward/backward in %.1fs; stopping", stage, wall)
                return
            if context.is_main:
                summaries[stage] = summary or {}
                record = {"fingerprint": fingerprint, "inputs": inputs, "wall_seconds": round(wall, 2),
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summaries[stage]}
                write_text_atomically(directory / COMPLETE, json.dumps(record, indent=1, default=str))
                logger.info("stage %s: done in %.1fs", stage, wall)
            stage_context.barrier()
    if context.is_main:
        print_summary(recipe, summaries, skipped)


def print_summary(recipe: Recipe, summaries: dict[str, dict], skipped: list[str]) -> None:
    lines = [f"run {recipe.name} finished: {recipe.run_dir}"]
    for stage, summary in summaries.items():
        note = " (skipped: already complete)" if stage in skipped else ""
        details = ", ".join(f"{key}: {value}" for key, value in summary.items())
        lines.append(f"  {stage:<6} {recipe.stage_dir(stage)}{note}" + (f"\n         {details}" if details else ""))
    print("\n".join(lines), flush=True)
