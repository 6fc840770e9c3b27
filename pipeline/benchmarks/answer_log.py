"""Benchmark answers written as they come, so that an eval stopped by a signal, killed, or failed in
a later benchmark re-asks only the questions it has no answer to.

    run_dir/eval/partial/FINGERPRINT                 the eval stage's fingerprint the answers are for
    run_dir/eval/partial/<label>.rank_00000.jsonl    one line per answered question, appended and
                                                     flushed to disk after every batch by the rank
                                                     that asked it

Answers are kept only for the same fingerprint (the same model files, question files and eval
section): a directory left by other settings has its partial answers removed when the stage
starts. Failed questions (a missing or undecodable video) are not kept: a re-run tries them
again, so a video put back since is answered. Rank 0 reads the answers and every rank receives the
same list, so every rank asks the same remaining questions. Once results.json is written the
partial folder is removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from backends.distributed import broadcast_from_rank0
from pipeline.atomic import write_text_atomically

logger = logging.getLogger(__name__)

PARTIAL = "partial"
FINGERPRINT = "FINGERPRINT"


def start(directory: Path, fingerprint: str, is_main: bool) -> None:
    """Rank 0: keep the partial answers written for ``fingerprint``, remove any others."""
    if not is_main:
        return
    folder = directory / PARTIAL
    marker = folder / FINGERPRINT
    if folder.is_dir() and (not marker.is_file() or marker.read_text().strip() != fingerprint):
        logger.warning("eval: removing the partial answers in %s: they were written with other settings, model or "
                       "questions", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_text_atomically(marker, fingerprint)


def logged_answers(directory: Path, label: str, is_main: bool) -> dict[str, dict]:
    """Every rank: the answered questions of benchmark ``label`` (key -> answer line) as rank 0
    reads them (after ``start``, so the folder is there for every rank to append to). A line cut
    short by a kill (the last of its file) is left out: that question is asked again."""
    answers: dict[str, dict] | None = None
    if is_main:
        answers = {}
        for path in sorted((directory / PARTIAL).glob(f"{label}.rank_*.jsonl")):
            for text in path.read_text(encoding="utf-8").splitlines():
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    continue
                answers[line["key"]] = line
    return broadcast_from_rank0(answers)


class AnswerLog:
    """This rank's answers to one benchmark, appended as they come."""

    def __init__(self, directory: Path, label: str, rank: int) -> None:
        self.path = directory / PARTIAL / f"{label}.rank_{rank:05d}.jsonl"

    def append(self, lines: list[dict]) -> None:
        kept = [line for line in lines if "failed" not in line]
        if not kept:
            return
        with self.path.open("a", encoding="utf-8") as log:
            log.write("".join(json.dumps(line) + "\n" for line in kept))
            log.flush()
            os.fsync(log.fileno())


def finish(directory: Path) -> None:
    """Rank 0, once the results are written: the partial answers are no longer needed."""
    shutil.rmtree(directory / PARTIAL, ignore_errors=True)
