"""Process-group setup from torchrun, from SLURM's srun, or for a lone process.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. A job started by
`srun` without torchrun has only SLURM's variables; we translate them, taking the first host of
the job's node list as the master, and export the torchrun names so that DeepSpeed and
`init_method="env://"` see one convention.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping, MutableMapping, NoReturn

import torch
import torch.distributed as dist

from backends.spec import Backend

logger = logging.getLogger(__name__)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list: ``gpu[01-03,07],login2`` -> gpu01 gpu02 gpu03 gpu07 login2."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            if "-" in part:
                start, end = part.split("-", 1)
                width = len(start)
                hosts.extend(f"{prefix}{number:0{width}d}" for number in range(int(start), int(end) + 1))
            else:
                hosts.append(f"{prefix}{part}")
    if not hosts:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return hosts


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """SLURM_TASKS_PER_NODE like ``4(x2),3``: how many tasks run on node ``node_id``."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts[node_id]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except KeyError:
        raise ValueError(f"launcher environment is incomplete: {key} is not set") from None
    except ValueError:
        raise ValueError(f"{key}={environ[key]!r} is not an integer") from None


def read_launch_env(environ: Mapping[str, str] | None = None) -> DistributedContext:
    """Rank layout from torchrun's variables, else SLURM's, else a single local process."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistributedContext(
            rank=_int(environ, "RANK"),
            world_size=_int(environ, "WORLD_SIZE"),
            local_rank=_int(environ, "LOCAL_RANK"),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", DEFAULT_PORT)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if "MASTER_ADDR" in environ:
            master = environ["MASTER_ADDR"]
        elif nodelist:
            master = expand_nodelist(nodelist)[0]
        else:
            raise ValueError("under srun without torchrun, MASTER_ADDR or SLURM_JOB_NODELIST must be set")
        if "SLURM_NTASKS_PER_NODE" in environ:
            local_world = _int(environ, "SLURM_NTASKS_PER_NODE")
        elif "SLURM_TASKS_PER_NODE" in environ:
            local_world = _tasks_on_node(environ["SLURM_TASKS_PER_NODE"], int(environ.get("SLURM_NODEID", 0)))
        else:
            local_world = _int(environ, "SLURM_NTASKS")
        # Same port on every rank without communication: derived from the job id.
        port = int(environ.get("MASTER_PORT", 20000 + int(environ.get("SLURM_JOB_ID", 0)) % 20000))
        return DistributedContext(
            rank=_int(environ, "SLURM_PROCID"),
            world_size=_int(environ, "SLURM_NTASKS"),
            local_rank=_int(environ, "SLURM_LOCALID"),
            local_world_size=local_world,
            master_addr=master,
            master_port=port,
            launcher="slurm",
        )
    return DistributedContext(0, 1, 0, 1, "127.0.0.1", free_port(), "single")


def init_distributed(
    backend: Backend, timeout_minutes: float = 30.0, environ: MutableMapping[str, str] | None = None
) -> DistributedContext:
    """Read the launcher's layout, apply the backend's environment, bind this rank's device and
    start the process group (also for a lone process, so DeepSpeed always finds one)."""
    environ = os.environ if environ is None else environ
    context = read_launch_env(environ)
    environ.update(
        RANK=str(context.rank),
        WORLD_SIZE=str(context.world_size),
        LOCAL_RANK=str(context.local_rank),
        LOCAL_WORLD_SIZE=str(context.local_world_size),
        MASTER_ADDR=context.master_addr,
        MASTER_PORT=str(context.master_port),
    )
    applied = backend.apply_env_defaults(environ)
    if applied and context.is_main:
        logger.info("environment defaults set for %s: %s", backend.name, applied)
    backend.set_device(context.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend.dist_backend,
            init_method="env://",
            rank=context.rank,
            world_size=context.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    logger.info("rank %d/%d (local %d) on %s via %s", context.rank, context.world_size, context.local_rank,
                backend.device(context.local_rank), context.launcher)
    return context


# Collectives. Each is a no-op (or the identity) for a lone process or before the process group
# starts, so callers never test ``is_initialized() and world_size > 1`` themselves.

def is_distributed() -> bool:
    """More than one rank is running: collectives are needed."""
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of small per-rank numbers (counts, flags) in one collective."""
    if not is_distributed():
        return [float(v) for v in values]
    total = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.tolist()


def max_across_ranks(value: int, device: torch.device) -> int:
    """The largest of one integer per rank."""
    if not is_distributed():
        return value
    most = torch.tensor([value], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most)


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank; what the others pass is ignored."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def decided_on_rank0(decide: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> Any:
    """``decide()`` run on rank 0 only (work worth doing once: reading every file of a checkpoint or
    a dataset), its result on every rank; one of ``errors`` raised there is raised on every rank, so
    no rank waits in a collective for one that has left."""
    outcome = None
    if not is_distributed() or dist.get_rank() == 0:
        try:
            outcome = ("ok", decide())
        except errors as error:
            outcome = ("error", error)
    kind, payload = broadcast_from_rank0(outcome)
    if kind == "error":
        raise payload
    return payload


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int = 0) -> NoReturn:
    """Tear the process group down and leave without interpreter finalisation.

    After DeepSpeed has run over gloo, a native thread can abort the process while Python shuts
    down ("terminate called without an active exception", exit -6), seen here in about one run
    in ten under CPU load, after every result was written. torchrun and cluster schedulers would
    report such a finished job as failed. Call this last, once outputs are written and closed.
    """
    teardown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
