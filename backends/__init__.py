"""Device backends: one row per device family, chosen once, passed to everything that needs it.

    backend = backends.select("auto")          # npu -> cuda -> cpu, says what it chose and why
    context = backends.init_distributed(backend)
    ...
    backends.teardown()

Imports nothing from `ppllava`, `pipeline` or `stages`.
"""

from __future__ import annotations

import logging

from backends.cpu import CPU
from backends.cuda import CUDA
from backends.distributed import DistributedContext, exit_process, init_distributed, read_launch_env, teardown
from backends.npu import NPU
from backends.spec import PRECISIONS, Backend, BackendUnavailable

logger = logging.getLogger(__name__)

BACKENDS: dict[str, Backend] = {"npu": NPU, "cuda": CUDA, "cpu": CPU}
AUTO_ORDER = ("npu", "cuda", "cpu")


def select(name: str = "auto", backends: dict[str, Backend] | None = None) -> Backend:
    """The backend called ``name``, or with "auto" the first usable of npu, cuda, cpu.

    Asking by name for a backend that cannot run here raises :class:`BackendUnavailable` with
    the reason (never a silent CPU run). The choice and the reasons others were passed over are
    logged. The chosen backend's one-time process setup runs before it is returned.
    """
    table = BACKENDS if backends is None else backends
    if name != "auto":
        if name not in table:
            raise ValueError(f"unknown backend {name!r}; expected one of: auto, {', '.join(table)}")
        reason = table[name].probe()
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} was requested but cannot run here: {reason}")
        logger.info("backend %s selected (requested by name)", name)
        chosen = table[name]
    else:
        passed_over = []
        chosen = None
        for candidate in AUTO_ORDER:
            reason = table[candidate].probe()
            if reason is None:
                chosen = table[candidate]
                break
            passed_over.append(f"{candidate}: {reason}")
        if chosen is None:
            raise BackendUnavailable("no backend can run here: " + "; ".join(passed_over))
        logger.info("backend %s selected automatically%s", chosen.name,
                    f" (passed over {'; '.join(passed_over)})" if passed_over else "")
    chosen.process_setup()
    return chosen


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "Backend",
    "BackendUnavailable",
    "CPU",
    "CUDA",
    "DistributedContext",
    "NPU",
    "PRECISIONS",
    "exit_process",
    "init_distributed",
    "read_launch_env",
    "select",
    "teardown",
]
