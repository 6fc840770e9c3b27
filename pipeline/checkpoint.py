"""Atomic, resumable training checkpoints.

Layout of one stage (``run_dir/<stage>/checkpoints/``):

    step_120/                  complete checkpoints only ever carry this name
      training_state/          model, optimizer (master weights, Adam moments, step count), schedule
                               position: whole tensors, not ZeRO shards (backends.portable_state), so
                               any world size, ZeRO stage or device type loads them
      rank_00000.pt ...        per rank: RNG states (python, numpy, torch, device)
      trainer_state.json       step, the layout that wrote it (world size, micro-batch, ZeRO stage,
                               device), the loader's position (the step: the data order is the
                               step's, on any layout) and every rank's refused samples, metrics so
                               far, the training inputs
      recipe.yaml              the resolved recipe
      files.json               size and sha256 of every other file (sizes only with verify: size)
    step_160.tmp/              being written (or left by a killed writer; removed on the next start)
    latest                     "step_120": written atomically after the rename

Every rank writes into ``step_N.tmp`` and fsyncs its files; after a barrier rank 0 adds the
trainer state, fsyncs the tree, renames it to ``step_N``, then replaces ``latest``. A process killed at any moment leaves ``latest`` naming a
complete checkpoint. Run directories are assumed to be on storage all ranks share.

Files can still go bad after that (a copy, a quota, a flaky mount truncates or flips them):
``--resume auto`` checks the newest checkpoint against its files.json before loading it and falls
back to the newest one that checks out; ``--resume PATH`` to a damaged one is refused. Before
writing, rank 0 compares the free space with the previous checkpoint's size, and a write that
fails anyway (ENOSPC, EIO, quota) stops the run with one message, the previous checkpoint intact.
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

from backends.distributed import broadcast_from_rank0, gather_objects
from backends.portable_state import PortableStateError, load_portable, save_portable
from pipeline.atomic import (aside_path, file_problems, fsync_tree, publish_directory, sha256_of, temporary_directory,
                             write_text_atomically)
from pipeline.layout import (CHECKPOINT_FILES, DEEPSPEED_TAG, LATEST, RECIPE_FILE, TRAINER_STATE, TRAINING_STATE,
                             is_checkpoint)

logger = logging.getLogger(__name__)

# Tests kill the writer at a chosen point ("before_rename:<step>") to prove atomicity; never set in
# normal runs.
FAULT_ENV = "PIPELINE_TEST_FAULT"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (the message says why and what to do)."""


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint that could not be written (no space, an I/O error); the previous one is intact."""


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


def save_checkpoint(engine, scheduler, directory: Path, step: int, trainer_state: dict, rank_state: dict,
                    recipe_yaml: str, rank: int, keep_last: int, barrier: Callable[[], None],
                    hashes: bool = True) -> Path:
    """Write ``step_<step>`` atomically on every rank; returns its final path. ``hashes``: record
    every file's sha256 beside its size (files.json), for resume to check."""
    final = directory / f"step_{step}"
    temporary = final.with_name(final.name + ".tmp")
    no_room = broadcast_from_rank0(_space_problem(directory, step) if rank == 0 else None)
    if no_room:
        raise CheckpointWriteFailed(no_room)
    if rank == 0:
        temporary_directory(final)
        (temporary / TRAINING_STATE).mkdir()
    barrier()
    try:
        save_portable(engine, scheduler, temporary / TRAINING_STATE)
        torch.save(rank_state, temporary / f"rank_{rank:05d}.pt")
        # Each rank flushes what it wrote: on a parallel file system, rank 0's fsync does not reach
        # another node's client cache.
        fsync_tree(temporary)
        failed = None
    except (OSError, RuntimeError) as error:  # torch's writer reports ENOSPC as RuntimeError(iostream error)
        failed = f"rank {rank}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    failures = [f for f in gather_objects(failed) if f]  # every rank learns of any rank's failure
    if failures:
        _give_up_writing(directory, temporary, step, rank, failures)
    problem = _publish(directory, temporary, final, trainer_state, recipe_yaml, keep_last, hashes) if rank == 0 else None
    problem = broadcast_from_rank0(problem)  # in place of a barrier: every rank stops if rank 0 could not publish
    if problem == "exists":
        raise CheckpointError(f"{final} already exists; checkpoints past the resume point should have been "
                              f"set aside when the run resumed")
    if problem:
        _give_up_writing(directory, temporary, step, rank, [problem])
    return final


def _publish(directory: Path, temporary: Path, final: Path, trainer_state: dict, recipe_yaml: str, keep_last: int,
             hashes: bool) -> str | None:
    """Rank 0: the trainer state and file list, the rename, ``latest``, pruning; None, "exists", or
    the write error."""
    if final.exists():
        return "exists"
    try:
        (temporary / RECIPE_FILE).write_text(recipe_yaml)
        (temporary / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        record_files(temporary, hashes)
        fsync_tree(temporary)
    except OSError as error:
        return f"rank 0: {type(error).__name__}: {error}"
    _fault(f"before_rename:{final.name.split('_', 1)[1]}")
    publish_directory(temporary, final)
    write_text_atomically(directory / LATEST, final.name)
    older = [path for path in complete_checkpoints(directory) if path != final]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old)
    logger.info("checkpoint %s written", final)
    return None


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _space_problem(directory: Path, step: int) -> str | None:
    """Rank 0, before writing: a message when the file system cannot hold another checkpoint the
    size of the newest one (the first checkpoint has nothing to compare with: its write is
    watched instead)."""
    previous = complete_checkpoints(directory)
    if not previous:
        return None
    needed, free = checkpoint_bytes(previous[-1]), shutil.disk_usage(directory).free
    if free >= needed:
        return None
    return (f"not enough space for checkpoint step_{step} in {directory}: the previous one ({previous[-1].name}) "
            f"takes {_size(needed)} and the file system has {_size(free)} free. Nothing was written; "
            f"{previous[-1].name} is intact and still `latest`. Free at least {_size(needed - free)} there (or "
            f"lower keep_last, or move run_dir), then run again with --resume auto.")


def _give_up_writing(directory: Path, temporary: Path, step: int, rank: int, failures: list[str]) -> None:
    """A write failed on some rank: remove the partial checkpoint (rank 0) and stop every rank with
    one message naming the failure, the free space and the checkpoint that is still good."""
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
    previous = complete_checkpoints(directory)
    kept = f"{previous[-1].name} is intact and still `latest`" if previous else "there is no earlier checkpoint"
    free = _size(shutil.disk_usage(directory).free) if directory.is_dir() else "unknown"
    raise CheckpointWriteFailed(
        f"writing checkpoint step_{step} in {directory} failed ({'; '.join(failures)}). The partial "
        f"step_{step}.tmp was removed (the file system now has {free} free); {kept}. If the disk or quota is full, "
        f"free space (or lower keep_last, or move run_dir), then run again with --resume auto.")


def record_files(checkpoint: Path, hashes: bool) -> None:
    """files.json: the size, and with ``hashes`` the sha256, of every file of ``checkpoint``."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != CHECKPOINT_FILES):
        entry = {"size": path.stat().st_size}
        if hashes:
            entry["sha256"] = sha256_of(path)
        files[path.relative_to(checkpoint).as_posix()] = entry
    (checkpoint / CHECKPOINT_FILES).write_text(json.dumps({"files": files}, indent=1))


def checkpoint_problems(checkpoint: Path, hashes: bool = True) -> list[str] | None:
    """What is wrong with a complete checkpoint's files against its files.json: missing, truncated
    (or grown), corrupted (sha256, with ``hashes`` and where recorded). [] when nothing is; None
    when it has no files.json (written before checkpoints recorded their files: unverifiable)."""
    listing = checkpoint / CHECKPOINT_FILES
    if not listing.is_file():
        return None
    try:
        files = json.loads(listing.read_text())["files"]
    except (ValueError, KeyError) as error:
        return [f"{CHECKPOINT_FILES} is unreadable ({error})"]
    recorded = [(name, entry["size"], entry.get("sha256")) for name, entry in files.items()]
    return file_problems(checkpoint, recorded, hashes, CHECKPOINT_FILES)


def checkpoint_state(checkpoint: Path, hashes: bool = True) -> str:
    """One word and a reason, for `pipeline status`: verified, damaged (...), unverified (...)."""
    problems = checkpoint_problems(checkpoint, hashes)
    if problems is None:
        return f"unverified (no {CHECKPOINT_FILES})"
    return "damaged (" + "; ".join(problems) + ")" if problems else "verified"


def sound_resume_point(directory: Path, hashes: bool) -> Path | None:
    """``--resume auto``: the checkpoint ``latest`` names if its files check out, else the newest
    older one that does (a warning names what is damaged and which steps train again); None when
    there is none yet. CheckpointError when every one is damaged."""
    latest = latest_checkpoint(directory)
    if latest is None:
        return None
    candidates = [path for path in reversed(complete_checkpoints(directory)) if step_of(path) <= step_of(latest)]
    damaged = []
    for path in candidates:
        problems = checkpoint_problems(path, hashes)
        if problems is None:
            logger.warning("%s has no %s (written before checkpoints recorded their files): resuming from it "
                           "unverified", path, CHECKPOINT_FILES)
            problems = []
        if not problems:
            if damaged:
                logger.warning("--resume auto: %s; resuming from %s instead, so steps %d to %d are trained again",
                               "; ".join(damaged), path.name, step_of(path) + 1, step_of(latest))
            return path
        damaged.append(f"{path} is damaged: {'; '.join(problems)}")
    raise CheckpointError("--resume auto: no checkpoint in " + str(directory) + " is intact (" + "; ".join(damaged)
                          + "). Restore the files from a copy, or move the directory away to train from scratch")


def check_resume_path(path: Path, hashes: bool) -> None:
    """``--resume PATH``: refused when its files do not check out (CheckpointError naming them)."""
    problems = checkpoint_problems(path, hashes)
    if problems:
        sound = [p.name for p in reversed(complete_checkpoints(path.parent)) if p != path and not checkpoint_problems(p, hashes)]
        other = f"; {sound[0]} checks out (--resume auto picks the newest that does)" if sound else ""
        raise CheckpointError(f"--resume {path}: the checkpoint is damaged: {'; '.join(problems)}{other}")


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


def read_trainer_state(path: Path) -> dict:
    """The checkpoint's trainer state; CheckpointError for a checkpoint of an earlier version."""
    if not (path / TRAINING_STATE).is_dir():
        layout = "DeepSpeed's own layout" if (path / DEEPSPEED_TAG).is_dir() else "an unknown layout"
        raise CheckpointError(f"{path} holds no {TRAINING_STATE}/ ({layout}, written by an earlier version of the "
                              f"pipeline): this version cannot resume it. Export it (`python -m pipeline export`), "
                              f"or finish the stage with the version that wrote it")
    return json.loads((path / TRAINER_STATE).read_text())


def load_checkpoint(engine, scheduler, path: Path, rank: int, same_ranks: bool) -> dict | None:
    """Restore the engine (model, optimizer) and the schedule from ``path`` on any layout; returns
    this rank's state (RNG) when ``same_ranks`` (the checkpoint's world size and device type are
    this run's), else None: a rank of another layout has no state of its own there."""
    try:
        load_portable(engine, scheduler, path / TRAINING_STATE)
    except (PortableStateError, OSError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{path / TRAINING_STATE} cannot be loaded: {error}") from None
    if not same_ranks:
        return None
    rank_file = path / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{path} has no state for rank {rank} ({rank_file.name} is missing)")
    return torch.load(rank_file, weights_only=False)
