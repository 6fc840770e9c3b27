"""DPO preference pairs -> model inputs: one video, a prompt, a chosen and a rejected answer.

    pair  -> frames sampled at segment middles (eval sampling: the same frames every epoch, so
             reference log-probs computed once stay valid), CLIP text = the prompt only (§3.3)
          -> two conversations  [user: <image>\\n prompt, assistant: chosen | rejected]
    batch -> 2B rows: the B chosen conversations, then the B rejected ones; B videos in
             ``pixel_values`` and ``visual_rows`` = [0..B-1, 0..B-1], so the model pools each
             video once and the chosen and rejected rows share its visual tokens.

Runs in data-loader workers: CPU tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data.collate import Batch, ProcessedSample, SampleProcessor, collate
from pipeline.data.records import IMAGE_PLACEHOLDER, PreferencePair, Sample, Turn

VIDEO_PLACEHOLDER = "<video>"


@dataclass
class ProcessedPair:
    chosen: ProcessedSample
    rejected: ProcessedSample


class PairProcessor:
    """Wraps a SampleProcessor (its settings must have ``training=False``: prompt-only CLIP text;
    frames follow ``settings.frames``, segment middles by default)."""

    parse = staticmethod(PreferencePair.from_json)

    def __init__(self, samples: SampleProcessor) -> None:
        if samples.settings.training:
            raise ValueError("DPO pairs are prepared in eval mode (fixed frames, prompt-only CLIP text): "
                             "build the SampleProcessor with ProcessorSettings(training=False)")
        self.samples = samples

    def conversation(self, pair: PreferencePair, answer: str) -> Sample:
        """[user: <image>\\n prompt, assistant: answer]: placeholders in LLaVA-Hound's prompts
        (``<video>``) are dropped and the one ``<image>`` goes in front, as the authors' DPO does."""
        prompt = pair.prompt.replace(VIDEO_PLACEHOLDER, "").replace(IMAGE_PLACEHOLDER, "").strip()
        return Sample(pair.key, "video", [pair.video],
                      [Turn("user", f"{IMAGE_PLACEHOLDER}\n{prompt}"), Turn("assistant", answer)], pair.dataset)

    def __call__(self, pair: PreferencePair, media: list[bytes], epoch: int = 0) -> ProcessedPair:
        chosen = self.samples(self.conversation(pair, pair.chosen), media, epoch)
        # Same frames and prompt: reuse the decoded pixels instead of decoding the video twice.
        rejected_sample = self.conversation(pair, pair.rejected)
        rejected = self.samples.encode(rejected_sample, chosen.pixel_values, chosen.image_size)
        return ProcessedPair(chosen, rejected)

    def collate(self, pairs: list[ProcessedPair]) -> Batch:
        samples = self.samples
        chosen = collate([p.chosen for p in pairs], samples.tokenizer.pad_token_id, samples.clip_tokenizer.pad_token_id,
                         samples.config.image_token_index)
        rejected = collate([p.rejected for p in pairs], samples.tokenizer.pad_token_id,
                           samples.clip_tokenizer.pad_token_id, samples.config.image_token_index)
        batch = len(pairs)
        width = max(chosen.inputs["input_ids"].shape[1], rejected.inputs["input_ids"].shape[1])

        def rows(name: str, fill: int) -> torch.Tensor:
            parts = [b.inputs[name] for b in (chosen, rejected)]
            padded = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) for p in parts]
            return torch.cat(padded)

        inputs = dict(chosen.inputs)  # pixels, frame counts, modalities, CLIP prompt: once per pair
        inputs.update(input_ids=rows("input_ids", samples.tokenizer.pad_token_id),
                      attention_mask=rows("attention_mask", 0), labels=rows("labels", -100),
                      visual_rows=torch.arange(batch).repeat(2))
        return Batch(inputs, chosen.keys, chosen.truncated + rejected.truncated, chosen.visual_tokens)
