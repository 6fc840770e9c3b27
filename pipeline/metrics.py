"""Training metrics: one JSON line per logged step (metrics.jsonl) and TensorBoard event files.

Rank 0 writes; other ranks hold a logger that does nothing, so the loop never branches on rank.
A resumed run appends to metrics.jsonl after dropping lines past the checkpoint's step (they
belong to steps the resumed run repeats), so the file always reads as one run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from pipeline.atomic import write_text_atomically
from pipeline.layout import METRICS

logger = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, directory: Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = directory / METRICS
        self._tensorboard = None
        if not enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [record for record in read_metrics(self.path) if record.get("step", 0) <= resume_step]
            write_text_atomically(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(directory / "tensorboard"), purge_step=resume_step + 1)
        except ImportError as error:  # tensorboard is a dependency; say so plainly if it went missing
            logger.warning("TensorBoard logging is off (%s); metrics.jsonl is still written", error)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: Path) -> list[dict]:
    """Every complete line; a partial last line (a process killed while writing it) is dropped."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if line.strip():
                logger.warning("%s:%d is not a complete JSON line (an interrupted write?); ignored", path, number)
    return records
