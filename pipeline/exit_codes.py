"""The pipeline's exit codes: what `python -m pipeline ...` returns, what the local launcher and
the SLURM batch script act on (docs/cluster.md)."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1        # a stage stopped for a reason its message explains, or an unexpected error
    BAD_INPUT = 2     # a bad recipe, card, annotation, checkpoint or command line
    REQUEUE = 3       # stopped by SIGTERM / SIGUSR1 after a checkpoint: run it again to continue
