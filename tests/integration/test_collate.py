"""Synthetic files -> readers -> SampleProcessor -> collate -> the tiny model trains on the batch."""

import pytest
import torch

from conftest import tiny_config_for, tiny_tokenizer
from pipeline.data.collate import ProcessorSettings, SampleProcessor, SampleTooLong, collate, expand_placeholders
from pipeline.data.records import Sample, Turn
from pipeline.data.sources import read_llava, read_videochat2, strict
from pipeline.data.synthetic import SynthSettings, generate
from pipeline.data.templates import IGNORE_INDEX
from ppllava import IMAGE, MULTI_IMAGE, TEXT, VIDEO, PPLLaVAConfig, PPLLaVAForConditionalGeneration
from ppllava.processing import visual_token_count

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, SynthSettings(seed=1, videos=2, images=2, multi_images=2, eval_questions=0, dpo_pairs=0, size=48))
    tokenizer = tiny_tokenizer()
    config = tiny_config_for(tokenizer)
    samples = (list(strict(read_videochat2(root / "video_qa.json", "v"))) + list(strict(read_llava(root / "image_conversations.json", "i")))
               + list(strict(read_llava(root / "multi_image_conversations.json", "m"))))
    media = {s.key: [(root / "media" / m).read_bytes() for m in s.media] for s in samples}
    return config, tokenizer, samples, media


def test_processed_samples_follow_the_pooling_geometry(setup):
    config, tokenizer, samples, media = setup
    processor = SampleProcessor(config, tokenizer, tokenizer)
    by_modality = {s.modality: processor(s, media[s.key]) for s in samples}
    video, image, multi = by_modality["video"], by_modality["image"], by_modality["multi_image"]
    image_token = config.image_token_index
    assert video.pixel_values.shape == (8, 3, 48, 48) and video.input_ids.count(image_token) == 16
    tiles = image.pixel_values.shape[0]
    assert tiles >= 2 and image.input_ids.count(image_token) == visual_token_count(config, IMAGE, tiles, image_size=image.image_size)
    assert image.image_size == (48, 48)  # the synthetic images are 48x48
    images = multi.pixel_values.shape[0]
    assert 2 <= images <= 4 and multi.input_ids.count(image_token) == 4 * images
    for processed in (video, image, multi):
        labelled = [i for i, label in enumerate(processed.labels) if label != IGNORE_INDEX]
        assert all(processed.input_ids[i] != image_token for i in labelled)
        assert processed.labels[labelled[-1]] == tokenizer.eos_token_id
        assert processed.clip_input_ids[0] == tokenizer.bos_token_id and processed.clip_input_ids[-1] == tokenizer.eos_token_id


def test_collated_interleaved_batch_trains_the_tiny_model(setup):
    config, tokenizer, samples, media = setup
    processor = SampleProcessor(config, tokenizer, tokenizer)
    text_only = Sample("t/0", "text", [], [Turn("user", "Hello?"), Turn("assistant", "Hello.")])
    processed = [processor(s, media[s.key]) for s in samples[:1] + samples[2:3] + samples[-1:]] + [processor(text_only, [])]
    batch = collate(processed, tokenizer.pad_token_id, tokenizer.pad_token_id, config.image_token_index)
    assert batch.inputs["modalities"].tolist() == [VIDEO, IMAGE, MULTI_IMAGE, TEXT]
    assert batch.inputs["frame_counts"].sum() == batch.inputs["pixel_values"].shape[0]
    assert batch.keys[-1] == "t/0" and batch.visual_tokens["video"] == [16] and batch.truncated == 0
    torch.manual_seed(0)
    model = PPLLaVAForConditionalGeneration(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch.inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_truncation_keeps_visual_tokens_or_refuses(setup):
    config, tokenizer, samples, media = setup
    video = next(s for s in samples if s.modality == "video")
    full = SampleProcessor(config, tokenizer, tokenizer)(video, media[video.key])
    short = SampleProcessor(config, tokenizer, tokenizer, ProcessorSettings(max_length=len(full.input_ids) - 3))
    cut = short(video, media[video.key])
    assert cut.truncated and cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    tiny = SampleProcessor(config, tokenizer, tokenizer, ProcessorSettings(max_length=10))
    with pytest.raises(SampleTooLong, match="past the LLM context of 10"):
        tiny(video, media[video.key])


def test_mismatched_clip_tokenizer_and_placeholders_are_reported(setup):
    config, tokenizer, _, _ = setup
    other = PPLLaVAConfig.tiny()  # a CLIP vocabulary of 128, smaller than the tiny tokenizer's
    with pytest.raises(ValueError, match=f"CLIP tokenizer has {len(tokenizer)} tokens but the CLIP text tower's "
                                         f"vocabulary has 128"):
        SampleProcessor(other, tokenizer, tokenizer)
    with pytest.raises(ValueError, match="k/1: the text has 1 image placeholders but the media need 2"):
        expand_placeholders([1, 9, 2], [-100, -100, 2], [4, 4], 9, "k/1")
