"""Start a recipe's processes on this node when `run` was not started by torchrun or srun.

    python -m pipeline run recipe.yaml      (cluster.procs_per_node: 2)
        -> 2 x `python -m pipeline run recipe.yaml ...` with RANK / WORLD_SIZE / LOCAL_RANK /
           MASTER_ADDR / MASTER_PORT set, as torchrun would set them

Why not torch's elastic launcher: on SIGTERM it gives workers 30 s before killing them (too short
for a 7B checkpoint), it does not forward SIGUSR1, and it hides the workers' exit codes, while a
pre-empted run must checkpoint and exit with the "requeue me" code. This launcher forwards
SIGTERM / SIGUSR1 / SIGINT to every worker and waits for them; if one worker fails, the others
are stopped (SIGTERM, then SIGKILL after a grace period) so the job never hangs in a collective.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from backends.distributed import free_port
from pipeline.exit_codes import ExitCode

logger = logging.getLogger(__name__)

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FAILURE_GRACE_SECONDS = 20.0


def launched_by_a_launcher(environ=os.environ) -> bool:
    return ("RANK" in environ and "WORLD_SIZE" in environ) or "SLURM_PROCID" in environ


def launch_local(procs: int, argv: list[str]) -> int:
    """Run ``python -m pipeline *argv`` as ``procs`` ranks; returns the job's exit code."""
    port = free_port()
    workers = []
    for rank in range(procs):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(procs), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(procs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        workers.append(subprocess.Popen([sys.executable, "-m", "pipeline", *argv], env=env))
    logger.info("started %d local processes (pids %s)", procs, [w.pid for w in workers])

    def forward(signum, frame):
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while True:
            codes = [worker.poll() for worker in workers]
            failed = [code for code in codes if code not in (None, ExitCode.OK, ExitCode.REQUEUE)]
            if failed:
                _stop(workers)
                logger.error("a process exited with %d; stopped the others", failed[0])
                return failed[0] if failed[0] > 0 else 128 - failed[0]  # killed by signal N: 128 + N, as a shell says
            if all(code is not None for code in codes):
                return ExitCode.REQUEUE if ExitCode.REQUEUE in codes else ExitCode.OK
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    deadline = time.monotonic() + FAILURE_GRACE_SECONDS
    for worker in workers:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
