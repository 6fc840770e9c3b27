"""The backend row: everything that differs between CPU, CUDA GPUs and Ascend NPUs.

A backend is data plus a few small functions, not a class hierarchy: the training code asks the
row for a device, a process-group backend, a dtype, environment defaults, and never branches on
the device itself. Rows live in cpu.py, cuda.py and npu.py.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, MutableMapping

import torch

logger = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here (the message says why)."""


def _no_setup() -> None:
    return None


@dataclass(frozen=True)
class Backend:
    """One device family.

    probe: returns None when the backend is usable in this process, else the reason it is not.
    device_module: the torch module with set_device / manual_seed_all / RNG state / memory functions
        (``torch.cuda``, ``torch.npu``); None for CPU.
    bf16_check: ``local_rank -> (supported, device name)``.
    process_setup: one-time settings applied after selection (NPU: jit compile off).
    inference_precision: the precision eval and chat load a model in.
    kernels: the implementation of each LLM op on this row (backends/kernels.py), ``model.kernels: auto``.
    exclusive_env: groups of variables of which at most one may be set (the runtime refuses two);
        a default of ours is not applied where another of its group is set.
    """

    name: str
    device_type: str
    dist_backend: str
    visible_devices_env: str | None
    deepspeed_accelerator: str
    attn_implementation: str
    env_defaults: Mapping[str, str]
    probe: Callable[[], str | None]
    device_module: Callable[[], Any | None]
    bf16_check: Callable[[int], tuple[bool, str]]
    process_setup: Callable[[], None] = field(default=_no_setup)
    inference_precision: str = "bf16"  # eval and chat (training takes the recipe's precision)
    kernels: Mapping[str, str] = field(default_factory=lambda: {"attention": "sdpa", "rms_norm": "reference"})
    exclusive_env: tuple[tuple[str, ...], ...] = ()

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device(self.device_type) if self.device_type == "cpu" else torch.device(self.device_type, local_rank)

    def set_device(self, local_rank: int) -> None:
        module = self.device_module()
        if module is not None:
            module.set_device(local_rank)

    def manual_seed(self, seed: int) -> None:
        """Seed torch's CPU generator and every device generator of this backend."""
        torch.manual_seed(seed)
        module = self.device_module()
        if module is not None:
            module.manual_seed_all(seed)

    def memory_stats(self) -> dict[str, float]:
        """GiB: allocated / reserved / peak on the device; on CPU the process's peak RSS."""
        module = self.device_module()
        if module is None:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return {"peak_rss_gib": peak_kib / 2**20}
        gib = 2**30
        return {
            "allocated_gib": module.memory_allocated() / gib,
            "reserved_gib": module.memory_reserved() / gib,
            "peak_allocated_gib": module.max_memory_allocated() / gib,
        }

    def env_conflicts(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """One line per group of ``exclusive_env`` of which more than one variable is set."""
        environ = os.environ if environ is None else environ
        return [f"{' and '.join(f'{name}={environ[name]}' for name in group if name in environ)} are both set; "
                f"the {self.name} runtime refuses to start with more than one of {', '.join(group)}: keep one"
                for group in self.exclusive_env if sum(name in environ for name in group) > 1]

    def apply_env_defaults(self, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
        """Set our defaults where the user has not; returns what was set. DS_ACCELERATOR is
        always made explicit, and a user value naming another accelerator is an error, as are two
        variables of one ``exclusive_env`` group."""
        environ = os.environ if environ is None else environ
        conflicts = self.env_conflicts(environ)
        if conflicts:
            raise BackendUnavailable("; ".join(conflicts))
        chosen = environ.get("DS_ACCELERATOR")
        if chosen is not None and chosen != self.deepspeed_accelerator:
            raise BackendUnavailable(
                f"DS_ACCELERATOR={chosen} is set, but the selected backend is {self.name!r}, whose DeepSpeed "
                f"accelerator is {self.deepspeed_accelerator!r}; unset it or select the matching backend"
            )
        applied = {}
        taken = {name for group in self.exclusive_env for name in group
                 if any(other in environ for other in group if other != name)}
        for key, value in {**self.env_defaults, "DS_ACCELERATOR": self.deepspeed_accelerator}.items():
            if key not in environ and key not in taken:
                environ[key] = value
                applied[key] = value
        return applied

    def resolve_dtype(self, precision: str, local_rank: int = 0) -> torch.dtype:
        """The training dtype for ``precision``; bf16 on a device without it falls back to fp16."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if precision == "bf16":
            supported, device_name = self.bf16_check(local_rank)
            if not supported:
                logger.warning("bf16 is not supported on %s (%s backend); training in fp16 instead", device_name, self.name)
                return torch.float16
        return PRECISIONS[precision]
