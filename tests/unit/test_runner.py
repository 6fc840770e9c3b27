"""The runner's decisions: run, skip when the fingerprint matches, re-run a changed stage and every
stage after it, refuse --stages whose earlier stages are not done."""

import json
import types

import pytest

from pipeline import runner
from pipeline.recipe import RecipeError, parse_recipe

pytestmark = pytest.mark.unit


@pytest.fixture
def recipe(tmp_path):
    return parse_recipe({"name": "t", "run_dir": str(tmp_path / "run"), "synth": {}, "shard": {}, "sft": {}})


@pytest.fixture
def stage_inputs(monkeypatch):
    """Each stage's inputs are this dict's entry (stand-ins for the real stages' recipe keys)."""
    values = {"synth": {"x": 1}, "shard": {"x": 2}, "sft": {"x": 3}}
    monkeypatch.setattr(runner, "stage_module", lambda name: types.SimpleNamespace(inputs=lambda r, w: values[name]))
    return values


def decide_all(recipe, only=None) -> dict[str, str]:
    actions, upstream, changed = {}, "", False
    for stage in recipe.stages:
        fingerprint, inputs, action = runner.decide(recipe, stage, 1, upstream, changed, only)
        if action == "stop":
            break
        actions[stage] = action
        upstream, changed = fingerprint, changed or action in ("run", "rerun")
        if action in ("run", "rerun"):  # what run_recipe records when the stage finishes
            recipe.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            (recipe.stage_dir(stage) / runner.COMPLETE).write_text(json.dumps({"fingerprint": fingerprint}))
    return actions


def test_stages_run_once_then_skip(recipe, stage_inputs):
    assert decide_all(recipe) == {"synth": "run", "shard": "run", "sft": "run"}
    assert decide_all(recipe) == {"synth": "skip", "shard": "skip", "sft": "skip"}


def test_a_changed_input_reruns_its_stage_and_the_stages_after_it(recipe, stage_inputs):
    decide_all(recipe)
    stage_inputs["shard"]["x"] = 20
    assert decide_all(recipe) == {"synth": "skip", "shard": "rerun", "sft": "rerun"}
    assert decide_all(recipe) == {"synth": "skip", "shard": "skip", "sft": "skip"}
    stage_inputs["sft"]["x"] = 30
    assert decide_all(recipe) == {"synth": "skip", "shard": "skip", "sft": "rerun"}


def test_stage_selection(recipe, stage_inputs):
    with pytest.raises(RecipeError, match="stage synth has not completed"):
        decide_all(recipe, only=["sft"])
    assert decide_all(recipe, only=["synth"]) == {"synth": "run"}
    assert decide_all(recipe, only=["shard", "sft"]) == {"synth": "upstream", "shard": "run", "sft": "run"}
    with pytest.raises(RecipeError, match="--stages names dpo"):
        runner.check_stage_selection(recipe, ["dpo"])


def test_an_unfinished_stage_after_a_rerun_stage_is_set_aside_not_resumed(recipe, stage_inputs):
    decide_all(recipe)
    (recipe.stage_dir("sft") / runner.COMPLETE).unlink()  # sft was stopped mid-way: checkpoints, no COMPLETE
    assert decide_all(recipe) == {"synth": "skip", "shard": "skip", "sft": "run"}  # resumable
    (recipe.stage_dir("sft") / runner.COMPLETE).unlink()
    stage_inputs["shard"]["x"] = 21  # the shards are rebuilt: the unfinished sft trained on the old ones
    assert decide_all(recipe) == {"synth": "skip", "shard": "rerun", "sft": "rerun"}
