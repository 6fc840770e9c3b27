"""Merging every rank's loader state into the one a checkpoint holds (any layout loads it)."""

import pytest

from pipeline.data.loader import merge_loader_states
from pipeline.data.shard_files import LoaderError


def rank_state(used: int, bad: list[str], step: int = 5) -> dict:
    # after a resume that carried 100 used samples and the refused keys "a", "b" to every rank
    return {"step": step, "used": used, "carried_used": 100, "bad": bad, "seed": 1, "virtual_streams": 64}


def test_every_refused_key_counts_once_and_the_carried_samples_once():
    merged = merge_loader_states([rank_state(10, ["a", "b", "c"]), rank_state(12, ["a", "b", "d"])])
    assert merged == {"step": 5, "used": 122, "bad": ["a", "b", "c", "d"], "seed": 1, "virtual_streams": 64}


def test_ranks_at_different_steps_are_refused():
    with pytest.raises(LoaderError, match="different steps \\[5, 6\\]"):
        merge_loader_states([rank_state(1, []), rank_state(1, [], step=6)])
