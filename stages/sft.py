"""SFT stage: interleaved instruction tuning of PPLLaVA with DeepSpeed (paper §3.3, §4.1).

    tokenizers, model (vision frozen; projector, CLIP text and LLM train, per sft.trainable)
    DeepSpeed engine: ZeRO stage, bf16, AdamW, cosine schedule with warmup, gradient clipping
    streaming loader over run_dir/shard (interleaved micro-batches of video / image / multi-image)
    resume (--resume auto|PATH): engine + optimizer + scheduler, loader position, RNG states
    for step in [start, total):
        until `accumulation` good micro-batches:  forward -> loss finite on every rank?
                                                   no: skip it, count it (stop after N in a row)
                                                   yes: backward, engine.step (optimizer on the last)
        every log_every: console (tqdm), metrics.jsonl, TensorBoard
        every save_every, at the end, or after SIGTERM/SIGUSR1: atomic checkpoint
                                                   (after a signal: exit code 3, "requeue me")

Global batch = micro batch x accumulation x world size = sft.global_batch_size (paper: 256).
Outputs: run_dir/sft/checkpoints/step_N (+ latest), metrics.jsonl, tensorboard/, model/ (config.json and
tokenizers: the model directory without its weights, which live in the checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from backends.deepspeed_engine import EngineSettings, build_engine, model_init_context
from backends.distributed import sum_across_ranks
from pipeline.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, read_trainer_state, remove_partial,
                                 restore_rng_state, rng_state, save_checkpoint, set_aside_later_checkpoints)
from pipeline.data.loader import TRAIN_MODALITIES, LoaderSettings, StreamingLoader
from pipeline.metrics import MetricsLog
from pipeline.model_setup import (MODEL_DIR, build_model, build_processor, count_parameters, load_tokenizers,
                                  save_processor_config, save_tokenizers)
from pipeline.recipe import Recipe, RecipeError, differences
from pipeline.runner import StageContext, StageFailed, StoppedForRequeue

logger = logging.getLogger(__name__)

DISTRIBUTED = True
TRAINING = True
# Keys that do not change what is trained: never part of the fingerprint, free to change on resume
# (recomputing activations gives the same gradients, so it may be switched on after an OOM).
RUNTIME_KEYS = ("log_every", "save_every", "keep_last", "max_nonfinite_in_a_row")
RUNTIME_MODEL_KEYS = ("gradient_checkpointing",)
# Keys a resumed run may change (the schedule continues from the checkpoint's step with the new values).
RESUMABLE_CHANGES = ("sft.lr", "sft.max_steps", "sft.epochs")


def inputs(recipe: Recipe, world_size: int) -> dict:
    sft, model = asdict(recipe.sft), asdict(recipe.model)
    for key in RUNTIME_KEYS:
        sft.pop(key)
    for key in RUNTIME_MODEL_KEYS:
        model.pop(key)
    data = asdict(recipe.data)
    for key in ("cards", "variables"):  # reach training through the shard stage's fingerprint
        data.pop(key)
    found = {"seed": recipe.seed, "model": model, "data": data, "sft": sft, "world_size": world_size}
    if recipe.shard is None:  # shards made elsewhere: their manifest is this stage's data input
        found["manifest_sha256"] = hashlib.sha256(Path(recipe.data.manifest).read_bytes()).hexdigest()
    return found


def schedule_length(recipe: Recipe, manifest_path: Path) -> tuple[int, int]:
    """(optimizer steps, training samples in the manifest) from epochs, capped by max_steps."""
    manifest = json.loads(manifest_path.read_text())
    weights = recipe.data.weights
    samples = sum(manifest["counts"].get(m, 0) for m in TRAIN_MODALITIES if weights.get(m, 0) > 0)
    per_epoch = samples // recipe.sft.global_batch_size
    if per_epoch == 0:
        raise RecipeError(f"{recipe.source}: sft.global_batch_size={recipe.sft.global_batch_size} exceeds the "
                          f"{samples} training samples in {manifest_path}: not one optimizer step per epoch")
    total = math.ceil(recipe.sft.epochs * per_epoch)
    return (min(total, recipe.sft.max_steps) if recipe.sft.max_steps else total), samples


def _resume_point(context: StageContext, checkpoints: Path) -> Path | None:
    if context.resume is None:
        found = latest_checkpoint(checkpoints)
        if found is not None:
            raise CheckpointError(f"{context.directory} holds checkpoints of an unfinished run (latest: {found.name}); "
                                  f"pass --resume auto to continue it, or move the directory away to start over")
        return None
    if context.resume == "auto":
        found = latest_checkpoint(checkpoints)
        if found is None:
            logger.info("--resume auto: no checkpoint in %s yet; starting from step 0", checkpoints)
        return found
    path = Path(context.resume)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"--resume {path}: not a complete checkpoint (no trainer_state.json)")
    return path


def _check_same_training(saved_inputs: dict, current: dict, path: Path) -> None:
    """The checkpoint's stage inputs (upstream fingerprint included) against this run's."""
    changed = differences(saved_inputs, current)
    refused = [key for key in changed if key not in RESUMABLE_CHANGES]
    if "upstream" in refused:
        raise CheckpointError(f"{path} was trained on the output of an earlier stage that has changed since (the "
                              f"shards were rebuilt, or another manifest is named): it cannot continue on other data. "
                              f"Move {path.parent.parent} away to train from scratch")
    if refused:
        raise CheckpointError(f"{path} was written by a run with different settings: {', '.join(refused)}. Revert "
                              f"them to resume, or start a new run_dir (keys that may change on resume: "
                              f"{', '.join(RESUMABLE_CHANGES + tuple('sft.' + k for k in RUNTIME_KEYS))}, "
                              f"model.gradient_checkpointing)")
    if changed:
        logger.warning("resuming with changed %s: the schedule continues from the checkpoint's step with the new "
                       "values", ", ".join(changed))


def _set_peak_lr(scheduler, lr: float) -> None:
    """Rescale the restored schedule to peak ``lr`` from the current step on."""
    if all(base == lr for base in scheduler.base_lrs):
        return
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group in scheduler.optimizer.param_groups:
        group["lr"] = lr * factor
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class _Window:
    """What happened since the last log line (rank-local, reduced when logged)."""

    def __init__(self) -> None:
        self.start, self.losses, self.samples, self.tokens, self.truncated = time.perf_counter(), [], 0, 0, 0
        self.visual: dict[str, list[int]] = {}

    def add(self, batch) -> None:
        self.samples += len(batch.keys)
        self.tokens += int(batch.inputs["attention_mask"].sum())
        self.truncated += batch.truncated
        for modality, counts in batch.visual_tokens.items():
            self.visual.setdefault(modality, []).extend(counts)


def run(context: StageContext) -> dict:
    recipe, backend, dist = context.recipe, context.backend, context.dist
    sft, device = recipe.sft, backend.device(dist.local_rank)
    checkpoints = context.directory / "checkpoints"
    micro, accumulation, world = recipe.batch_layout(dist.world_size)
    if world != recipe.cluster.world_size and dist.is_main:
        logger.warning("the recipe's cluster section describes %d processes but %d were launched; gradient "
                       "accumulation adapts so the global batch stays %d", recipe.cluster.world_size, world,
                       sft.global_batch_size)
    total_steps, samples = schedule_length(recipe, recipe.manifest_path)
    current_inputs = context.inputs

    # Build: tokenizers, model, engine, loader.
    tokenizer, clip_tokenizer = load_tokenizers(recipe)
    settings = EngineSettings(zero_stage=sft.zero_stage, precision=sft.precision, micro_batch_size=micro,
                              gradient_accumulation_steps=accumulation, gradient_clipping=sft.gradient_clipping,
                              lr=sft.lr, weight_decay=sft.weight_decay, warmup_ratio=sft.warmup_ratio,
                              min_lr_ratio=sft.min_lr_ratio, total_steps=total_steps, optimizer=sft.optimizer,
                              offload_optimizer=sft.offload_optimizer)
    with model_init_context(settings, backend.resolve_dtype(sft.precision, dist.local_rank)):
        model = build_model(recipe, tokenizer, backend.attn_implementation)
    model.set_trainable_parts(**asdict(sft.trainable))
    config = model.config
    engine, _, scheduler = build_engine(model, backend, settings, dist.local_rank)
    loader = StreamingLoader(recipe.manifest_path, build_processor(recipe, config, tokenizer, clip_tokenizer),
                             LoaderSettings(micro_batch_size=micro, weights=dict(recipe.data.weights),
                                            interleave=recipe.data.interleave, shuffle_buffer=recipe.data.shuffle_buffer,
                                            seed=recipe.seed, num_workers=recipe.data.num_workers,
                                            max_bad_fraction=recipe.data.max_bad_fraction),
                             rank=dist.rank, world_size=world)
    parameters, trainable = count_parameters(model)
    if dist.is_main:
        logger.info("sft: %d steps of %d samples (micro %d x accumulation %d x world %d) over %d samples; "
                    "%.1fM parameters, %.1fM trainable", total_steps, micro * accumulation * world, micro,
                    accumulation, world, samples, parameters / 1e6, trainable / 1e6)

    if context.dry_run:
        batch = next(iter(loader))
        loss = engine(**{k: v.to(device) for k, v in batch.inputs.items()}).loss
        engine.backward(loss)
        if dist.is_main:
            print(f"dry run: loss {float(loss):.4f} on {len(batch.keys)} samples {batch.visual_tokens}; "
                  f"memory {backend.memory_stats()}", flush=True)
        return {}

    # Resume.
    start_step, nonfinite_skipped, first_loss = 0, 0, None
    if dist.is_main:
        remove_partial(checkpoints)
    context.barrier()
    resume_from = _resume_point(context, checkpoints)
    if resume_from is not None:
        trainer_state = read_trainer_state(resume_from, world)
        _check_same_training(trainer_state["inputs"], current_inputs, resume_from)  # before minutes of loading
        if dist.is_main:
            set_aside_later_checkpoints(checkpoints, resume_from)
        context.barrier()
        rank_state = load_checkpoint(engine, resume_from, dist.rank)
        _set_peak_lr(scheduler, sft.lr)  # the recipe's (a resumed run may change it)
        loader.load_state_dict(rank_state["loader"])
        restore_rng_state(rank_state["rng"], backend.device_module())
        start_step, nonfinite_skipped = trainer_state["step"], trainer_state["nonfinite_skipped"]
        first_loss = trainer_state.get("first_loss")
        if dist.is_main:
            logger.info("resumed from %s at step %d", resume_from, start_step)

    metrics = MetricsLog(context.directory, enabled=dist.is_main, resume_step=start_step)
    if dist.is_main:
        # The model directory without its weights: what export (and a DPO stage starting here) needs
        # besides a checkpoint to rebuild the model.
        save_tokenizers(tokenizer, clip_tokenizer, context.directory / MODEL_DIR)
        config.save_pretrained(context.directory / MODEL_DIR)
        save_processor_config(recipe, config, context.directory / MODEL_DIR)

    def checkpoint(step: int, last_metrics: dict) -> Path:
        state = {"step": step, "total_steps": total_steps, "world_size": world, "inputs": current_inputs,
                 "fingerprint": context.fingerprint, "nonfinite_skipped": nonfinite_skipped,
                 "first_loss": first_loss, "last_metrics": last_metrics}
        rank_state = {"loader": loader.state_dict(), "rng": rng_state(backend.device_module())}
        return save_checkpoint(engine, checkpoints, step, state, rank_state, recipe.to_yaml(), dist.rank,
                               sft.keep_last, context.barrier)

    # The loop.
    engine.train()
    batches = iter(loader)
    progress = tqdm(total=total_steps, initial=start_step, desc="sft", unit="step", disable=not dist.is_main,
                    dynamic_ncols=True)
    window, in_a_row, last, saved_at = _Window(), 0, {}, None
    stop_flag = context.stop  # SIGTERM / SIGUSR1 since the run started, also during the build above
    for step in range(start_step, total_steps):
        lr = scheduler.get_last_lr()[0]
        step_loss, good = 0.0, 0
        while good < accumulation:
            batch = next(batches)
            loss = engine(**{k: v.to(device) for k, v in batch.inputs.items()}).loss
            finite = sum_across_ranks([float(torch.isfinite(loss.detach()).all())], device)[0] == world
            if not finite:  # no backward: the optimizer never sees it; another micro-batch takes its place
                in_a_row, nonfinite_skipped = in_a_row + 1, nonfinite_skipped + 1
                logger.warning("step %d: non-finite loss on some rank, micro-batch %s skipped (%d in a row)",
                               step + 1, batch.keys, in_a_row)
                if in_a_row >= sft.max_nonfinite_in_a_row:
                    raise StageFailed(f"{in_a_row} non-finite losses in a row (sft.max_nonfinite_in_a_row); "
                                      f"the last good checkpoint is {latest_checkpoint(checkpoints)}")
                continue
            in_a_row = 0
            engine.backward(loss)
            engine.step()
            step_loss += float(loss.detach()) / accumulation
            good += 1
            window.add(batch)
        done = step + 1
        step_loss, stop_votes = sum_across_ranks([step_loss, float(stop_flag.received is not None)], device)
        window.losses.append(step_loss / world)
        first_loss = window.losses[-1] if first_loss is None else first_loss
        progress.update(1)
        if done % sft.log_every == 0 or done == total_steps or stop_votes:
            last = _log(window, done, lr, engine, loader, nonfinite_skipped, device, backend, dist.world_size)
            metrics.write(done, last)
            progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
            window = _Window()
        if stop_votes:
            checkpoint(done, last)
            progress.close()
            metrics.close()
            raise StoppedForRequeue(f"stopped by a signal after step {done}; checkpointed, exit for requeue")
        if done % sft.save_every == 0 or done == total_steps:
            saved_at = checkpoint(done, last)
    progress.close()
    metrics.close()
    if saved_at is None:  # resumed at the very end: nothing left to train
        saved_at = latest_checkpoint(checkpoints)
    return {"steps": total_steps, "loss": f"{first_loss:.4f} -> {last.get('loss', float('nan')):.4f}",
            "checkpoint": str(saved_at), "metrics": str(metrics.path)}


def _log(window: _Window, step: int, lr: float, engine, loader, nonfinite: int, device, backend, world: int) -> dict:
    samples, tokens, truncated, bad = sum_across_ranks(
        [window.samples, window.tokens, window.truncated, len(loader.bad)], device)
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    grad_norm = engine.get_global_grad_norm()
    values = {
        "loss": sum(window.losses) / len(window.losses),
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "loader_skipped": int(bad),
        "truncated": int(truncated),
        "nonfinite_skipped": nonfinite,
    }
    for modality, counts in window.visual.items():  # rank 0's samples: the mix is the same on every rank
        values[f"visual_tokens/{modality}"] = sum(counts) / len(counts)
    values.update({f"memory/{k}": round(v, 3) for k, v in backend.memory_stats().items()})
    return values
