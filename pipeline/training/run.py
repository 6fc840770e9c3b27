"""TrainingRun: the bookkeeping around a training stage's loop (the package docstring shows the
loop). It restores a checkpoint with --resume (``resume.py`` decides which and whether), guards
against non-finite losses, logs each step (tqdm, metrics.jsonl, TensorBoard), checkpoints every
save_every steps, at the end and after SIGTERM/SIGUSR1 (then exits for requeue), and writes the
stage's summary."""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from backends.distributed import decided_on_rank0, gather_objects, sum_across_ranks
from backends.kernels import fallback_counts
from pipeline.checkpoint import (latest_checkpoint, load_checkpoint, read_trainer_state, remove_partial,
                                 restore_rng_state, rng_state, save_checkpoint, set_aside_later_checkpoints)
from pipeline.data.loader import merge_loader_states
from pipeline.data.shard_files import LoaderError, check_shards
from pipeline.layout import SAMPLES_DIR, checkpoints_dir
from pipeline.metrics import MetricsLog
from pipeline.recipe import TrainingSection
from pipeline.runner import StageContext, StageFailed, StoppedForRequeue
from pipeline.training.resume import check_same_training, report_layout_change, resume_point, set_peak_lr
from pipeline.training.settings import micro_batch_normaliser, read_settings

logger = logging.getLogger(__name__)

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
        self.fallbacks_before = fallback_counts()  # this stage's count, not the process's

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
            decided_on_rank0(lambda: check_shards(context.recipe.manifest_path, hashes, read_settings(context.recipe)),
                             (LoaderError,))
        if ranks.is_main:
            remove_partial(self.checkpoints)
        context.barrier()
        start = 0
        checkpoint_hashes = self.section.verify_checkpoints == "hash"
        resume_from = resume_point(context.resume, self.checkpoints, context.directory, checkpoint_hashes)
        if resume_from is not None:
            trainer_state = read_trainer_state(resume_from)
            # before minutes of loading
            check_same_training(context.stage, trainer_state["inputs"], context.inputs, resume_from)
            same_ranks = report_layout_change(trainer_state["layout"], self.layout(), resume_from,
                                              self.section.global_batch_size, ranks.is_main)
            if ranks.is_main:
                set_aside_later_checkpoints(self.checkpoints, resume_from)
            context.barrier()
            rank_state = load_checkpoint(self.engine, self.scheduler, resume_from, ranks.rank, same_ranks)
            set_peak_lr(self.scheduler, self.section.lr)  # the recipe's (a resumed run may change it)
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
        if self.section.gc_every:
            # Python's automatic collection pauses each rank at its own moments, and every collective
            # waits for the slowest: collect on a schedule instead, all ranks at the same step.
            gc.collect()
            gc.disable()
        return start

    def layout(self) -> dict:
        """How this run splits the global batch and shards its state (free to change on resume)."""
        settings = self.loader.settings
        return {"world_size": self.world, "micro_batch_size": settings.micro_batch_size,
                "accumulation": settings.accumulation, "zero_stage": self.section.zero_stage,
                "offload_optimizer": self.section.offload_optimizer, "device": self.context.backend.name}

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
        if section.gc_every and done % section.gc_every == 0:
            gc.collect(1)  # the young generations: milliseconds; what survives longer is collected at the end

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
        # calls this rank ran on the reference because a fused kernel's limits excluded them (backends/kernels.py)
        values.update({f"kernel_fallbacks/{op}": count - self.fallbacks_before[op]
                       for op, count in fallback_counts().items()})
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
        if self.section.gc_every:
            gc.enable()

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
            if len(self.loader.reasons) > 20:
                summary["refused, not listed"] = (f"{len(self.loader.reasons) - 20} more on this rank; every refused "
                                                  f"key is in the last checkpoint's trainer_state.json (loader.bad), "
                                                  f"their count in metrics.jsonl (loader_skipped)")
        return summary
