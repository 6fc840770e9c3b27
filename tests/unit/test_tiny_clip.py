"""The demo's starting model: CLIP pretraining labels (which patches a caption names), the recipe
rules for a starting model written by the synth stage, and a short pretraining that leaves the
towers changed and the rest of the model at its start."""

import numpy as np
import pytest
import torch

from pipeline.data.synthetic import RADIUS, Shape
from pipeline.model.tiny import tiny_config_for, tiny_tokenizer
from pipeline.model.tiny_clip import CLIP_PARTS, captions, patch_cover, pretrain_clip
from pipeline.recipe import RecipeError, parse_recipe, validate
from ppllava import PPLLaVAForConditionalGeneration

pytestmark = pytest.mark.unit
SIZE, PATCH = 48, 8


def test_a_shape_covers_the_patches_under_it_and_a_later_shape_hides_it():
    square = Shape("square", "red", 12, 12)       # a 2R = 17 px square centred on patch (1, 1)
    cover = patch_cover([square], SIZE, PATCH)[0].reshape(6, 6)
    assert cover[1, 1] and cover[0, 0] and cover[2, 2] and not cover[3:].any() and not cover[:, 3:].any()
    hidden = patch_cover([square, Shape("circle", "blue", 12, 12)], SIZE, PATCH)
    assert not hidden[0, 7] and hidden[1, 7]      # patch (1, 1): under the circle drawn later
    assert hidden[0].sum() < cover.sum()          # the square's corners still show
    assert SIZE * RADIUS > PATCH                  # shapes span patches, so windows can mix them


def test_captions_name_each_kind_alone_as_the_question_asks_and_with_each_colour():
    texts, names = captions()
    assert len(texts) == len(names) == 3 * (2 + 6)
    assert names[texts.index("What colour is the triangle?")] == ("triangle", None)
    assert names[texts.index("a red circle")] == ("circle", "red")


def recipe(tmp_path, steps: int) -> dict:
    return {"name": "t", "run_dir": str(tmp_path / "run"), "backend": "cpu",
            "synth": {"clip_pretrain_steps": steps}, "shard": {},
            "model": {"source": "pretrained", "pretrained_path": str(tmp_path / "run" / "synth" / "model")},
            "data": {"cards": [str(tmp_path / "run" / "synth" / "cards" / "synthetic_video.yaml")]},
            "sft": {"global_batch_size": 8, "micro_batch_size": 2}}


def test_a_starting_model_under_the_synth_directory_needs_the_synth_stage_to_write_it(tmp_path):
    validate(parse_recipe(recipe(tmp_path, 10), source="r.yaml"))  # not there yet: the synth stage writes it
    with pytest.raises(RecipeError, match="synth.clip_pretrain_steps is 0, so nothing writes a model there"):
        validate(parse_recipe(recipe(tmp_path, 0), source="r.yaml"))
    with pytest.raises(RecipeError, match="synth.clip_pretrain_steps: must be >= 0"):
        validate(parse_recipe(recipe(tmp_path, -1), source="r.yaml"))


def test_pretraining_trains_the_clip_towers_only_and_reports_the_relevance_on_the_asked_shape():
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = PPLLaVAForConditionalGeneration._from_config(tiny_config_for(tokenizer))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = pretrain_clip(model, tokenizer, steps=3, seed=0)
    assert set(report) == {"clip loss", "relevance on the asked shape"}
    assert np.isfinite(report["clip loss"]) and 0 < report["relevance on the asked shape"] < 1
    for name, parameter in model.named_parameters():
        if name.split(".")[0] not in CLIP_PARTS:
            assert torch.equal(parameter, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.split(".")[0] in CLIP_PARTS)
