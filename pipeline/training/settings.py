"""The recipe as a training stage reads it: which keys its fingerprint covers (and which a resumed
run may change), how many optimizer steps it runs, and the settings of its DeepSpeed engine and
streaming loader; and the normaliser that makes a micro-batch's loss a share of the global
batch's."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from backends.deepspeed_engine import EngineSettings
from pipeline.atomic import sha256_of
from pipeline.data.loader import LoaderSettings
from pipeline.data.shard_io import ReadSettings
from pipeline.preference import answer_mask
from pipeline.recipe import Recipe, RecipeError, TrainingSection

# Keys that do not change what is trained: never part of the fingerprint, free to change on resume
# (recomputing activations gives the same gradients, so it may be switched on after an OOM; the
# kernels compute the references' maths within their tolerance, and a run moving between an NPU
# and a GPU cluster changes them anyway; popped, a key added later leaves earlier fingerprints as they were).
RUNTIME_KEYS = ("log_every", "save_every", "keep_last", "verify_checkpoints", "max_nonfinite_in_a_row",
                "record_samples", "gc_every")
RUNTIME_MODEL_KEYS = ("gradient_checkpointing", "kernels")
# Keys a resumed run may change: the schedule continues from the checkpoint's step with the new values.
SCHEDULE_KEYS = ("lr", "max_steps", "epochs")
# How the global batch is split and the state sharded: not what is trained (the data order is the
# step's and the loss is normalised over the global batch, whatever the split), so not part of the
# fingerprint, and free to change on resume, with the world size (a run moving to another cluster).
LAYOUT_KEYS = ("micro_batch_size", "gradient_accumulation_steps", "zero_stage", "offload_optimizer")


def answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the number of tokens a causal LM loss is taken on (``answer_mask``)."""
    return answer_mask(labels).sum(dim=-1)


def micro_batch_normaliser(global_count: float, world: int, accumulation: int) -> float:
    """The divisor of one micro-batch's summed loss that makes DeepSpeed's step (backward / accumulation,
    gradients averaged over ranks) minimise the global batch's sum / ``global_count``."""
    return max(global_count, 1.0) / (world * accumulation)


def stage_inputs(recipe: Recipe, stage: str, world_size: int) -> dict:
    """What a training stage's result depends on: not the world size or the batch layout (see
    LAYOUT_KEYS), so a finished stage is not trained again on another cluster."""
    section, model = asdict(getattr(recipe, stage)), asdict(recipe.model)
    for key in RUNTIME_KEYS + LAYOUT_KEYS:
        section.pop(key)
    for key in RUNTIME_MODEL_KEYS:
        model.pop(key)
    data = asdict(recipe.data)
    for key in ("cards", "variables"):  # reach training through the shard stage's fingerprint
        data.pop(key)
    for key in ("verify_shards", "shard_root", "read_retries", "read_backoff_s", "read_timeout_s"):
        data.pop(key)  # how and where from the shards are read, not what is trained: a run moves to object storage
    data.pop("num_workers")  # who decodes, not what: the data order is the step's (pipeline/data/loader.py)
    found = {"seed": recipe.seed, "model": model, "data": data, stage: section}
    if recipe.shard is None:  # shards made elsewhere: their manifest is this stage's data input
        found["manifest_sha256"] = sha256_of(Path(recipe.data.manifest))
    return found


def schedule_length(recipe: Recipe, stage: str, samples: int) -> int:
    """Optimizer steps: ceil(epochs x samples / global batch), capped by max_steps."""
    section = getattr(recipe, stage)
    per_epoch = samples // section.global_batch_size
    if per_epoch == 0:
        raise RecipeError(f"{recipe.source}: {stage}.global_batch_size={section.global_batch_size} exceeds the "
                          f"{samples} training samples in {recipe.manifest_path}: not one optimizer step per epoch")
    total = math.ceil(section.epochs * per_epoch)
    return min(total, section.max_steps) if section.max_steps else total


def engine_settings(section: TrainingSection, micro: int, accumulation: int, total_steps: int) -> EngineSettings:
    return EngineSettings(zero_stage=section.zero_stage, precision=section.precision, micro_batch_size=micro,
                          gradient_accumulation_steps=accumulation, gradient_clipping=section.gradient_clipping,
                          lr=section.lr, weight_decay=section.weight_decay, warmup_ratio=section.warmup_ratio,
                          min_lr_ratio=section.min_lr_ratio, lr_schedule=section.lr_schedule,
                          total_steps=total_steps, optimizer=section.optimizer,
                          offload_optimizer=section.offload_optimizer)


def loader_settings(recipe: Recipe, micro: int, accumulation: int, weights: dict[str, float],
                    interleave: bool = True) -> LoaderSettings:
    """The streaming loader's settings from the recipe's data section and seed."""
    data = recipe.data
    return LoaderSettings(micro_batch_size=micro, accumulation=accumulation, virtual_streams=data.virtual_streams,
                          weights=weights, interleave=interleave,
                          shuffle_buffer=data.shuffle_buffer, seed=recipe.seed, num_workers=data.num_workers,
                          max_bad_fraction=data.max_bad_fraction, every_modality_first=data.every_modality_first,
                          read=read_settings(recipe))


def read_settings(recipe: Recipe) -> ReadSettings:
    """Where the shards are read from and how patiently (the data section's read keys)."""
    data = recipe.data
    return ReadSettings(root=data.shard_root, retries=data.read_retries, backoff_s=data.read_backoff_s,
                        timeout_s=data.read_timeout_s, hashes=data.verify_shards == "hash")
