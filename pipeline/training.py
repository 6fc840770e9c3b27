"""What every training stage (sft, dpo) shares; each stage keeps its own loop.

    stage_inputs        the recipe keys a training stage's fingerprint covers
    schedule_length     optimizer steps from epochs and samples, capped by max_steps
    engine_settings     the DeepSpeed engine's settings from a training section
    loader_settings     the streaming loader's settings from the data section
    TrainingRun         the bookkeeping around a loop: resume (engine, scheduler, loader, RNG),
                        the non-finite guard, per-step logging (tqdm, metrics.jsonl, TensorBoard),
                        checkpoints (every save_every, at the end, and after SIGTERM/SIGUSR1 with
                        the requeue exit), and the stage's summary

A loop reads, top to bottom:

    training = TrainingRun(context, engine, scheduler, loader, total_steps)
    for step in range(training.start(), total_steps):
        ... forward; if not training.finite(loss, batch.keys, step): training.stand_in(batch); continue
            backward; engine.step; training.interval.add(batch) ...
        training.end_step(step + 1, step_loss, lr)   # may raise StoppedForRequeue
    return training.finish()
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from backends.deepspeed_engine import EngineSettings
from backends.distributed import decided_on_rank0, gather_objects, sum_across_ranks
from pipeline.atomic import sha256_of
from pipeline.checkpoint import (CheckpointError, check_resume_path, latest_checkpoint,
                                 load_checkpoint, read_trainer_state, remove_partial, restore_rng_state, rng_state,
                                 save_checkpoint, set_aside_later_checkpoints, sound_resume_point)
from pipeline.data.loader import LoaderError, LoaderSettings, check_shards, merge_loader_states
from pipeline.layout import SAMPLES_DIR, checkpoints_dir, is_checkpoint
from pipeline.metrics import MetricsLog
from pipeline.preference import answer_mask
from pipeline.recipe import Recipe, RecipeError, TrainingSection, differences
from pipeline.runner import StageContext, StageFailed, StoppedForRequeue

logger = logging.getLogger(__name__)

# Keys that do not change what is trained: never part of the fingerprint, free to change on resume
# (recomputing activations gives the same gradients, so it may be switched on after an OOM).
RUNTIME_KEYS = ("log_every", "save_every", "keep_last", "verify_checkpoints", "max_nonfinite_in_a_row",
                "record_samples")
RUNTIME_MODEL_KEYS = ("gradient_checkpointing",)
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
    data.pop("verify_shards")  # how they are checked, not what is trained
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
                          max_bad_fraction=data.max_bad_fraction, every_modality_first=data.every_modality_first)


@dataclass
class LogInterval:
    """What happened since the last log line, on this rank (reduced over ranks when logged).
    ``sums`` holds stage-specific per-micro-batch values (DPO rewards...), logged as means."""

    start: float = field(default_factory=time.perf_counter)
    losses: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    truncated: int = 0
    micro_batches: int = 0
    visual: dict[str, list[int]] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, batch, **values: float) -> None:
        self.samples += len(batch.keys)
        self.tokens += int(batch.inputs["attention_mask"].sum())
        self.truncated += batch.truncated
        self.micro_batches += 1
        for modality, counts in batch.visual_tokens.items():
            self.visual.setdefault(modality, []).extend(counts)
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)


class TrainingRun:
    def __init__(self, context: StageContext, engine, scheduler, loader, total_steps: int) -> None:
        self.context, self.engine, self.scheduler, self.loader = context, engine, scheduler, loader
        self.section: TrainingSection = getattr(context.recipe, context.stage)
        self.total_steps, self.world = total_steps, context.ranks.world_size
        self.device = context.backend.device(context.ranks.local_rank)
        self.checkpoints = checkpoints_dir(context.directory)
        self.nonfinite_skipped = self.in_a_row = 0
        self.first_loss: float | None = None
        self.last: dict = {}
        self.saved_at: Path | None = None
        self.interval = LogInterval()
        self.metrics: MetricsLog | None = None
        self.progress = None
        self.step_keys: list[str] = []
        self.left_out: list[str] = []    # keys of this step's micro-batches left out (non-finite loss)
        self.micro_seen = self.micro_good = 0

    @property
    def lr(self) -> float:
        """The learning rate of the step about to run."""
        return self.scheduler.get_last_lr()[0]

    # -- start ------------------------------------------------------------------------------------
    def start(self) -> int:
        """Open the logs and restore from --resume (refusing a checkpoint of other training); returns
        the first step to run."""
        context, ranks = self.context, self.context.ranks
        if context.recipe.shard is None:  # shards made elsewhere: all there, at their recorded sizes?
            hashes = context.recipe.data.verify_shards == "hash"
            decided_on_rank0(lambda: check_shards(context.recipe.manifest_path, hashes), (LoaderError,))
        if ranks.is_main:
            remove_partial(self.checkpoints)
        context.barrier()
        start = 0
        resume_from = self._resume_point()
        if resume_from is not None:
            trainer_state = read_trainer_state(resume_from)
            self._check_same_training(trainer_state["inputs"], resume_from)  # before minutes of loading
            same_ranks = self._report_layout_change(trainer_state["layout"], resume_from)
            if ranks.is_main:
                set_aside_later_checkpoints(self.checkpoints, resume_from)
            context.barrier()
            rank_state = load_checkpoint(self.engine, self.scheduler, resume_from, ranks.rank, same_ranks)
            self._set_peak_lr(self.section.lr)  # the recipe's (a resumed run may change it)
            self.loader.load_state_dict(trainer_state["loader"])
            if rank_state is not None:
                restore_rng_state(rank_state["rng"], context.backend.device_module())
            start, self.nonfinite_skipped = trainer_state["step"], trainer_state["nonfinite_skipped"]
            self.first_loss = trainer_state.get("first_loss")
            if ranks.is_main:
                logger.info("resumed from %s at step %d", resume_from, start)
        self.metrics = MetricsLog(context.directory, enabled=ranks.is_main, resume_step=start)
        self.progress = tqdm(total=self.total_steps, initial=start, desc=context.stage, unit="step",
                             disable=not ranks.is_main, dynamic_ncols=True)
        self.interval = LogInterval()
        return start

    def _resume_point(self) -> Path | None:
        resume, checkpoints = self.context.resume, self.checkpoints
        if resume is None:
            found = latest_checkpoint(checkpoints)
            if found is not None:
                raise CheckpointError(f"{self.context.directory} holds checkpoints of an unfinished run (latest: "
                                      f"{found.name}); pass --resume auto to continue it, or move the directory away "
                                      f"to start over")
            return None
        hashes = self.section.verify_checkpoints == "hash"
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

    def _check_same_training(self, saved_inputs: dict, path: Path) -> None:
        """The checkpoint's stage inputs (upstream fingerprint included) against this run's."""
        stage = self.context.stage
        allowed = tuple(f"{stage}.{key}" for key in SCHEDULE_KEYS)
        changed = differences(saved_inputs, self.context.inputs)
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

    def layout(self) -> dict:
        """How this run splits the global batch and shards its state (free to change on resume)."""
        settings = self.loader.settings
        return {"world_size": self.world, "micro_batch_size": settings.micro_batch_size,
                "accumulation": settings.accumulation, "zero_stage": self.section.zero_stage,
                "offload_optimizer": self.section.offload_optimizer, "device": self.context.backend.name}

    def _report_layout_change(self, saved: dict, path: Path) -> bool:
        """Say what differs between the checkpoint's layout and this run's (one line on rank 0);
        whether each rank can take its own RNG state from the checkpoint (same world size and
        device type)."""
        here = self.layout()
        changed = {key: (saved.get(key), value) for key, value in here.items() if saved.get(key) != value}
        same_ranks = "world_size" not in changed and "device" not in changed
        if changed and self.context.ranks.is_main:
            described = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
            logger.warning("resuming %s on another layout: %s. The global batch (%d), the data order and the "
                           "optimizer state carry over; the state is re-partitioned for this layout%s", path.name,
                           described, self.section.global_batch_size,
                           "" if same_ranks else "; RNG states restart from the seed (dropout masks differ from "
                           "an uninterrupted run)")
        return same_ranks

    def _set_peak_lr(self, lr: float) -> None:
        """Rescale the restored schedule to peak ``lr`` from the current step on."""
        scheduler = self.scheduler
        if all(base == lr for base in scheduler.base_lrs):
            return
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
        for group in scheduler.optimizer.param_groups:
            group["lr"] = lr * factor
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    # -- inside the loop ---------------------------------------------------------------------------
    def step_window(self, batches, accumulation: int) -> list:
        """The micro-batches of this rank's share of the next optimizer step, read ahead so that
        the step's normaliser (``per_micro_batch``) is known before the first backward."""
        window = [next(batches) for _ in range(accumulation)]
        self.step_keys = [key for batch in window for key in batch.keys]
        self.left_out, self.micro_seen, self.micro_good = [], 0, 0
        return window

    def per_micro_batch(self, counts: list[float], accumulation: int) -> float:
        """What each micro-batch's summed loss is divided by, so that the optimizer step minimises
        the sum over the *global* batch divided by its count (answer tokens for SFT, pairs for
        DPO), however it is split into micro-batches, accumulation steps and ranks.

        ``counts``: this rank's micro-batches' counts. DeepSpeed divides each backward by the
        accumulation steps and averages gradients over the ranks, hence ``global / (world x
        accumulation)``. Averaging per-micro-batch means instead (the gradient-accumulation bug
        transformers fixed in 2024) weighs a token of a short micro-batch above one of a long one.
        """
        return micro_batch_normaliser(sum_across_ranks([float(sum(counts))], self.device)[0], self.world, accumulation)

    def finite(self, loss: torch.Tensor, keys: list[str], step: int) -> bool:
        """Whether the loss is finite on every rank; a micro-batch where it is not gets no backward
        (``stand_in`` runs in its place), is counted, and the run stops after N in a row."""
        finite = sum_across_ranks([float(torch.isfinite(loss.detach()).all())], self.device)[0] == self.world
        self.micro_seen += 1
        if finite:
            self.in_a_row, self.micro_good = 0, self.micro_good + 1
            return True
        self.in_a_row, self.nonfinite_skipped = self.in_a_row + 1, self.nonfinite_skipped + 1
        logger.warning("step %d: non-finite loss on some rank, micro-batch %s skipped (%d in a row)", step + 1, keys,
                       self.in_a_row)
        if self.in_a_row >= self.section.max_nonfinite_in_a_row:
            raise StageFailed(f"{self.in_a_row} non-finite losses in a row ({self.context.stage}.max_nonfinite_in_a_row); "
                              f"the last good checkpoint is {latest_checkpoint(self.checkpoints)}")
        return False

    def stand_in(self, batch) -> None:
        """Leave a micro-batch whose loss was not finite out of its step. A one-token text row with
        no target runs in its place and adds exactly zero gradient, so DeepSpeed still counts
        ``accumulation`` backward passes (its optimizer steps on the last) and every rank calls the
        same modules. Nothing is read in its place: the later steps train on the samples they
        always would, so the data order stays a function of the step on any layout. (The step's
        normaliser still counts the left-out micro-batch's tokens or pairs.) When every micro-batch
        of the step was left out, its optimizer step runs at learning rate 0: no weight moves (AdamW's
        moments still decay one step); the schedule goes on at the next step."""
        self.left_out.extend(batch.keys)
        token = batch.inputs["input_ids"][:1, :1].to(self.device)
        logits = self.engine(input_ids=token, attention_mask=torch.ones_like(token)).logits
        self.engine.backward(logits.float().sum() * 0.0)
        if self.micro_good == 0 and self.micro_seen == self.loader.settings.accumulation:
            logger.warning("every micro-batch of this step was left out: its optimizer step changes no weight")
            for group in self.engine.optimizer.param_groups:  # the scheduler sets the next step's rate
                group["lr"] = 0.0
        self.engine.step()

    def end_step(self, done: int, step_loss: float, lr: float) -> None:
        """After optimizer step ``done``: log, checkpoint. After SIGTERM / SIGUSR1 on any rank, every
        rank checkpoints here and raises ``StoppedForRequeue`` (the caller's loop ends with it)."""
        section = self.section
        step_loss, stop_votes = sum_across_ranks([step_loss, float(self.context.stop.received is not None)],
                                                 self.device)
        self.interval.losses.append(step_loss / self.world)
        if section.record_samples:
            self._record_samples(done)
        self.first_loss = self.interval.losses[-1] if self.first_loss is None else self.first_loss
        self.progress.update(1)
        if done % section.log_every == 0 or done == self.total_steps or stop_votes:
            self.last = self._log_values(lr)
            self.metrics.write(done, self.last)
            self.progress.set_postfix(loss=f"{self.last['loss']:.4f}", lr=f"{lr:.2e}")
            self.interval = LogInterval()
        if stop_votes:
            self._checkpoint(done)
            self._close()
            raise StoppedForRequeue(f"stopped by a signal after step {done}; checkpointed, exit for requeue")
        if done % section.save_every == 0 or done == self.total_steps:
            self.saved_at = self._checkpoint(done)

    def _record_samples(self, done: int) -> None:
        """One line per optimizer step and rank: which samples it trained on (by key). A resumed
        run appends the steps it trains again; the last line of a step is the one that counts."""
        path = self.context.directory / SAMPLES_DIR / f"rank_{self.context.ranks.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"step": done, "keys": self.step_keys}
        if self.left_out:
            entry["left_out"] = self.left_out  # read, but their loss was not finite: no gradient
        with path.open("a") as log:
            log.write(json.dumps(entry) + "\n")

    def _log_values(self, lr: float) -> dict:
        interval, names = self.interval, sorted(self.interval.sums)
        reduced = sum_across_ranks([interval.samples, interval.tokens, interval.truncated, self.loader.refused_here,
                                    interval.micro_batches, *(interval.sums[n] for n in names)], self.device)
        samples, tokens, truncated, bad, micro_batches = reduced[:5]
        bad += self.loader.carried_bad  # refused before the resume (the same on every rank)
        elapsed = max(time.perf_counter() - interval.start, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        values = {
            "loss": sum(interval.losses) / len(interval.losses),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens / elapsed,
            "loader_skipped": int(bad),
            "truncated": int(truncated),
            "nonfinite_skipped": self.nonfinite_skipped,
        }
        values.update({name: total / max(micro_batches, 1) for name, total in zip(names, reduced[5:])})
        for modality, counts in interval.visual.items():  # rank 0's samples: the mix is the same on every rank
            values[f"visual_tokens/{modality}"] = sum(counts) / len(counts)
        values.update({f"memory/{k}": round(v, 3) for k, v in self.context.backend.memory_stats().items()})
        return values

    def _checkpoint(self, step: int) -> Path:
        context, ranks = self.context, self.context.ranks
        state = {"step": step, "total_steps": self.total_steps, "world_size": self.world, "layout": self.layout(),
                 "loader": self._loader_state(), "inputs": context.inputs, "fingerprint": context.fingerprint,
                 "nonfinite_skipped": self.nonfinite_skipped, "first_loss": self.first_loss, "last_metrics": self.last}
        rank_state = {"rng": rng_state(context.backend.device_module())}
        return save_checkpoint(self.engine, self.scheduler, self.checkpoints, step, state, rank_state,
                               context.recipe.to_yaml(), ranks.rank, self.section.keep_last, context.barrier,
                               hashes=self.section.verify_checkpoints == "hash")

    def _loader_state(self) -> dict:
        """The loader's position, which every rank shares (the step), with every rank's refused
        samples and sample counts merged: what any layout needs to read on exactly as before."""
        return merge_loader_states(gather_objects(self.loader.state_dict()))

    # -- after the loop ------------------------------------------------------------------------------
    def _close(self) -> None:
        self.progress.close()
        self.metrics.close()

    def finish(self) -> dict:
        """The stage's summary, once the loop has run to ``total_steps``."""
        self._close()
        saved_at = self.saved_at or latest_checkpoint(self.checkpoints)  # resumed at the very end: nothing to train
        last_loss = self.last.get("loss", float("nan"))
        first = float("nan") if self.first_loss is None else self.first_loss
        summary = {"steps": self.total_steps, "loss": f"{first:.4f} -> {last_loss:.4f}", "checkpoint": str(saved_at),
                   "metrics": str(self.metrics.path)}
        if self.loader.reasons:  # this rank's refused samples and why (the counts of all ranks are in the metrics)
            summary["refused"] = dict(list(self.loader.reasons.items())[:20])
        return summary
