"""Where a training stage resumes from, and whether it may: ``--resume auto`` takes the newest sound
checkpoint, ``--resume PATH`` that one, and no ``--resume`` refuses a directory that holds an
unfinished run's checkpoints (so nothing is trained over by accident). A checkpoint of other
training (other data, other keys than SCHEDULE_KEYS, RUNTIME_KEYS and LAYOUT_KEYS) is refused
before minutes of loading; a move to another layout (world size, micro-batch, ZeRO stage, device
type) is said in one line; the recipe's peak learning rate replaces the checkpoint's."""

from __future__ import annotations

import logging
from pathlib import Path

from backends.distributed import decided_on_rank0
from pipeline.checkpoint import CheckpointError, check_resume_path, latest_checkpoint, sound_resume_point
from pipeline.layout import is_checkpoint
from pipeline.recipe import differences
from pipeline.training.settings import LAYOUT_KEYS, RUNTIME_KEYS, SCHEDULE_KEYS

logger = logging.getLogger(__name__)


def resume_point(resume: str | None, checkpoints: Path, directory: Path, hashes: bool) -> Path | None:
    """The checkpoint to resume from (``resume``: None, "auto" or a path), or None to start at step 0;
    ``hashes``: check each file's sha256 as well as its size."""
    if resume is None:
        found = latest_checkpoint(checkpoints)
        if found is not None:
            raise CheckpointError(f"{directory} holds checkpoints of an unfinished run (latest: "
                                  f"{found.name}); pass --resume auto to continue it, or move the directory away "
                                  f"to start over")
        return None
    if resume == "auto":
        found = decided_on_rank0(lambda: sound_resume_point(checkpoints, hashes), (CheckpointError,))
        if found is None:
            logger.info("--resume auto: no checkpoint in %s yet; starting from step 0", checkpoints)
        return found
    path = Path(resume)
    if not is_checkpoint(path):
        raise CheckpointError(f"--resume {path}: not a complete checkpoint (no trainer_state.json)")
    decided_on_rank0(lambda: check_resume_path(path, hashes), (CheckpointError,))
    return path


def check_same_training(stage: str, saved_inputs: dict, inputs: dict, path: Path) -> None:
    """The checkpoint's stage inputs (upstream fingerprint included) against this run's."""
    allowed = tuple(f"{stage}.{key}" for key in SCHEDULE_KEYS)
    changed = differences(saved_inputs, inputs)
    refused = [key for key in changed if key not in allowed]
    if "upstream" in refused:
        raise CheckpointError(f"{path} was trained on the output of an earlier stage that has changed since (the "
                              f"shards were rebuilt, or another manifest is named): it cannot continue on other "
                              f"data. Move {path.parent.parent} away to train from scratch")
    if refused:
        free = (allowed + tuple(f"{stage}.{key}" for key in RUNTIME_KEYS + LAYOUT_KEYS)
                + ("model.gradient_checkpointing", "the cluster section"))
        raise CheckpointError(f"{path} was written by a run with different settings: {', '.join(refused)}. Revert "
                              f"them to resume, or start a new run_dir (keys that may change on resume: "
                              f"{', '.join(free)})")
    if changed:
        logger.warning("resuming with changed %s: the schedule continues from the checkpoint's step with the new "
                       "values", ", ".join(changed))


def report_layout_change(saved: dict, here: dict, path: Path, global_batch_size: int, is_main: bool) -> bool:
    """Say what differs between the checkpoint's layout and this run's (one line on rank 0);
    whether each rank can take its own RNG state from the checkpoint (same world size and
    device type)."""
    changed = {key: (saved.get(key), value) for key, value in here.items() if saved.get(key) != value}
    same_ranks = "world_size" not in changed and "device" not in changed
    if changed and is_main:
        described = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
        logger.warning("resuming %s on another layout: %s. The global batch (%d), the data order and the "
                       "optimizer state carry over; the state is re-partitioned for this layout%s", path.name,
                       described, global_batch_size,
                       "" if same_ranks else "; RNG states restart from the seed (dropout masks differ from "
                       "an uninterrupted run)")
    return same_ranks


def set_peak_lr(scheduler, lr: float) -> None:
    """Rescale the restored schedule to peak ``lr`` from the current step on."""
    if all(base == lr for base in scheduler.base_lrs):
        return
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group in scheduler.optimizer.param_groups:
        group["lr"] = lr * factor
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
