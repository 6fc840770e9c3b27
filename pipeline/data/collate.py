"""One sample -> model inputs (SampleProcessor), and a list of them -> one interleaved batch (collate).

Runs in data-loader workers: CPU tensors only, the accelerator is never touched here.

    video        32 sampled frames resized to S x S               -> 1 placeholder, 1024 tokens
    image        base view + any-res tiles                         -> 1 placeholder, 64 per tile + 1
    multi_image  each image resized to S x S                       -> 1 placeholder per image, 64 each
    text         no frames

The batch packs every frame of every sample into one ``pixel_values`` [F, 3, S, S] with
``frame_counts`` [B] and ``modalities`` [B], the layout PPLLaVAForConditionalGeneration expects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from pipeline.data.media import VideoDecoder, read_image, read_picture, read_video, sample_indices, sample_seed
from pipeline.data.records import Sample
from pipeline.data.templates import IGNORE_INDEX, clip_text, encode
from ppllava import TEXT, PPLLaVAConfig
from ppllava.config import MODALITY_NAMES
from ppllava.processing import anyres_tiles, frames_to_pixels, placeholder_token_counts

logger = logging.getLogger(__name__)

MODALITY_IDS = {name: modality for modality, name in MODALITY_NAMES.items()}


class SampleTooLong(ValueError):
    """The visual tokens alone do not fit the LLM context: the sample cannot be used."""


@dataclass
class ProcessedSample:
    key: str
    modality: int
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # [T, 3, S, S]
    clip_input_ids: list[int]
    truncated: bool = False
    image_size: tuple[int, int] = (0, 0)  # (height, width) of an image sample, else zeros


@dataclass
class ProcessorSettings:
    template: str = "plain_v1"      # the authors' SFT and eval format (pipeline/data/templates.py)
    clip_text: str = "conversation"  # what guides pooling in training: the formatted conversation, or "turns"
    max_length: int = 2048          # LLM context, visual tokens included (a 32-frame video: 1024)
    training: bool = True           # CLIP text (the conversation, or the questions only) and, unless
                                    # `frames` says otherwise, frame sampling follow this
    num_frames: int | None = None   # None: the model config's num_frames
    frames: str | None = None       # "random" (one per segment) | "middle"; None: random when training
    frame_scheme: str = "segments"  # "authors": their exact index arithmetic (media.authors_indices)


@dataclass
class SampleProcessor:
    config: PPLLaVAConfig
    tokenizer: object
    clip_tokenizer: object
    settings: ProcessorSettings = field(default_factory=ProcessorSettings)
    video_decoder: VideoDecoder | None = None

    parse = staticmethod(Sample.from_json)  # a shard record's JSON -> the record this processor takes

    def collate(self, samples: list["ProcessedSample"]) -> "Batch":
        return collate(samples, self.tokenizer.pad_token_id, self.clip_tokenizer.pad_token_id,
                       self.config.image_token_index)

    def __post_init__(self) -> None:
        # The model reads the CLIP feature at the end token's position, whatever id the config
        # names (OpenAI's checkpoints carry legacy ids): only the vocabulary has to fit.
        vocabulary = self.config.clip_text_config.vocab_size
        if len(self.clip_tokenizer) > vocabulary:
            raise ValueError(f"the CLIP tokenizer has {len(self.clip_tokenizer)} tokens but the CLIP text tower's "
                             f"vocabulary has {vocabulary}: use the tokenizer of the CLIP checkpoint the model came from")

    def pixels(self, sample: Sample, media: list[bytes], epoch: int, frames: int | None = None,
               scheme: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """CLIP-normalised frames [T, 3, S, S], and the image's (height, width) for image samples;
        ``frames``: how many to sample from a video (default: the settings', else the model's);
        ``scheme``: which (default: the settings' frame_scheme)."""
        scheme = scheme or self.settings.frame_scheme
        size = self.config.vision_config.image_size
        count = frames or self.settings.num_frames or self.config.num_frames
        randomly = self.settings.training if self.settings.frames is None else self.settings.frames == "random"
        if sample.modality == "video" and len(media) > 1:  # frames pre-extracted by the shard stage
            chosen = sample_indices(len(media), count, randomly, sample_seed(sample.key, epoch), scheme)
            return frames_to_pixels([read_picture(media[i], f"{sample.key}[frame {i}]") for i in chosen], size), (0, 0)
        if sample.modality == "video":
            frames = read_video(media[0], count, randomly, sample.key, epoch, video_decoder=self.video_decoder,
                                bounds=sample.bounds, scheme=scheme)
            return frames_to_pixels(frames, size), (0, 0)
        if sample.modality == "image":
            image = read_image(media[0], sample.key)
            return anyres_tiles(image, size, self.config.image_grid_pinpoints)[0], image.shape[:2]
        if sample.modality == "multi_image":
            return frames_to_pixels([read_picture(data, f"{sample.key}[{i}]") for i, data in enumerate(media)], size), (0, 0)
        return torch.zeros(0, 3, size, size), (0, 0)

    def clip_ids(self, sample: Sample) -> list[int]:
        """[BOS] text [EOS], at most clip_context_length tokens (248), EOS always kept."""
        limit = self.config.clip_context_length - 2
        text = clip_text(sample.turns, self.settings.training, self.settings.clip_text, self.settings.template,
                         sample.system or None, self.tokenizer)
        text_ids = self.clip_tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.clip_tokenizer.bos_token_id] + text_ids[:limit] + [self.clip_tokenizer.eos_token_id]

    def __call__(self, sample: Sample, media: list[bytes], epoch: int = 0) -> ProcessedSample:
        pixel_values, image_size = self.pixels(sample, media, epoch)
        return self.encode(sample, pixel_values, image_size)

    def encode(self, sample: Sample, pixel_values: torch.Tensor, image_size) -> ProcessedSample:
        """The text side of a sample whose pixels are already prepared."""
        modality = MODALITY_IDS[sample.modality]
        image_token = self.config.image_token_index
        encoded = encode(sample.turns, self.tokenizer, image_token, self.settings.template, system=sample.system or None)
        counts = (placeholder_token_counts(self.config, modality, pixel_values.shape[0], image_size=image_size)
                  if modality != TEXT else [])
        input_ids, labels = expand_placeholders(encoded.input_ids, encoded.labels, counts, image_token, sample.key)
        truncated = len(input_ids) > self.settings.max_length
        if truncated:
            last_visual = max((i for i, t in enumerate(input_ids) if t == image_token), default=-1)
            if last_visual >= self.settings.max_length:
                raise SampleTooLong(f"{sample.key}: its visual tokens end at position {last_visual + 1}, past the LLM "
                                    f"context of {self.settings.max_length}")
            logger.warning("%s: %d tokens cut to the LLM context of %d (counted in the batch's `truncated`)",
                           sample.key, len(input_ids), self.settings.max_length)
            input_ids, labels = input_ids[: self.settings.max_length], labels[: self.settings.max_length]
        return ProcessedSample(sample.key, modality, input_ids, labels, pixel_values, self.clip_ids(sample), truncated,
                               tuple(int(v) for v in image_size))


def expand_placeholders(input_ids: list[int], labels: list[int], counts: list[int], image_token: int,
                        key: str) -> tuple[list[int], list[int]]:
    """Each image token -> counts[k] image tokens (labels -100 there), in order."""
    if input_ids.count(image_token) != len(counts):
        raise ValueError(f"{key}: the text has {input_ids.count(image_token)} image placeholders but the media "
                         f"need {len(counts)}")
    ids, new_labels, placeholder = [], [], 0
    for token, label in zip(input_ids, labels):
        if token == image_token:
            ids += [image_token] * counts[placeholder]
            new_labels += [IGNORE_INDEX] * counts[placeholder]
            placeholder += 1
        else:
            ids.append(token)
            new_labels.append(label)
    return ids, new_labels


@dataclass
class Batch:
    """Model inputs (``model(**batch.inputs)``) and what the training loop logs about them."""

    inputs: dict[str, torch.Tensor]
    keys: list[str]
    truncated: int                         # samples cut to the LLM context
    visual_tokens: dict[str, list[int]]    # per modality name, visual tokens of each sample
    skipped: list[str] = field(default_factory=list)  # keys the loader dropped (undecodable, too long)
    skip_reasons: dict[str, str] = field(default_factory=dict)  # why, per key (refused in this batch)


def collate(samples: list[ProcessedSample], pad_token_id: int, clip_pad_token_id: int, image_token: int,
            left_padded: bool = False) -> Batch:
    """Right-padded interleaved batch in PPLLaVAForConditionalGeneration's input layout (left-padded
    for batched generation: every row's prompt then ends where the generated tokens start)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    length = max(len(s.input_ids) for s in samples)
    clip_length = max(len(s.clip_input_ids) for s in samples)
    rows = len(samples)
    input_ids = torch.full((rows, length), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    clip_input_ids = torch.full((rows, clip_length), clip_pad_token_id, dtype=torch.long)
    clip_attention_mask = torch.zeros((rows, clip_length), dtype=torch.long)
    visual_tokens: dict[str, list[int]] = {}
    for row, sample in enumerate(samples):
        tokens = slice(length - len(sample.input_ids), length) if left_padded else slice(0, len(sample.input_ids))
        input_ids[row, tokens] = torch.tensor(sample.input_ids)
        labels[row, tokens] = torch.tensor(sample.labels)
        attention_mask[row, tokens] = 1
        clip_input_ids[row, : len(sample.clip_input_ids)] = torch.tensor(sample.clip_input_ids)
        clip_attention_mask[row, : len(sample.clip_input_ids)] = 1
        visual_tokens.setdefault(MODALITY_NAMES[sample.modality], []).append(sample.input_ids.count(image_token))
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        # One sample's frames as they are: a copy costs ~25 ms per 32-frame 336x336 sample.
        "pixel_values": samples[0].pixel_values if rows == 1 else torch.cat([s.pixel_values for s in samples]),
        "frame_counts": torch.tensor([s.pixel_values.shape[0] for s in samples]),
        "modalities": torch.tensor([s.modality for s in samples]),
        "clip_input_ids": clip_input_ids,
        "clip_attention_mask": clip_attention_mask,
        "image_sizes": torch.tensor([s.image_size for s in samples], dtype=torch.long),
    }
    return Batch(inputs, [s.key for s in samples], sum(s.truncated for s in samples), visual_tokens)
