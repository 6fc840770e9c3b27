"""Eq.4: CLIP's 77 positions stretched to 248, asymmetrically, and the frozen/trainable split."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from ppllava.clip_text import ExtendedCLIPTextModel, extend_positions, extended_length

pytestmark = pytest.mark.unit


def test_hand_computed_small_table():
    # 6 rows of 1-d "embeddings" 0, 10, 20, 30, 40, 60; keep 2, factor 4.
    old = torch.tensor([[0.0], [10.0], [20.0], [30.0], [40.0], [60.0]])
    new = extend_positions(old, keep=2, factor=4)
    expected = [0, 10,
                20, 22.5, 25, 27.5,   # 20 -> 30
                30, 32.5, 35, 37.5,   # 30 -> 40
                40, 45, 50, 55,       # 40 -> 60
                60, 65, 70, 75]       # 60 -> extrapolated 2*60 - 40 = 80
    assert new.squeeze(1).tolist() == expected


def test_clip_77_to_248_keeps_the_first_20_rows():
    torch.manual_seed(0)
    old = torch.randn(77, 12)
    new = extend_positions(old)
    assert new.shape == (248, 12) and extended_length(77) == 248
    torch.testing.assert_close(new[:20], old[:20], atol=0, rtol=0)
    # Every 4th row after the head is an original row; in between, linear steps of a quarter.
    torch.testing.assert_close(new[20::4], old[20:], atol=0, rtol=0)
    torch.testing.assert_close(new[21], old[20] + 0.25 * (old[21] - old[20]))
    torch.testing.assert_close(new[247], old[76] + 0.75 * (old[76] - old[75]))


def test_bf16_table_keeps_its_dtype():
    assert extend_positions(torch.randn(77, 4).bfloat16()).dtype == torch.bfloat16


def test_extended_tower_from_a_clip_tower_runs_248_tokens():
    config = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77, eos_token_id=63, bos_token_id=62)
    torch.manual_seed(0)
    clip = CLIPTextModel(config)
    extended_config = CLIPTextConfig(**{**config.to_dict(), "max_position_embeddings": 248})
    tower = ExtendedCLIPTextModel(extended_config, keep_positions=20)
    tower.load_from_clip(clip, keep=20, factor=4)

    short = torch.tensor([[62, 5, 6, 7, 63]])
    torch.testing.assert_close(tower(input_ids=short).pooler_output, clip(input_ids=short).pooler_output)
    long_ids = torch.randint(1, 60, (2, 248))
    long_ids[:, -1] = 63
    assert tower(input_ids=long_ids).pooler_output.shape == (2, 16)

    trainable = {name for name, p in tower.named_parameters() if p.requires_grad}
    assert "embeddings.position_embedding.trainable_tail" in trainable
    assert "embeddings.position_embedding.frozen_head" in dict(tower.named_buffers())


def test_wrong_target_length_is_reported():
    config = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77)
    tower = ExtendedCLIPTextModel(CLIPTextConfig(**{**config.to_dict(), "max_position_embeddings": 200}), keep_positions=20)
    with pytest.raises(ValueError, match="clip_context_length=200"):
        tower.load_from_clip(CLIPTextModel(config), keep=20, factor=4)


def _tower(**ids) -> ExtendedCLIPTextModel:
    config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=248, **ids)
    torch.manual_seed(0)
    return ExtendedCLIPTextModel(config, keep_positions=20).eval()


# OpenAI's released CLIP configs (legacy ids: transformers pools at argmax(input_ids)), the same
# vocabulary with current ids, and the tiny tokenizer's layout (end token id 2 = legacy value too).
CLIP_LEGACY = {"vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
CLIP_CURRENT = {"vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
TINY = {"vocab_size": 300, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


@pytest.mark.parametrize("ids, bos, end, pad", [(CLIP_LEGACY, 49406, 49407, 49407), (CLIP_CURRENT, 49406, 49407, 49407),
                                                (TINY, 1, 2, 3)], ids=["clip-legacy-ids", "clip-current-ids", "tiny"])
def test_the_text_feature_is_the_end_tokens_state(ids, bos, end, pad):
    tower = _tower(**ids)
    # Right-padded rows of different lengths, as collate builds them; word ids above the end token
    # where the vocabulary allows, so argmax(input_ids) is not the end token for the tiny layout.
    words = [[250, 7, 260], [9, 270, 11, 12, 280, 13]]
    length = max(len(w) for w in words) + 2
    input_ids = torch.full((2, length), pad)
    mask = torch.zeros((2, length), dtype=torch.long)
    for row, text in enumerate(words):
        input_ids[row, : len(text) + 2] = torch.tensor([bos, *text, end])
        mask[row, : len(text) + 2] = 1
    with torch.no_grad():
        features = tower.end_token_states(input_ids, mask)
        hidden = tower(input_ids=input_ids, attention_mask=mask).last_hidden_state
    ends = [len(w) + 1 for w in words]
    for row, position in enumerate(ends):
        torch.testing.assert_close(features[row], hidden[row, position], atol=0, rtol=0)
        others = [p for p in range(position + 1) if p != position]
        assert all(not torch.allclose(features[row], hidden[row, p]) for p in others), "read at another position"
    if ids["vocab_size"] == 49408:  # with CLIP's vocabulary transformers' pooling agrees (the authors' code)
        with torch.no_grad():
            torch.testing.assert_close(features, tower(input_ids=input_ids, attention_mask=mask).pooler_output)
    # Without a mask every position is real: the end token is the last one.
    with torch.no_grad():
        alone = tower.end_token_states(input_ids[1:, : ends[1] + 1])
    torch.testing.assert_close(alone[0], features[1], atol=1e-5, rtol=1e-5)
