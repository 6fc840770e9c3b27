"""Training state that does not depend on how it was sharded: written by N ranks under one ZeRO
stage on one device type, it loads on M ranks under another stage on another device type.

    <dir>/index.json       format; every parameter's name, shape, dtype, whether it trains and the
                           part that holds it; names that alias another parameter (tied weights);
                           the optimizer's step count, the schedule's position, the loss scaler and
                           DeepSpeed's counters
    <dir>/part_00000.pt    one per writing rank: {name: {"value": tensor, "exp_avg": ..., "exp_avg_sq": ...}}
    <dir>/buffers.pt       the module's persistent buffers (rank 0)

A trainable parameter is stored as its fp32 master weight with AdamW's two moments, whole; a frozen
one as the module holds it. The parameters (in ``named_parameters`` order) are cut into N runs of
about equal size, rank r writing the r-th: a reader then finishes one part before the next, holding
one part in memory, and loads each part once.

Saving assembles every parameter's full tensors (``backends.zero_tensors``: DeepSpeed's own
collectives for ZeRO 1-3 and its bf16 optimizer, a gather for frozen ZeRO-3 parameters), so every
rank walks the parameters in the same order. Loading reads part p on rank p mod M only and broadcasts each tensor,
so the file system serves every byte once whatever M is; each rank then keeps its own partition
(``safe_set_full_*``), and the module's low-precision copy is set from the master weight, as
DeepSpeed's own step would have left it. Nothing here depends on the device type: a checkpoint of
a CUDA run loads on Ascend (the tensors are saved on CPU).

Unverified here: DeepSpeed's Ascend build and ZeRO's CPU offload (same DeepSpeed calls, not run on
this project's CPU test machines); ZeRO 0-3 in fp32 and bf16 are tested on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from backends.zero_tensors import (MOMENTS, PortableStateError, full_frozen, full_trainable, optimizer_steps,
                                   prepare_optimizer_state, rank_world, set_module_weight, set_trainable)

FORMAT = 1
INDEX = "index.json"
BUFFERS = "buffers.pt"
COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def part_name(writer: int) -> str:
    return f"part_{writer:05d}.pt"


def _aliases(module: torch.nn.Module) -> dict[str, str]:
    """State-dict names that are another parameter (tied weights): alias -> the name kept."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases


def persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers ``state_dict`` holds (RoPE's ``inv_freq`` and other non-persistent ones are rebuilt)."""
    names = set(module.state_dict(keep_vars=True)) - {name for name, _ in module.named_parameters(remove_duplicate=False)}
    return {name: buffer.detach().cpu().clone() for name, buffer in module.named_buffers() if name in names}


def _writers(module: torch.nn.Module, world: int) -> dict[str, int]:
    """Which rank writes each parameter: consecutive runs of about total / world elements."""
    sizes = [(name, getattr(p, "ds_numel", p.numel())) for name, p in module.named_parameters()]
    total, before, writers = max(1, sum(size for _, size in sizes)), 0, {}
    for name, size in sizes:
        writers[name] = min(world - 1, before * world // total)
        before += size
    return writers


def save_portable(engine, scheduler, directory: Path) -> None:
    """Every rank, collectively: write ``directory`` (created by the caller, shared by all ranks)."""
    rank, world = rank_world()
    module = engine.module
    prepare_optimizer_state(engine)
    mine: dict[str, dict[str, torch.Tensor]] = {}
    entries = {}
    writers = _writers(module, world)
    for name, parameter in module.named_parameters():
        writer = writers[name]
        trainable = parameter.requires_grad
        if trainable:
            tensors = full_trainable(engine, name, parameter)
        else:
            tensors = {"value": full_frozen(parameter)}
        if rank == writer:
            mine[name] = {key: tensor.detach().to("cpu", copy=True) for key, tensor in tensors.items()}
        value = tensors["value"]
        entries[name] = {"part": part_name(writer), "shape": list(value.shape), "dtype": str(value.dtype).split(".")[-1],
                         "trainable": trainable}
    torch.save(mine, directory / part_name(rank))
    if rank == 0:
        torch.save(persistent_buffers(module), directory / BUFFERS)
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        index = {"format": FORMAT, "writers": world, "parameters": entries, "aliases": _aliases(module),
                 "optimizer_steps": optimizer_steps(engine),
                 # the position only: the schedule's shape is rebuilt from the recipe, and ZeRO may
                 # regroup the optimizer's parameters differently on another layout
                 "scheduler": {"last_epoch": scheduler.last_epoch, "step_count": scheduler._step_count},
                 "counters": {key: int(getattr(engine, key, 0)) for key in COUNTERS},
                 "loss_scaler": {key: value for key, value in vars(scaler).items()
                                 if isinstance(value, (int, float)) and not isinstance(value, bool)} if scaler else {}}
        (directory / INDEX).write_text(json.dumps(index, indent=1))


def read_index(directory: Path) -> dict:
    path = directory / INDEX
    if not path.is_file():
        raise PortableStateError(f"{directory} holds no {INDEX}: not a portable training state")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise PortableStateError(f"{path}: format {index.get('format')!r}, this version reads format {FORMAT}")
    return index


def _check_fits(index: dict, module: torch.nn.Module, directory: Path) -> None:
    """The saved parameters are this model's, with the same shapes and the same ones training."""
    saved = index["parameters"]
    here = {name: (list(getattr(p, "ds_shape", p.shape)), p.requires_grad) for name, p in module.named_parameters()}
    missing, unexpected = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
    reshaped = [f"{name} {saved[name]['shape']} vs {here[name][0]}" for name in sorted(set(here) & set(saved))
                if saved[name]["shape"] != here[name][0]]
    switched = [name for name in sorted(set(here) & set(saved)) if saved[name]["trainable"] != here[name][1]]
    problems = []
    if missing:
        problems.append(f"no state for {len(missing)} parameters of this model ({', '.join(missing[:5])})")
    if unexpected:
        problems.append(f"{len(unexpected)} parameters this model lacks ({', '.join(unexpected[:5])})")
    if reshaped:
        problems.append(f"other shapes: {', '.join(reshaped[:5])}")
    if switched:
        problems.append(f"trained there but not here, or the reverse: {', '.join(switched[:5])}")
    if problems:
        raise PortableStateError(f"{directory} does not fit this model: {'; '.join(problems)}")


class _PartReader:
    """Part files read lazily, each by one rank (part i by rank i mod world) and each once (the
    parameters come in the order they were written), the tensors broadcast."""

    def __init__(self, directory: Path, index: dict, device: torch.device) -> None:
        self.directory, self.index, self.device = directory, index, device
        self.rank, self.world = rank_world()
        parts = sorted({entry["part"] for entry in index["parameters"].values()})
        self.reader = {part: number % self.world for number, part in enumerate(parts)}
        self.loaded: dict[str, dict] = {}

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        entry = self.index["parameters"][name]
        part, reader = entry["part"], self.reader[entry["part"]]
        keys = ("value", *MOMENTS) if entry["trainable"] else ("value",)
        if self.rank == reader:
            if part not in self.loaded:
                self.loaded = {part: torch.load(self.directory / part, map_location="cpu", weights_only=True)}
            found = self.loaded[part][name]
            tensors = {key: found[key] for key in keys}
        else:
            dtype = getattr(torch, entry["dtype"])
            tensors = {key: torch.empty(entry["shape"], dtype=dtype if key == "value" else torch.float32)
                       for key in keys}
        if self.world > 1:
            for key in keys:
                moved = tensors[key].to(self.device)
                dist.broadcast(moved, src=reader)
                tensors[key] = moved
        return {key: tensor.to(self.device) for key, tensor in tensors.items()}


def load_portable(engine, scheduler, directory: Path) -> dict:
    """Every rank, collectively: set the engine's module, master weights, optimizer state, scheduler
    and counters from ``directory``; returns its index (what wrote it)."""
    module = engine.module
    index = read_index(directory)
    _check_fits(index, module, directory)
    reader = _PartReader(directory, index, engine.device)
    steps = index["optimizer_steps"]
    prepare_optimizer_state(engine, steps)
    for name, parameter in module.named_parameters():
        tensors = reader.tensors(name)
        value = tensors["value"]
        if parameter.requires_grad:
            set_trainable(engine, name, parameter, tensors)
        set_module_weight(parameter, value)
    buffers = torch.load(directory / BUFFERS, map_location="cpu", weights_only=True)
    for name, buffer in module.named_buffers():
        if name in buffers:
            buffer.data.copy_(buffers[name].to(buffer.dtype))
    _set_schedule_position(scheduler, index["scheduler"])
    for key, value in index["counters"].items():
        setattr(engine, key, value)
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in index.get("loss_scaler", {}).items():
        if scaler is not None and hasattr(scaler, key):
            setattr(scaler, key, value)
    return index


def _set_schedule_position(scheduler, position: dict) -> None:
    """Move a freshly built LambdaLR-style schedule to the saved step, its learning rates with it."""
    scheduler.last_epoch, scheduler._step_count = position["last_epoch"], position["step_count"]
    rates = [base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def portable_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """One process, no DeepSpeed: every tensor of the model's ``state_dict`` from a portable state
    (master weights for trainable parameters), on CPU."""
    index = read_index(directory)
    state: dict[str, Any] = {}
    for part in sorted({entry["part"] for entry in index["parameters"].values()}):
        path = directory / part
        if not path.is_file():
            raise PortableStateError(f"{path} is missing")
        for name, tensors in torch.load(path, map_location="cpu", weights_only=True).items():
            state[name] = tensors["value"]
    missing = sorted(set(index["parameters"]) - set(state))
    if missing:
        raise PortableStateError(f"{directory}: no tensor for {', '.join(missing[:5])}")
    for alias, name in index["aliases"].items():
        state[alias] = state[name]
    state.update(torch.load(directory / BUFFERS, map_location="cpu", weights_only=True))
    return state
