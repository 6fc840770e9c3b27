"""The CPU demo's starting model: a tiny PPLLaVA whose CLIP towers are pretrained here, on
pictures of the synthetic shapes, before SFT starts. The synth stage writes it to synth/model
(``synth.clip_pretrain_steps``) and the demo recipe starts from it (``model.source: pretrained``).

Why a pretraining step at all: PPLLaVA starts from a *pretrained* CLIP. Its vision features tell
a triangle from a circle, and its text tower puts "What colour is the triangle?" next to the
triangle's patches; that is what lets prompt-guided pooling (eq.1) keep the asked-about object's
tokens. A tiny CLIP built here is random: its relevance maps are noise, and learning shapes and
their alignment with text through the LLM's loss alone stayed far from the demo's goal (37 %
after 2,000 SFT steps, measured). About a minute of pretraining on the demo's own shapes is the
miniature of the real tower's 400M captioned images.

The objective is dense: every patch of every picture is scored against every caption ("the
triangle", "What colour is the triangle?", "a red triangle", ...) with a sigmoid loss, and
labelled 1 where a shape the caption names covers at least a fifth of the patch. Per patch,
because eq.1 scores patches: with picture-level labels (a patch-max score) the same budget left
only 0.19 of the relevance on the asked-about shape, against 0.98 dense (measured). The scores
run through the model's own eq.1 path (penultimate vision layer -> post-layernorm -> visual
projection; the text's end token -> text projection), so what is trained is what pools. CLIP's
temperature stays at its trained value (tau = 100, the tiny config's); the loss has its own
scale and bias, as SigLIP's has.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.synthetic import BACKGROUND, COLOURS, RADIUS, SHAPES, Shape, draw_shapes
from pipeline.model.setup import save_tokenizers
from pipeline.model.tiny import tiny_config_for, tiny_tokenizer
from ppllava import PPLLaVAForConditionalGeneration
from ppllava.pooling import relevance
from ppllava.processing import normalize

logger = logging.getLogger(__name__)

PICTURES = 4096      # training pictures, drawn once (each step samples a batch of them)
BATCH = 128
LR = 5e-3
WARMUP = 30
COVER = 0.2          # a patch shows a shape when the shape's visible pixels cover this much of it
HELD_OUT = 256       # pictures the relevance check runs on
CLIP_PARTS = ("vision_tower", "clip_text", "visual_projection", "text_projection")


def captions() -> tuple[list[str], list[tuple[str, str | None]]]:
    """Every caption and what it names: (kind, colour), colour None for the kind alone."""
    texts, names = [], []
    for kind in SHAPES:
        texts += [f"the {kind}", f"What colour is the {kind}?"]
        names += [(kind, None), (kind, None)]
        for colour in sorted(COLOURS):
            texts.append(f"a {colour} {kind}")
            names.append((kind, colour))
    return texts, names


def random_picture(rng: random.Random, size: int, count: int) -> list[Shape]:
    """``count`` shapes of distinct kinds and colours anywhere in the frame (they may overlap,
    as the demo's moving shapes do)."""
    kinds, colours = rng.sample(SHAPES, count), rng.sample(sorted(COLOURS), count)
    return [Shape(kind, colour, rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size)
            for kind, colour in zip(kinds, colours)]


def patch_cover(shapes: list[Shape], size: int, patch: int) -> np.ndarray:
    """[shapes, patches] bool: which patches each shape's *visible* pixels cover by at least
    COVER (a shape drawn later hides what it overlaps, as in ``draw_shapes``)."""
    radius = size * RADIUS
    masks = np.stack([(draw_shapes([s], size, radius) != BACKGROUND).any(-1) for s in shapes])
    for index in range(len(shapes) - 1):
        masks[index] &= ~masks[index + 1:].any(0)
    side = size // patch
    fraction = masks.reshape(len(shapes), side, patch, side, patch).mean(axis=(2, 4))
    return fraction.reshape(len(shapes), -1) >= COVER


def _pictures(rng: random.Random, count: int, size: int, patch: int, names, shapes_per_picture=(1, 3)):
    """(pixels [N, 3, size, size], labels [N, captions, patches], (shapes, patch_cover) of each picture)."""
    pixels, labels, drawn = [], [], []
    for _ in range(count):
        shapes = random_picture(rng, size, rng.randint(*shapes_per_picture))
        cover = patch_cover(shapes, size, patch)
        label = np.zeros((len(names), cover.shape[1]), dtype=bool)
        for row, (kind, colour) in enumerate(names):
            for shape, patches in zip(shapes, cover):
                if shape.kind == kind and colour in (None, shape.colour):
                    label[row] |= patches
        pixels.append(draw_shapes(shapes, size, size * RADIUS))
        labels.append(label.astype(np.float32))
        drawn.append((shapes, cover))
    return normalize([Image.fromarray(p) for p in pixels]), torch.from_numpy(np.stack(labels)), drawn


class _Towers:
    """The model's eq.1 path: patch embeddings of pictures, end-token embeddings of texts."""

    def __init__(self, model: PPLLaVAForConditionalGeneration, tokenizer) -> None:
        self.model = model
        ids = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for t in captions()[0]]
        self.ids = torch.full((len(ids), max(map(len, ids))), tokenizer.pad_token_id)
        self.mask = torch.zeros_like(self.ids)
        for row, sequence in enumerate(ids):
            self.ids[row, : len(sequence)] = torch.tensor(sequence)
            self.mask[row, : len(sequence)] = 1

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_frames(pixels)[1]

    def texts(self) -> torch.Tensor:
        return self.model.encode_prompts(self.ids, self.mask)


def relevance_on_target(towers: _Towers, pixels: torch.Tensor, drawn: list[tuple[list[Shape], np.ndarray]],
                        rng: random.Random) -> float:
    """Mean eq.1 relevance mass that "What colour is the {kind}?" puts on the patches of that
    shape, over pictures of two or three shapes (a uniform map gives about 0.15)."""
    texts, names = captions()
    question = {kind: texts.index(f"What colour is the {kind}?") for kind in SHAPES}
    with torch.no_grad():
        visual, text = towers.patches(pixels), towers.texts()
        total = 0.0
        for index, (shapes, covers) in enumerate(drawn):
            target = rng.randrange(len(shapes))
            cover = torch.from_numpy(covers[target])
            scores = relevance(visual[index : index + 1], text[question[shapes[target].kind]][None],
                               towers.model.logit_scale)[0]
            total += float(scores[cover].sum())
    return total / len(drawn)


def pretrain_clip(model: PPLLaVAForConditionalGeneration, tokenizer, steps: int, seed: int) -> dict[str, float]:
    """Train ``model``'s CLIP parts (CLIP_PARTS) in place on the dense caption objective; returns
    the final loss and the relevance mass on the asked-about shape, on held-out pictures."""
    size, patch = model.config.vision_config.image_size, model.config.vision_config.patch_size
    rng = random.Random(seed)
    _, names = captions()
    pixels, labels, _ = _pictures(rng, PICTURES, size, patch, names)
    towers = _Towers(model, tokenizer)
    parameters = [p for part in CLIP_PARTS for p in getattr(model, part).parameters()]
    scale, bias = torch.nn.Parameter(torch.tensor(math.log(10.0))), torch.nn.Parameter(torch.tensor(-5.0))
    optimizer = torch.optim.AdamW(parameters + [scale, bias], lr=LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in optimizer.param_groups:  # linear warmup, cosine decay
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = torch.randint(0, PICTURES, (BATCH,), generator=generator)
        visual = F.normalize(towers.patches(pixels[batch]), dim=-1)
        text = F.normalize(towers.texts(), dim=-1)
        similarity = torch.einsum("bpd,td->btp", visual, text)
        loss = F.binary_cross_entropy_with_logits(scale.exp() * similarity + bias, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            logger.info("CLIP pretraining step %d/%d: loss %.4f", step + 1, steps, loss.item())
    held_pixels, _, held_drawn = _pictures(rng, HELD_OUT, size, patch, names, shapes_per_picture=(2, 3))
    mass = relevance_on_target(towers, held_pixels, held_drawn, rng)
    return {"clip loss": round(loss.item(), 4), "relevance on the asked shape": round(mass, 3)}


def write_start_model(directory: str | Path, steps: int, seed: int) -> dict[str, float]:
    """A tiny PPLLaVA (the tiny tokenizer's) with its CLIP pretrained for ``steps`` steps and
    everything else at its random start, saved with its tokenizers where ``model.source:
    pretrained`` reads it."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PPLLaVAForConditionalGeneration._from_config(tiny_config_for(tokenizer))
        report = pretrain_clip(model, tokenizer, steps, seed)
    model.save_pretrained(directory)
    save_tokenizers(tokenizer, tokenizer, directory)
    return report
