"""Shared test helpers: tiny models and hand-built interleaved batches (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from ppllava import IMAGE, MULTI_IMAGE, TEXT, VIDEO, PPLLaVAConfig, PPLLaVAForConditionalGeneration
from ppllava.processing import expand_image_placeholders, placeholder_token_counts


def tiny_model(seed: int = 0, **overrides) -> PPLLaVAForConditionalGeneration:
    torch.manual_seed(seed)
    return PPLLaVAForConditionalGeneration(PPLLaVAConfig.tiny(**overrides)).eval()


# (height, width) of a tiny-config image with base + 1x2 tiles (3 frames) or base + 2x2 tiles (5).
IMAGE_SIZES = {3: (40, 96), 5: (90, 96)}


def build_batch(config: PPLLaVAConfig, samples: list[tuple[int, int]], seed: int = 0, text_len: int = 6, answer_len: int = 5):
    """An interleaved batch, right-padded: one (modality, frames) pair per sample.

    Each sample: BOS, prompt words, its placeholders (one per image for multi-image), more
    prompt words, then an answer whose tokens are the only labelled ones.
    """
    generator = torch.Generator().manual_seed(seed)
    image_token = config.image_token_index
    vocab = config.text_config.vocab_size
    size = config.vision_config.image_size
    sequences, label_rows, pixels, counts, modalities, clip_rows, sizes = [], [], [], [], [], [], []
    for modality, frames in samples:
        words = lambda n: torch.randint(3, vocab - 1, (n,), generator=generator).tolist()  # noqa: E731
        placeholders = frames if modality == MULTI_IMAGE else (1 if modality != TEXT else 0)
        prompt = [config.text_config.bos_token_id] + words(text_len // 2) + [image_token] * placeholders + words(text_len - text_len // 2)
        size_of_image = IMAGE_SIZES[frames] if modality == IMAGE else (0, 0)
        sizes.append(size_of_image)
        if modality != TEXT:
            counts_here = placeholder_token_counts(config, modality, frames, image_size=size_of_image if modality == IMAGE else None)
            prompt = expand_image_placeholders(prompt, counts_here, image_token)
        answer = words(answer_len) + [config.text_config.eos_token_id]
        sequences.append(prompt + answer)
        label_rows.append([-100] * len(prompt) + answer)
        pixels.append(torch.randn(frames, 3, size, size, generator=generator))
        counts.append(frames)
        modalities.append(modality)
        clip = torch.randint(1, config.clip_text_config.vocab_size - 2, (10,), generator=generator)
        clip[-1] = config.clip_text_config.eos_token_id
        clip_rows.append(clip)
    length = max(len(s) for s in sequences)
    pad = config.text_config.pad_token_id
    input_ids = torch.full((len(samples), length), pad)
    labels = torch.full((len(samples), length), -100)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, (sequence, label) in enumerate(zip(sequences, label_rows)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, : len(label)] = torch.tensor(label)
        attention_mask[row, : len(sequence)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.cat(pixels),
        "frame_counts": torch.tensor(counts),
        "modalities": torch.tensor(modalities),
        "clip_input_ids": torch.stack(clip_rows),
        "clip_attention_mask": torch.ones(len(samples), 10, dtype=torch.long),
        "image_sizes": torch.tensor(sizes, dtype=torch.long),
    }


INTERLEAVED = [(VIDEO, 8), (IMAGE, 3), (MULTI_IMAGE, 3)]


@pytest.fixture
def model():
    return tiny_model()


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 300, chat_template: bool = False):
    """A byte-level BPE tokenizer trained here on a few sentences (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.templates import VICUNA_SYSTEM

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|user|>", "<|assistant|>", "<|end|>"]
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    corpus = [VICUNA_SYSTEM, "USER: ASSISTANT: What colour is the red circle? It moves left right up down.",
              "Which image contains the blue square? Image 1. There are 3 shapes. The triangle is green."]
    model.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", additional_special_tokens=specials[4:])
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_config_for(tokenizer, **overrides) -> PPLLaVAConfig:
    """The tiny PPLLaVA sized to a tokenizer: its vocabulary and special ids for both the LLM
    and the CLIP text tower (the tiny tokenizer serves as both in data tests)."""
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    return PPLLaVAConfig.tiny(text_config=ids, clip_text_config=ids,
                              image_token_index=tokenizer.convert_tokens_to_ids("<image>"), **overrides)
