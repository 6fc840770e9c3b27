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

Saving assembles every parameter's full tensors with DeepSpeed's own collectives (``safe_get_full_*``
for ZeRO 1-3 and its bf16 optimizer, a gather for frozen ZeRO-3 parameters), so every rank walks the
parameters in the same order. Loading reads part p on rank p mod M only and broadcasts each tensor,
so the file system serves every byte once whatever M is; each rank then keeps its own partition
(``safe_set_full_*``), and the module's low-precision copy is set from the master weight, as
DeepSpeed's own step would have left it. Nothing here depends on the device type: a checkpoint of
a CUDA run loads on Ascend (the tensors are saved on CPU).

Unverified here: DeepSpeed's Ascend build and ZeRO's CPU offload (same DeepSpeed calls, not run on
this project's CPU test machines); ZeRO 0-3 in fp32 and bf16 are tested on CPU.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

FORMAT = 1
INDEX = "index.json"
BUFFERS = "buffers.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's (torch's, DeepSpeed's fused and CPU Adam alike)
COUNTERS = ("global_steps", "global_samples", "skipped_steps")


class PortableStateError(RuntimeError):
    """A portable state that does not fit this model or optimizer (the message names what)."""


def part_name(writer: int) -> str:
    return f"part_{writer:05d}.pt"


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _tensor_fragment():
    return importlib.import_module("deepspeed.utils")


def _gathered(parameters: list[torch.nn.Parameter], modifier_rank: int | None = None):
    return importlib.import_module("deepspeed").zero.GatheredParameters(parameters, modifier_rank=modifier_rank)


def _partitioned(parameter: torch.nn.Parameter) -> bool:
    """A ZeRO-3 parameter: each rank holds a slice, the module a placeholder."""
    return hasattr(parameter, "ds_id")


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO / bf16 wrapper (or the optimizer itself)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _master_slot(wrapper, parameter: torch.nn.Parameter) -> tuple[torch.Tensor, int] | None:
    """(fp32 master tensor, offset of the parameter in it) under DeepSpeed's unpartitioned
    mixed-precision optimizers (ZeRO-0 in bf16 or fp16): the fused one keeps one flat master per
    group, the parameters in order; the unfused one (taken where the fused kernel is missing) a
    master per parameter."""
    lows = getattr(wrapper, "fp16_groups", None)
    masters = getattr(wrapper, "fp32_groups_flat", None) or getattr(wrapper, "fp32_groups", None)
    if lows is None or masters is None:
        return None
    for group, master in zip(lows, masters):
        offset = 0
        for index, member in enumerate(group):
            if member is parameter:
                return (master, offset) if torch.is_tensor(master) else (master[index], 0)
            offset += member.numel()
    return None


def _whole_master(engine, name: str, parameter: torch.nn.Parameter) -> dict[str, torch.Tensor] | None:
    """The master weight and moments of a trainable parameter that this process holds whole
    (ZeRO-0), as views to read or write: {"value", "exp_avg", "exp_avg_sq"}. None where DeepSpeed
    partitions them (ZeRO 1-3, its bf16 optimizer): ``safe_get/set_full_*`` assemble those."""
    if _partitioned(parameter) or hasattr(parameter, "_hp_mapping"):
        return None
    optimizer = _base_optimizer(engine)
    slot = _master_slot(engine.optimizer, parameter)
    if slot is not None:
        master, offset = slot

        def view(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(-1).narrow(0, offset, parameter.numel()).view_as(parameter)

        return {"value": view(master.data), **{key: view(optimizer.state[master][key]) for key in MOMENTS}}
    if any(parameter is member for group in optimizer.param_groups for member in group["params"]):
        # ZeRO-0 in fp32: no master copy, the parameter is its own and the state is keyed by it
        return {"value": parameter.data, **{key: optimizer.state[parameter][key] for key in MOMENTS}}
    raise PortableStateError(f"{type(engine.optimizer).__name__} keeps the master weight of {name} where this "
                             f"module cannot find it: use ZeRO 1-3, or ZeRO-0 in fp32 or bf16")


def _full_trainable(engine, name: str, parameter: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """Collective: the whole fp32 master weight and Adam moments of a trainable parameter."""
    whole = _whole_master(engine, name, parameter)
    if whole is not None:
        return {key: tensor.detach().float() for key, tensor in whole.items()}
    fragment = _tensor_fragment()
    return {"value": fragment.safe_get_full_fp32_param(parameter),
            **{key: fragment.safe_get_full_optimizer_state(parameter, key) for key in MOMENTS}}


def _set_trainable(engine, name: str, parameter: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
    """Collective: this process's part of the master weight and moments from the whole tensors."""
    whole = _whole_master(engine, name, parameter)
    if whole is not None:
        with torch.no_grad():  # the masters are leaves that require grad
            for key, target in whole.items():
                target.copy_(tensors[key])
        return
    if _partitioned(parameter):
        for key in ("value", *MOMENTS):
            _set_zero3_partition(parameter, tensors[key].float(), None if key == "value" else key)
        return
    fragment = _tensor_fragment()
    fragment.safe_set_full_fp32_param(parameter, tensors["value"].float())
    for key in MOMENTS:
        fragment.safe_set_full_optimizer_state(parameter, tensors[key].float(), key)


def _set_zero3_partition(parameter: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """This rank's slice of a ZeRO-3 parameter's master weight (``key`` None) or optimizer state.

    DeepSpeed's own ``safe_set_full_*`` (0.19) cuts the whole tensor into equal slices without the
    padding its partitions carry, so the last rank's slice runs past the end whenever the world
    size does not divide the parameter's size (a 4096-element bias on 24 ranks). The same
    DeepSpeed accessors are used here, with the tail padded: its padding holds zeros."""
    optimizer = parameter._z3_optimizer
    partition, group = optimizer._get_fp32_opt_state_partition(parameter, release_swap_buffers=False,
                                                                 optim_state_key=key)
    start = partition.numel() * optimizer._get_param_partition_rank(parameter)
    flat = value.flatten()
    count = max(0, min(partition.numel(), flat.numel() - start))
    partition.data.zero_()
    partition.data[:count].copy_(flat[start:start + count])
    if optimizer._swappable_optimizer_subgroup(group):
        optimizer._optimizer_states_and_gradient_swap_out(group)


def _full_frozen(parameter: torch.nn.Parameter) -> torch.Tensor:
    if _partitioned(parameter):
        with _gathered([parameter]):
            return parameter.detach().clone()
    return parameter.detach()


def optimizer_steps(engine) -> int:
    """The optimizer's step count (AdamW's bias correction depends on it)."""
    optimizer = _base_optimizer(engine)
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    for group in optimizer.param_groups:
        if "step" in group:
            return int(group["step"])
    return 0


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """torch's AdamW keeps ``step`` as a tensor per parameter; DeepSpeed's fused and CPU Adam as an
    int (the fused one per group)."""
    return type(optimizer).__module__.startswith("torch.optim")


def _prepare_optimizer_state(engine, steps: int | None = None) -> None:
    """Give the optimizer the state it creates lazily at its first step (a freshly built engine has
    none, nor has one whose first steps were all skipped, e.g. by fp16 overflows): zero moments,
    at step count ``steps`` (None: the count it has, else 0); and let DeepSpeed map every
    parameter's slice of it."""
    optimizer, wrapper = _base_optimizer(engine), engine.optimizer
    as_tensor = _torch_optimizer(optimizer)
    # ZeRO-3 hands its flat partitions to the optimizer one sub-group at a time (its groups are
    # empty between steps); the others leave them in the groups.
    flats = getattr(wrapper, "fp32_partitioned_groups_flat", None) or [
        flat for group in optimizer.param_groups for flat in group["params"]]
    if steps is None:
        steps = optimizer_steps(engine)
    for flat in flats:
        state = optimizer.state[flat]
        for key in MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(flat, dtype=torch.float32)
        state["step"] = torch.tensor(float(steps)) if as_tensor else steps
    for group in optimizer.param_groups:
        if not as_tensor:
            group["step"] = steps
    _link_optimizer_state(engine)


def _link_optimizer_state(engine) -> None:
    """Let ZeRO 1-2 and the bf16 optimizer map each parameter's slice of the optimizer state
    again: they do it once, after their first step, and a state created or replaced since is
    not seen by ``safe_get/set_full_optimizer_state`` otherwise."""
    wrapper = engine.optimizer
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


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
    rank, world = _rank_world()
    module = engine.module
    _prepare_optimizer_state(engine)
    mine: dict[str, dict[str, torch.Tensor]] = {}
    entries = {}
    writers = _writers(module, world)
    for name, parameter in module.named_parameters():
        writer = writers[name]
        trainable = parameter.requires_grad
        if trainable:
            tensors = _full_trainable(engine, name, parameter)
        else:
            tensors = {"value": _full_frozen(parameter)}
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
        self.rank, self.world = _rank_world()
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
    _prepare_optimizer_state(engine, steps)
    for name, parameter in module.named_parameters():
        tensors = reader.tensors(name)
        value = tensors["value"]
        if parameter.requires_grad:
            _set_trainable(engine, name, parameter, tensors)
        _set_module_weight(parameter, value)
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


def _set_module_weight(parameter: torch.nn.Parameter, value: torch.Tensor) -> None:
    """The module's copy (in the training precision) from the full value, as DeepSpeed's step sets it."""
    with torch.no_grad():
        if _partitioned(parameter):
            with _gathered([parameter], modifier_rank=0):
                if _rank_world()[0] == 0:
                    parameter.data.copy_(value.to(parameter.dtype))
        else:
            parameter.data.copy_(value.to(parameter.device, parameter.dtype))


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
