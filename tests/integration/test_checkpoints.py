"""Real loading paths on tiny checkpoints written here first: save/load and LLaVA-NeXT conversion."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, CLIPConfig, CLIPModel, LlavaNextConfig, LlavaNextForConditionalGeneration

from conftest import INTERLEAVED, build_batch, tiny_model
from ppllava import PPLLaVAConfig, PPLLaVAForConditionalGeneration
from ppllava.clip_text import extend_positions
from ppllava.convert import from_llava_next

pytestmark = pytest.mark.integration

TINY_VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, patch_size=8, image_size=48)
TINY_LLM = dict(model_type="llama", vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def inference_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = tiny_model(seed=3)
    model.logit_scale.fill_(3.1)  # not the config's init value: loading must not re-initialise it
    batch = build_batch(model.config, INTERLEAVED)
    with torch.no_grad():
        before = model(**inference_inputs(batch)).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "ppllava"

    for loader in (PPLLaVAForConditionalGeneration, AutoModelForImageTextToText):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, PPLLaVAForConditionalGeneration)
        with torch.no_grad():
            after = loaded(**inference_inputs(batch)).logits
        torch.testing.assert_close(after, before, atol=0, rtol=0)
        assert float(loaded.logit_scale) == pytest.approx(3.1)
        head = loaded.clip_text.embeddings.position_embedding.frozen_head
        assert not head.requires_grad and "clip_text.embeddings.position_embedding.frozen_head" in loaded.state_dict()
        torch.testing.assert_close(head, model.clip_text.embeddings.position_embedding.frozen_head, atol=0, rtol=0)


def write_llava_hf_checkpoint(directory, image_token_index=159, **llm):
    """A tiny LLaVA-NeXT in the llava-hf hub layout (`vision_tower.vision_model.*` key names);
    ``llm`` overrides the LLM config (a vocabulary sized to a tokenizer, its special ids)."""
    torch.manual_seed(11)
    config = LlavaNextConfig(vision_config=dict(TINY_VISION, projection_dim=16), text_config={**TINY_LLM, **llm},
                             image_token_index=image_token_index, image_grid_pinpoints=[[48, 96], [96, 48], [96, 96]])
    source = LlavaNextForConditionalGeneration(config)
    source.save_pretrained(directory)
    weights = load_file(directory / "model.safetensors")
    hub_names = {
        (k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k): v
        for k, v in weights.items()
    }
    assert any(k.startswith("vision_tower.vision_model.encoder") for k in hub_names)
    save_file(hub_names, directory / "model.safetensors", metadata={"format": "pt"})
    return source


def write_clip_checkpoint(directory, **text):
    """A tiny CLIP; ``text`` overrides its text config (vocabulary and special ids)."""
    torch.manual_seed(12)
    config = CLIPConfig(
        text_config={**dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=16, bos_token_id=126, eos_token_id=127, pad_token_id=0), **text},
        vision_config=dict(TINY_VISION),
        projection_dim=16,
    )
    source = CLIPModel(config)
    with torch.no_grad():
        source.logit_scale.fill_(4.2)
    source.save_pretrained(directory)
    return source


def test_convert_from_llava_next_and_clip(tmp_path):
    llava_dir, clip_dir = tmp_path / "llava", tmp_path / "clip"
    llava = write_llava_hf_checkpoint(llava_dir)
    clip = write_clip_checkpoint(clip_dir)

    model = from_llava_next(str(llava_dir), str(clip_dir), clip_keep_positions=4, num_frames=8)
    assert model.config.clip_context_length == 4 + 4 * (16 - 4)

    def assert_equal(ours, theirs):
        ours, theirs = ours.state_dict(), theirs.state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)

    assert_equal(model.vision_tower, llava.model.vision_tower)
    assert_equal(model.multi_modal_projector, llava.model.multi_modal_projector)
    assert_equal(model.language_model.model, llava.model.language_model)
    torch.testing.assert_close(model.language_model.lm_head.weight, llava.lm_head.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.image_newline, llava.model.image_newline, atol=0, rtol=0)
    torch.testing.assert_close(model.visual_projection.weight, clip.visual_projection.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.text_projection.weight, clip.text_projection.weight, atol=0, rtol=0)
    assert float(model.logit_scale.detach()) == pytest.approx(4.2)
    positions = model.clip_text.embeddings.position_embedding.weight
    torch.testing.assert_close(positions, extend_positions(clip.text_model.embeddings.position_embedding.weight, keep=4))
    torch.testing.assert_close(positions[:4], clip.text_model.embeddings.position_embedding.weight[:4], atol=0, rtol=0)
    torch.testing.assert_close(
        model.clip_text.encoder.layers[1].mlp.fc2.weight, clip.text_model.encoder.layers[1].mlp.fc2.weight, atol=0, rtol=0
    )

    # The converted model runs, and survives its own save/load.
    batch = build_batch(model.config, INTERLEAVED)
    with torch.no_grad():
        logits = model.eval()(**inference_inputs(batch)).logits
    model.save_pretrained(tmp_path / "ppllava")
    reloaded = PPLLaVAForConditionalGeneration.from_pretrained(tmp_path / "ppllava").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inference_inputs(batch)).logits, logits, atol=0, rtol=0)


def test_convert_rejects_a_mismatched_clip(tmp_path):
    write_llava_hf_checkpoint(tmp_path / "llava")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, max_position_embeddings=16),
                         vision_config=dict(TINY_VISION, hidden_size=48), projection_dim=16)).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="vision tower has width 32"):
        from_llava_next(str(tmp_path / "llava"), str(tmp_path / "clip"))


def test_tiny_config_survives_json(tmp_path):
    config = PPLLaVAConfig.tiny(video_kernel=[4, 3, 3], pooling_mode="max", window_temperature=None)
    config.save_pretrained(tmp_path)
    loaded = PPLLaVAConfig.from_pretrained(tmp_path)
    assert loaded.video_kernel == [4, 3, 3] and loaded.pooling_mode == "max" and loaded.window_temperature is None
    assert loaded.text_config.hidden_size == config.text_config.hidden_size
