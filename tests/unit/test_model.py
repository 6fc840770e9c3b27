"""The tiny PPLLaVA: interleaved batches, gradients, generation, trainable-part switches."""

import pytest
import torch

from conftest import INTERLEAVED, build_batch, tiny_model
from ppllava import IMAGE, MULTI_IMAGE, TEXT, VIDEO, PPLLaVAConfig
from ppllava.processing import visual_token_count

pytestmark = pytest.mark.unit


def one_sample(batch, index):
    """Sample ``index`` of a batch built by build_batch, alone and without padding."""
    counts = batch["frame_counts"].tolist()
    start = sum(counts[:index])
    length = int(batch["attention_mask"][index].sum())
    return {
        "input_ids": batch["input_ids"][index : index + 1, :length],
        "attention_mask": batch["attention_mask"][index : index + 1, :length],
        "pixel_values": batch["pixel_values"][start : start + counts[index]],
        "frame_counts": batch["frame_counts"][index : index + 1],
        "modalities": batch["modalities"][index : index + 1],
        "clip_input_ids": batch["clip_input_ids"][index : index + 1],
        "clip_attention_mask": batch["clip_attention_mask"][index : index + 1],
        "image_sizes": batch["image_sizes"][index : index + 1],
    }


def assert_batch_equals_each_sample_alone(model):
    batch = build_batch(model.config, INTERLEAVED)
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for index in range(len(INTERLEAVED)):
            alone = model(**one_sample(batch, index)).logits[0]
            torch.testing.assert_close(together[index, : alone.shape[0]], alone, atol=1e-5, rtol=1e-4)
    return batch


def test_interleaved_batch_equals_each_sample_alone(model):
    assert_batch_equals_each_sample_alone(model)


def test_vision_tower_runs_once_over_all_frames(model):
    batch = build_batch(model.config, INTERLEAVED)
    calls = []
    handle = model.vision_tower.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    assert calls == [8 + 3 + 3]


def test_visual_token_counts_follow_the_pooling_geometry(model):
    config = model.config
    # tiny: 6x6 patches per frame; (1,3,3) -> 4 tokens per frame, video (2,3,3)
    assert visual_token_count(config, VIDEO, 8) == 4 * 2 * 2
    # image (40, 96): base 2x2 = 4 tokens, then the 1x2 grid as a 2x4 mosaic + a newline per row
    assert visual_token_count(config, IMAGE, 3, image_size=(40, 96)) == 4 + 2 * (4 + 1)
    assert visual_token_count(config, MULTI_IMAGE, 3) == 3 * 4
    tokens = model.visual_tokens(**{k: v for k, v in build_batch(config, INTERLEAVED).items()
                                    if k in ("pixel_values", "frame_counts", "modalities", "clip_input_ids", "image_sizes")})
    assert [t.shape[0] for t in tokens] == [16, 14, 12]


def test_loss_and_gradients_reach_projector_and_clip_text(model):
    model.train()
    model.set_trainable_parts(vision=False, projector=True, clip_text=True, llm=True)
    batch = build_batch(model.config, INTERLEAVED + [(TEXT, 0)])
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads["multi_modal_projector.linear_1.weight"].abs().sum() > 0
    assert grads["clip_text.encoder.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    assert grads["clip_text.embeddings.position_embedding.trainable_tail"].abs().sum() > 0
    assert grads["text_projection.weight"].abs().sum() > 0
    assert "clip_text.embeddings.position_embedding.frozen_head" not in grads  # a buffer
    assert all(grads[n] is None for n in grads if n.startswith("vision_tower."))
    assert "logit_scale" not in grads and "logit_scale" in model.state_dict()  # a buffer, as in the official code


def test_trainable_part_switches_match_the_paper():
    model = tiny_model()
    model.set_trainable_parts(vision=False, projector=True, clip_text=True, llm=True)  # SFT
    assert model.trainable_parts() == {
        "vision_tower": False, "multi_modal_projector": True, "image_newline": True, "clip_text": True,
        "visual_projection": True, "text_projection": True, "language_model": True,
    }
    model.set_trainable_parts(vision=False, projector=False, clip_text=False, llm=True)  # DPO
    trainable = {part for part, on in model.trainable_parts().items() if on}
    assert trainable == {"language_model"}
    model.set_trainable_parts(vision=False, projector=True, clip_text=False, llm=True, clip_projections=True)  # authors'
    trainable = {part for part, on in model.trainable_parts().items() if on}
    assert trainable == {"multi_modal_projector", "image_newline", "visual_projection", "text_projection", "language_model"}


def test_placeholder_mismatch_is_a_clear_error(model):
    batch = build_batch(model.config, [(VIDEO, 8)])
    batch["input_ids"][0, batch["input_ids"][0] == model.config.image_token_index] = 5  # drop all slots
    with pytest.raises(ValueError, match="sample 0: 0 image-token slots"):
        model(**batch)
    batch = build_batch(model.config, [(VIDEO, 8)])
    batch["frame_counts"] = torch.tensor([7])
    with pytest.raises(ValueError, match="frame_counts sum to 7"):
        model(**batch)


def test_kernel_override_at_test_time():
    """Paper Table 8: train with 32 frames (2,3,3), test with 64 frames (4,3,3), same 1024 tokens."""
    model = tiny_model()
    batch = build_batch(model.config, [(VIDEO, 8)])
    tokens = model.visual_tokens(batch["pixel_values"].repeat(2, 1, 1, 1), torch.tensor([16]), torch.tensor([VIDEO]),
                                 batch["clip_input_ids"], pool_kernels=torch.tensor([[4, 3, 3]]))
    assert tokens[0].shape[0] == visual_token_count(model.config, VIDEO, 16, kernel=(4, 3, 3)) == 16


def test_generate_continues_after_the_visual_prompt(model):
    batch = build_batch(model.config, [(VIDEO, 8)], answer_len=0)
    length = int(batch["attention_mask"][0].sum()) - 1  # drop the EOS the helper appends
    inputs = one_sample(batch, 0)
    inputs["input_ids"] = inputs["input_ids"][:, :length]
    inputs["attention_mask"] = inputs["attention_mask"][:, :length]
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        expected = model(**inputs).logits[0, -1].argmax()
    assert generated.shape == (1, length + 4)
    assert generated[0, length] == expected


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llm_families(family):
    model = tiny_model(text_config={"model_type": family})
    assert model.language_model.config.model_type == family
    batch = build_batch(model.config, INTERLEAVED)
    output = model(**batch)
    assert torch.isfinite(output.loss)
    assert output.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)


@pytest.mark.parametrize("mode", ["max", "separate", "multi_kernel", "average", "none"])
def test_table7_and_baseline_pooling_modes_run_end_to_end(mode):
    model = tiny_model(pooling_mode=mode)
    batch = build_batch(model.config, INTERLEAVED)  # placeholders sized by the processor for this mode
    assert torch.isfinite(model(**batch).loss)
    video_tokens = int((batch["input_ids"][0] == model.config.image_token_index).sum())
    expected = {"average": 16, "none": 8 * 6 * 6}  # 8 frames of 6x6 patches: (2,3,3) windows, or all of them
    assert video_tokens == expected.get(mode, video_tokens)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_model().train()
    batch = build_batch(model.config, INTERLEAVED)
    plain = model(**batch).loss
    plain.backward()
    reference = model.multi_modal_projector.linear_1.weight.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable()
    checkpointed = model(**batch).loss
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, plain)
    torch.testing.assert_close(model.multi_modal_projector.linear_1.weight.grad, reference)


def test_bf16_model_matches_fp32():
    model = tiny_model()
    batch = build_batch(model.config, INTERLEAVED)
    with torch.no_grad():
        full = model(**batch)
        half = model.to(torch.bfloat16)(**batch)
    assert half.logits.dtype == torch.bfloat16
    assert abs(half.loss.float() - full.loss) < 0.05
    torch.testing.assert_close(half.logits.float(), full.logits, atol=0.1, rtol=0.05)


def test_training_gives_every_trainable_parameter_a_gradient_whatever_the_batch_holds():
    """Data-parallel ranks must agree on which parameters have gradients (ZeRO buckets, ZeRO-3 gathers)."""
    model = tiny_model().train()
    model.set_trainable_parts(vision=True, projector=True, clip_text=True, llm=True)

    def parameters_with_gradients(samples):
        model.zero_grad(set_to_none=True)
        model(**build_batch(model.config, samples)).loss.backward()
        return {name for name, p in model.named_parameters() if p.grad is not None}

    everything = parameters_with_gradients(INTERLEAVED)
    # The ViT layers after vision_feature_layer (-2) never matter, on any rank; all else does.
    assert {n for n, _ in model.named_parameters()} - everything == {
        n for n, _ in model.vision_tower.encoder.layers[-1].named_parameters(prefix="vision_tower.encoder.layers.2")
    }
    assert parameters_with_gradients([(TEXT, 0)]) == everything
    assert parameters_with_gradients([(VIDEO, 8)]) == everything
    assert model.image_newline.grad.abs().sum() == 0  # touched, with zero weight, by a video-only batch
    plain = tiny_model().eval()
    batch = build_batch(plain.config, [(TEXT, 0)])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, plain(**batch).logits)


def test_image_tokens_are_base_then_unpadded_mosaic_rows_each_ending_in_a_newline(model):
    """A 60x96 image -> base + 2x2 tiles; pooled 2x2 per tile; mosaic 4x4 of which rows 1-2 show the image."""
    from ppllava.processing import visual_token_count

    pooled = torch.arange(5 * 4, dtype=torch.float32)[:, None].repeat(1, model.config.text_config.hidden_size)
    with torch.no_grad():
        model.image_newline.fill_(-1.0)
    arranged = model._arrange_image(pooled, 5, torch.tensor([60, 96]))[:, 0].tolist()
    expected = [0, 1, 2, 3]  # the base view's tokens first
    for row in (1, 2):
        for col in range(4):
            tile = (row // 2) * 2 + col // 2 + 1
            expected.append(tile * 4 + (row % 2) * 2 + col % 2)
        expected.append(-1.0)  # image newline
    assert arranged == expected
    assert visual_token_count(model.config, IMAGE, 5, image_size=(60, 96)) == len(expected) == 14


def test_an_image_whose_size_disagrees_with_its_tiles_is_refused(model):
    batch = build_batch(model.config, [(IMAGE, 3)])
    batch["image_sizes"] = torch.tensor([[96, 96]])  # a 2x2-grid size for a sample with 1x2 tiles
    with pytest.raises(ValueError, match=r"image of size \[96, 96\] has 1 \+ 2x2 tiles, got 3"):
        model(**batch)


def test_prompts_guide_pooling_with_the_tiny_tokenizers_end_token():
    """The tiny tokenizer's end token is id 2 (transformers' legacy CLIP value, which would pool at
    argmax(input_ids)): the model's prompt feature is still the end token's projected state."""
    from pipeline.model.tiny import tiny_config_for, tiny_tokenizer
    from ppllava import PPLLaVAForConditionalGeneration

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = PPLLaVAForConditionalGeneration._from_config(tiny_config_for(tokenizer)).eval()
    text = tokenizer("which way does the red circle move", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tokenizer.bos_token_id, *text, tokenizer.eos_token_id, tokenizer.pad_token_id]])
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    end = len(text) + 1
    assert int(ids[0].argmax()) != end, "a prompt where argmax(input_ids) is not the end token"
    with torch.no_grad():
        hidden = model.clip_text(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model.encode_prompts(ids, mask), model.text_projection(hidden[:, end]))


def test_a_shrunk_config_keeps_everything_but_width_and_depth():
    """The rehearsal's model: real vocabularies, special ids, geometry; grouped-query attention stays grouped."""
    from pipeline.model.tiny import shrunk_config

    real = PPLLaVAConfig(text_config={"model_type": "llama", "vocab_size": 32064, "num_attention_heads": 32,
                                      "num_key_value_heads": 8, "max_position_embeddings": 4096},
                         clip_text_config={"vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                                           "max_position_embeddings": 248})
    shrunk = shrunk_config(real)
    assert (shrunk.text_config.hidden_size, shrunk.text_config.num_hidden_layers) == (64, 2)
    assert (shrunk.text_config.num_attention_heads, shrunk.text_config.num_key_value_heads) == (4, 2)
    assert (shrunk.text_config.vocab_size, shrunk.text_config.max_position_embeddings) == (32064, 4096)
    assert (shrunk.clip_text_config.eos_token_id, shrunk.clip_text_config.vocab_size) == (2, 49408)
    assert (shrunk.vision_config.image_size, shrunk.num_frames, shrunk.image_token_index) == (336, 32, 32000)
    full = shrunk_config(PPLLaVAConfig(text_config={"model_type": "llama", "num_attention_heads": 32,
                                                    "num_key_value_heads": 32}))
    assert full.text_config.num_key_value_heads == 4  # plain multi-head attention stays plain


# -- the BT-Adapter (the authors' released models; tests/unit/test_authors_checkpoint.py checks its maths) --

def adapter_model(**overrides):
    model = tiny_model(bt_adapter_depth=2, **overrides)
    with torch.no_grad():  # a trained adapter: its temporal output is not the zero it starts from
        for layer in model.bt_adapter.temporal_layers:
            layer.temporal_fc.weight.normal_(0, 0.2)
    return model


def test_the_adapter_groups_clips_per_sample_and_modality():
    """A video's frames and a multi-image sample's images attend to each other over time; an image's
    tiles and other samples' frames do not: a batch equals each sample alone."""
    model = adapter_model()
    batch = assert_batch_equals_each_sample_alone(model)
    # and frame order matters inside a clip (the time embedding, attention over time); without the
    # adapter, reversing a video only reverses its pooled windows
    video = {k: batch[k][:1] for k in ("frame_counts", "modalities", "clip_input_ids", "image_sizes")}
    frames = batch["pixel_values"][:8]

    def reversal_changes(m):
        with torch.no_grad():
            forward = m.visual_tokens(frames, **video)[0]
            backward = m.visual_tokens(frames.flip(0), **video)[0].reshape(4, 4, -1).flip(0).reshape(16, -1)
        return not torch.allclose(forward, backward, atol=1e-5)

    assert reversal_changes(model) and not reversal_changes(tiny_model())


def test_a_new_adapter_starts_from_the_clip_layers_beside_it_with_no_temporal_output():
    model = tiny_model(bt_adapter_depth=2)
    assert all(layer.temporal_fc.weight.abs().sum() == 0 for layer in model.bt_adapter.temporal_layers)
    model.init_bt_adapter_from_vision_tower()
    for spatial, clip_layer in zip(model.bt_adapter.spatial_layers, model.vision_tower.encoder.layers[1:]):
        for (name, ours), theirs in zip(spatial.state_dict().items(), clip_layer.state_dict().values()):
            assert torch.equal(ours, theirs), name


def test_adapter_layers_past_the_feature_layer_stay_frozen_and_the_rest_get_gradients():
    model = adapter_model().train()
    model.set_trainable_parts(bt_adapter=True)
    model(**build_batch(model.config, INTERLEAVED)).loss.backward()
    # 3 CLIP layers, depth 2: adapter layer 0 sits beside CLIP layer 1, whose output is the feature (-2)
    for name, parameter in model.bt_adapter.named_parameters():
        past = ".1." in name
        assert parameter.requires_grad is not past, name
        assert (parameter.grad is not None) is not past, name
    model.set_trainable_parts(llm=True)  # DPO: the adapter does not train
    assert not any(p.requires_grad for p in model.bt_adapter.parameters())


def test_the_adapter_under_activation_checkpointing_and_bf16():
    model = adapter_model().train()
    model.set_trainable_parts(bt_adapter=True)
    batch = build_batch(model.config, INTERLEAVED)
    torch.manual_seed(0)
    model.config.bt_adapter_drop_path = 0.0
    for layer in (*model.bt_adapter.temporal_layers, *model.bt_adapter.spatial_layers):
        layer.drop_path_rate = 0.0  # the same forward twice
    plain = model(**batch).loss
    plain.backward()
    reference = model.bt_adapter.spatial_layers[0].mlp.fc1.weight.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable()
    checkpointed = model(**batch).loss
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, plain)
    torch.testing.assert_close(model.bt_adapter.spatial_layers[0].mlp.fc1.weight.grad, reference)
    with torch.no_grad():
        full = model.eval()(**batch)
        half = model.to(torch.bfloat16)(**batch)
    assert abs(half.loss.float() - full.loss) < 0.05


def test_a_clip_longer_than_the_time_embedding_is_refused():
    model = tiny_model(bt_adapter_depth=2, bt_adapter_max_frames=4)
    batch = build_batch(model.config, [(VIDEO, 8)])
    with pytest.raises(ValueError, match="clip of 8 frames exceeds the BT-Adapter's time embedding"):
        with torch.no_grad():
            model(**batch)
    with pytest.raises(ValueError, match="bt_adapter_depth=5 must be in"):
        PPLLaVAConfig.tiny(bt_adapter_depth=5)
    with pytest.raises(ValueError, match="it could not change the features"):
        PPLLaVAConfig.tiny(bt_adapter_depth=1)  # beside layer 3 only; the features are layer 2's output
