"""Atomic, resumable training checkpoints.

Layout of one stage (``run_dir/<stage>/checkpoints/``):

    step_120/                  complete checkpoints only ever carry this name
      deepspeed/               engine.save_checkpoint: model, optimizer, lr scheduler (every rank's shard)
      rank_00000.pt ...        per rank: data-loader position, RNG states (python, numpy, torch, device)
      trainer_state.json       step, world size, metrics so far, fingerprint of the training inputs
      recipe.yaml              the resolved recipe
    step_160.tmp/              being written (or left by a killed writer; removed on the next start)
    latest                     "step_120": written atomically after the rename

Every rank writes into ``step_N.tmp`` and fsyncs its files; after a barrier rank 0 adds the
trainer state, fsyncs the tree, renames it to ``step_N``, then replaces ``latest``. A process killed at any moment leaves ``latest`` naming a
complete checkpoint. Run directories are assumed to be on storage all ranks share.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.atomic import aside_path, fsync_tree, publish_directory, temporary_directory, write_text_atomically
from pipeline.layout import DEEPSPEED_TAG, LATEST, RECIPE_FILE, TRAINER_STATE, is_checkpoint

logger = logging.getLogger(__name__)

# Tests kill the writer at a chosen point ("before_rename:<step>") to prove atomicity; never set in
# normal runs.
FAULT_ENV = "PIPELINE_TEST_FAULT"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (the message says why and what to do)."""


def rng_state(device_module: Any | None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device_module is not None:
        state["device"] = device_module.get_rng_state()
    return state


def restore_rng_state(state: dict, device_module: Any | None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device_module is not None and "device" in state:
        device_module.set_rng_state(state["device"])


def _fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        logger.error("%s=%s: killing this process (test of checkpoint atomicity)", FAULT_ENV, point)
        os.kill(os.getpid(), signal.SIGKILL)


def step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=step_of)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``latest`` names (it is always complete), else None."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    target = directory / pointer.read_text().strip()
    if not is_checkpoint(target):
        raise CheckpointError(f"{pointer} names {target.name}, which is missing or incomplete; the directory was "
                              f"modified by hand? Point `latest` at one of {[p.name for p in complete_checkpoints(directory)]}")
    return target


def remove_partial(directory: Path) -> None:
    """Delete ``step_N.tmp`` directories a killed writer left behind (rank 0, before training)."""
    if directory.is_dir():
        for partial in directory.glob("step_*.tmp"):
            logger.warning("removing the incomplete checkpoint %s (its writer was interrupted)", partial)
            shutil.rmtree(partial)


def save_checkpoint(engine, directory: Path, step: int, trainer_state: dict, rank_state: dict, recipe_yaml: str,
                    rank: int, keep_last: int, barrier: Callable[[], None]) -> Path:
    """Write ``step_<step>`` atomically on every rank; returns its final path."""
    final = directory / f"step_{step}"
    temporary = final.with_name(final.name + ".tmp")
    if rank == 0:
        temporary_directory(final)
    barrier()
    engine.save_checkpoint(str(temporary), tag=DEEPSPEED_TAG, save_latest=False)
    torch.save(rank_state, temporary / f"rank_{rank:05d}.pt")
    # Each rank flushes what it wrote: on a parallel file system, rank 0's fsync does not reach
    # another node's client cache.
    fsync_tree(temporary)
    barrier()
    if rank == 0:
        if final.exists():
            raise CheckpointError(f"{final} already exists; checkpoints past the resume point should have been "
                                  f"set aside when the run resumed")
        (temporary / RECIPE_FILE).write_text(recipe_yaml)
        (temporary / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        _fault(f"before_rename:{step}")
        publish_directory(temporary, final)
        write_text_atomically(directory / LATEST, final.name)
        older = [path for path in complete_checkpoints(directory) if path != final]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old)
        logger.info("checkpoint %s written", final)
    barrier()
    return final


def set_aside_later_checkpoints(directory: Path, resume_from: Path) -> None:
    """Resuming from an older checkpoint (``--resume PATH``) abandons the newer ones of this
    directory: move them to ``checkpoints.abandoned-<time>/`` (kept, never deleted) and point
    ``latest`` at the resume point, so the new branch's checkpoints never meet them (rank 0)."""
    later = [path for path in complete_checkpoints(directory) if step_of(path) > step_of(resume_from)]
    if resume_from.parent.resolve() != directory.resolve() or not later:
        return
    kept = aside_path(directory, "abandoned")
    kept.mkdir()
    for path in later:
        os.replace(path, kept / path.name)
    write_text_atomically(directory / LATEST, resume_from.name)
    logger.warning("resuming from %s: the later checkpoints %s are kept in %s", resume_from.name,
                   [p.name for p in later], kept)


def read_trainer_state(path: Path, world_size: int) -> dict:
    """The checkpoint's trainer state, refused when it was written by another number of processes."""
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    if trainer_state["world_size"] != world_size:
        raise CheckpointError(
            f"{path} was written by {trainer_state['world_size']} processes but this run has {world_size}: the "
            f"data order and optimizer shards depend on the world size. Resume with the same number of processes, "
            f"or start a new run_dir from an exported model (model.source: pretrained)")
    return trainer_state


def load_checkpoint(engine, path: Path, rank: int) -> dict:
    """Restore the engine (model, optimizer, lr scheduler) from ``path``; returns this rank's state."""
    rank_file = path / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{path} has no state for rank {rank} ({rank_file.name} is missing)")
    loaded, _ = engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {path / DEEPSPEED_TAG}")
    return torch.load(rank_file, weights_only=False)
