"""DeepSpeed engine for the training stages: ZeRO 0/2/3, bf16/fp16/fp32, AdamW, warmup then cosine or linear decay.

DeepSpeed is imported lazily (it is an optional extra, and importing it picks an accelerator:
the backend sets DS_ACCELERATOR first). Only parameters that require grad reach the optimizer,
so the model's trainable-part switches decide what trains; norms, biases and other 1-d
parameters get no weight decay.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch

from backends.spec import Backend

logger = logging.getLogger(__name__)

OPTIMIZERS = ("auto", "torch_adamw", "deepspeed_adam")
# Elements of the buffer ZeRO-1/2/3 collect gradients in before reducing them (and ZeRO-1/2's
# all-gather chunks). DeepSpeed's default, 5e8, is a 1 GB bf16 buffer (2 GB in fp32) on every
# rank, allocated even for a tiny model; 5e7 (100 MB in bf16) still sends messages far past the
# size where NCCL and HCCL reach full bandwidth. Grouping does not change the summed values.
REDUCE_BUCKET_ELEMENTS = 50_000_000


@dataclass
class EngineSettings:
    zero_stage: int = 2
    precision: str = "bf16"
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    lr_schedule: str = "cosine"
    total_steps: int = 1
    optimizer: str = "auto"
    offload_optimizer: bool = False

    def validate(self) -> None:
        """This module's own preconditions: it is used without a recipe too (tests/dist/train_tiny.py,
        benchmarks). A recipe's values were already checked, under their key names, by pipeline.recipe."""
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.micro_batch_size < 1 or self.gradient_accumulation_steps < 1 or self.total_steps < 1:
            raise ValueError("micro_batch_size, gradient_accumulation_steps and total_steps must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.offload_optimizer and self.zero_stage < 2:
            raise ValueError("offload_optimizer needs ZeRO stage 2 or 3")


def deepspeed_module():
    return importlib.import_module("deepspeed")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: with weight decay, and without (norms, biases, 1-d)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or name.endswith(".bias") or "norm" in name.lower():
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameter: check its trainable-part switches")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


SCHEDULES = ("cosine", "linear")


def warmup_then_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                       schedule: str = "cosine"):
    """Linear warmup to the peak lr over ``warmup_steps``, then a cosine (or, ``schedule="linear"``,
    a straight-line) decay to ``min_lr_ratio`` of it at ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(groups: list[dict[str, Any]], settings: EngineSettings, backend: Backend) -> torch.optim.Optimizer:
    """DeepSpeed's Adam (fused on GPU, CPU Adam when the optimizer is offloaded) where its kernel
    can be built; torch's AdamW otherwise (always on plain CPU runs: same maths, no compile)."""
    kwargs = dict(lr=settings.lr, betas=settings.betas, eps=settings.eps)
    use_deepspeed = settings.optimizer == "deepspeed_adam" or (
        settings.optimizer == "auto" and (settings.offload_optimizer or backend.name != "cpu")
    )
    if use_deepspeed:
        ops = importlib.import_module("deepspeed.ops.adam")
        builders = importlib.import_module("deepspeed.ops.op_builder")
        if settings.offload_optimizer:
            if builders.CPUAdamBuilder().is_compatible():
                return ops.DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        elif builders.FusedAdamBuilder().is_compatible():
            return ops.FusedAdam(groups, adam_w_mode=True, **kwargs)
        if settings.optimizer == "deepspeed_adam":
            raise RuntimeError("optimizer 'deepspeed_adam' was requested but DeepSpeed cannot build its Adam kernel here")
        logger.warning("DeepSpeed's Adam kernel cannot be built on %s; using torch.optim.AdamW", backend.name)
    return torch.optim.AdamW(groups, **kwargs)


def deepspeed_config(settings: EngineSettings, dtype: torch.dtype) -> dict[str, Any]:
    """DeepSpeed's JSON config. The global batch (micro x accumulation x world) is left for
    DeepSpeed to derive from the process group, so one config serves every world size."""
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.zero_stage >= 1:
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = REDUCE_BUCKET_ELEMENTS
    if settings.zero_stage == 3:
        # Gather the full weights into the checkpoint's model file: export needs no ZeRO tools.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "gradient_clipping": settings.gradient_clipping,
        "zero_optimization": zero,
        # Our optimizer is torch's or DeepSpeed's own AdamW; ZeRO must not refuse it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the stages log; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    return config


@contextlib.contextmanager
def model_init_context(settings: EngineSettings, dtype: torch.dtype, partitioned: bool = True):
    """Construct or load the model inside this context (``Model._from_config`` / ``from_pretrained``).

    Under ZeRO-3 it activates transformers' DeepSpeed integration, so construction happens in
    ``deepspeed.zero.Init`` with weight initialisation on gathered shards: each rank only ever
    holds its shard of the weights (a 7B model is not materialised once per rank). Other stages:
    a no-op. ``partitioned=False``: a no-op too, for a model converted from another layout (its
    tensors are copied in module by module after construction, which partitioned parameters
    cannot take); it is built whole in host memory and DeepSpeed partitions it with the engine.
    """
    if settings.zero_stage != 3 or not partitioned:
        yield
        return
    integration = importlib.import_module("transformers.integrations.deepspeed")
    # transformers keeps only a weak reference to this object: it must stay alive while we yield.
    keep_alive = integration.HfDeepSpeedConfig(deepspeed_config(settings, dtype))  # noqa: F841
    try:
        yield
    finally:
        integration.unset_hf_deepspeed_config()


@contextlib.contextmanager
def stop_signals_held():
    """SIGTERM and SIGUSR1 blocked in this thread while DeepSpeed may compile an op: its JIT
    builds run a compiler in child processes, which inherit the block. SLURM signals every
    process of a job step, and a compiler killed by the time-limit USR1 failed the whole job. This
    process still gets the signal: another of its threads takes it, or this one once the build
    is over, and the stop flag then checkpoints at the next step boundary as for any other."""
    stops = {signal.SIGTERM, signal.SIGUSR1}
    if threading.current_thread() is not threading.main_thread():  # (signals are the main thread's)
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def build_engine(model: torch.nn.Module, backend: Backend, settings: EngineSettings, local_rank: int = 0):
    """(engine, optimizer, scheduler) for ``model`` on ``backend``; ``init_distributed`` first."""
    with stop_signals_held():
        return _build_engine(model, backend, settings, local_rank)


def _build_engine(model: torch.nn.Module, backend: Backend, settings: EngineSettings, local_rank: int):
    settings.validate()
    dtype = backend.resolve_dtype(settings.precision, local_rank)
    groups = parameter_groups(model, settings.weight_decay)
    optimizer = build_optimizer(groups, settings, backend)
    warmup = math.ceil(settings.warmup_ratio * settings.total_steps)
    scheduler = warmup_then_decay(optimizer, warmup, settings.total_steps, settings.min_lr_ratio, settings.lr_schedule)
    engine, optimizer, _, scheduler = deepspeed_module().initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(settings, dtype),
        dist_init_required=False,
    )
    trainable = sum(getattr(p, "ds_numel", p.numel()) for group in groups for p in group["params"])  # ZeRO-3: full size
    logger.info("DeepSpeed ZeRO-%d, %s, %s, %d trainable parameters", settings.zero_stage, dtype,
                type(optimizer).__name__, trainable)
    return engine, optimizer, scheduler


def build_frozen_model(model: torch.nn.Module, backend: Backend, settings: EngineSettings, local_rank: int = 0):
    """A model that only runs forward next to a trained one (DPO's reference), in the same dtype.

    Under ZeRO-3 it is a DeepSpeed engine without optimizer: its parameters stay partitioned and
    are gathered module by module like the trained model's, so the reference never holds a full
    copy per rank (construct it in ``model_init_context`` as well). Otherwise it is the module
    itself on the device. Either way nothing in it requires grad.
    """
    model.requires_grad_(False)
    model.eval()
    dtype = backend.resolve_dtype(settings.precision, local_rank)
    if settings.zero_stage != 3:
        return model.to(device=backend.device(local_rank), dtype=dtype)
    config = deepspeed_config(settings, dtype)
    config.pop("gradient_clipping")
    with stop_signals_held():
        engine, *_ = deepspeed_module().initialize(model=model, config=config, dist_init_required=False)
    engine.eval()
    return engine
