"""The shipped cluster recipes at the paper's settings: a 32-frame 336px video with a multi-turn
conversation fits SFT's context, and a long DPO pair fits DPO's; only the width and depth of the
model are shrunk (its vision geometry is CLIP ViT-L/14-336's: 24 x 24 patches per frame)."""

import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_config_for, tiny_tokenizer
from pipeline.data.collate import ProcessorSettings, SampleProcessor, SampleTooLong
from pipeline.data.pairs import PairProcessor
from pipeline.data.records import IMAGE_PLACEHOLDER, PreferencePair, Sample, Turn
from pipeline.data.synthetic import encode_mp4
from pipeline.data.templates import IGNORE_INDEX
from pipeline.recipe import load_recipe

pytestmark = pytest.mark.integration

SENTENCE = "The man in the red jacket walks to the door, opens it slowly and looks outside at the rain. "


@pytest.fixture(scope="module")
def paper_geometry():
    tokenizer = tiny_tokenizer()
    config = tiny_config_for(tokenizer, vision_config={"image_size": 336, "patch_size": 14}, num_frames=32,
                             image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    # A 4-second 30 fps clip at 336 px: more frames than sampled, like every real video.
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(120, 336, 336, 3), dtype=np.uint8)
    return config, tokenizer, encode_mp4(frames, fps=30)


def recipe_settings(name: str, training: bool) -> ProcessorSettings:
    """The settings the recipe's SFT (training) or DPO (not training) stage prepares samples with."""
    recipe = load_recipe(REPO_ROOT / "recipes" / name, [])
    template = recipe.data.template if training else (recipe.dpo.template or recipe.data.template)
    return ProcessorSettings(template=template, max_length=recipe.data.max_length, training=training)


def multi_turn_video(rounds: int = 3) -> Sample:
    turns = [Turn("user", f"{IMAGE_PLACEHOLDER}\nDescribe what happens in the video in detail.")]
    turns.append(Turn("assistant", SENTENCE * 6))
    for index in range(1, rounds):
        turns += [Turn("user", f"What happens after step {index}? Explain it carefully."), Turn("assistant", SENTENCE * 4)]
    return Sample("paper/video_0", "video", ["clip.mp4"], turns)


@pytest.mark.parametrize("recipe", ["sft_gpu.yaml", "sft_npu.yaml", "full_npu.yaml"])
def test_sft_recipes_accept_a_32_frame_video_with_a_multi_turn_conversation(paper_geometry, recipe):
    config, tokenizer, video = paper_geometry
    processor = SampleProcessor(config, tokenizer, tokenizer, recipe_settings(recipe, training=True))
    sample = multi_turn_video()
    processed = processor(sample, [video])
    assert processed.pixel_values.shape == (32, 3, 336, 336)
    assert processed.input_ids.count(config.image_token_index) == 1024
    assert not processed.truncated and len(processed.input_ids) > 1024 + 300
    # Every answer is labelled (each closed by </s>).
    labelled = [i for i, label in enumerate(processed.labels) if label != IGNORE_INDEX]
    assert sum(processed.labels[i] == tokenizer.eos_token_id for i in labelled) == 3
    # The context the recipes used to have refuses this very sample, naming it.
    with pytest.raises(SampleTooLong, match="paper/video_0"):
        SampleProcessor(config, tokenizer, tokenizer, ProcessorSettings(max_length=1024)).encode(
            sample, processed.pixel_values, processed.image_size)


@pytest.mark.parametrize("recipe", ["dpo_gpu.yaml", "dpo_npu.yaml", "full_npu.yaml"])
def test_dpo_recipes_accept_a_32_frame_pair(paper_geometry, recipe):
    config, tokenizer, video = paper_geometry
    processor = PairProcessor(SampleProcessor(config, tokenizer, tokenizer, recipe_settings(recipe, training=False)))
    pair = PreferencePair("paper/pair_0", "clip.mp4", "What is the man doing and why?", SENTENCE * 3, SENTENCE * 2)
    processed = processor(pair, [video])
    for side, answer in ((processed.chosen, pair.chosen), (processed.rejected, pair.rejected)):
        assert side.input_ids.count(config.image_token_index) == 1024 and not side.truncated
        answer_tokens = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"]
        assert [t for t in side.labels if t != IGNORE_INDEX] == answer_tokens + [tokenizer.eos_token_id]
