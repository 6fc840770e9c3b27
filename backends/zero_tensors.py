"""Whole tensors of a DeepSpeed engine's parameters and optimizer state, whatever its ZeRO stage and
precision: what ``portable_state`` saves and loads, one parameter at a time.

    full_trainable / set_trainable   a trainable parameter's fp32 master weight and AdamW moments,
                                     assembled from (or cut into) this rank's partition
    full_frozen / set_module_weight  a parameter as the module holds it (gathered under ZeRO-3)
    prepare_optimizer_state          the optimizer state DeepSpeed creates lazily at its first step
    optimizer_steps                  the optimizer's step count

ZeRO 1-3 and DeepSpeed's bf16 optimizer go through its own collectives (``safe_get_full_*`` /
``safe_set_full_*``; ZeRO-3's setter with the padding its partitions carry), so every rank must
walk the parameters in the same order. ZeRO-0 keeps its masters whole: they are read and written
in place. DeepSpeed is imported lazily, where the engine is already built.
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's (torch's, DeepSpeed's fused and CPU Adam alike)


class PortableStateError(RuntimeError):
    """A portable state that does not fit this model or optimizer (the message names what)."""


def rank_world() -> tuple[int, int]:
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


def full_trainable(engine, name: str, parameter: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """Collective: the whole fp32 master weight and Adam moments of a trainable parameter."""
    whole = _whole_master(engine, name, parameter)
    if whole is not None:
        return {key: tensor.detach().float() for key, tensor in whole.items()}
    fragment = _tensor_fragment()
    return {"value": fragment.safe_get_full_fp32_param(parameter),
            **{key: fragment.safe_get_full_optimizer_state(parameter, key) for key in MOMENTS}}


def set_trainable(engine, name: str, parameter: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
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


def full_frozen(parameter: torch.nn.Parameter) -> torch.Tensor:
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


def prepare_optimizer_state(engine, steps: int | None = None) -> None:
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


def set_module_weight(parameter: torch.nn.Parameter, value: torch.Tensor) -> None:
    """The module's copy (in the training precision) from the full value, as DeepSpeed's step sets it."""
    with torch.no_grad():
        if _partitioned(parameter):
            with _gathered([parameter], modifier_rank=0):
                if rank_world()[0] == 0:
                    parameter.data.copy_(value.to(parameter.dtype))
        else:
            parameter.data.copy_(value.to(parameter.device, parameter.dtype))
