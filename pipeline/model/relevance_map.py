"""What prompt-guided pooling looks at (paper Fig. 5): the eq.1 relevance of a question over a
video's frames as a heat map, and the pooled-token grid it produces, drawn into one PNG.

    python -m pipeline explain MODEL_DIR --video clip.mp4 "What colour is the triangle?"

The relevance is the model's own (``PPLLaVAForConditionalGeneration.encode_frames`` for CLIP's
patch embeddings, ``encode_prompts`` for the question's, ``ppllava.pooling.relevance``): a softmax
over every patch of every frame, so the map shows where in the whole video the question's mass
goes. The pooled grid shows, per pooled token (kernel window), the relevance mass of its window:
which tokens the question leaves the LLM to read most of. Each frame's heat is drawn over it;
all maps share one colour scale (the video's hottest patch is full red).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pipeline.model.inference import InferenceModel, Question
from ppllava.config import VIDEO
from ppllava.pooling import relevance
from ppllava.processing import CLIP_MEAN, CLIP_STD

TILE = 112            # pixels per frame in the picture
COLUMNS = 8           # frames per row
HEADER = 20           # pixels of the question line on top


@dataclass
class RelevanceMap:
    frames: np.ndarray       # [F, S, S, 3] uint8, as the model saw them
    scores: np.ndarray       # [F, side, side] eq.1 relevance (sums to 1 over the video)
    pooled: np.ndarray       # [T', H', W'] relevance mass of each pooled token's window
    question: str

    @property
    def hottest(self) -> tuple[int, int, int]:
        """(frame, row, column) of the patch with the most relevance."""
        return tuple(int(i) for i in np.unravel_index(int(self.scores.argmax()), self.scores.shape))


@torch.no_grad()
def relevance_map(model: InferenceModel, question: Question) -> RelevanceMap:
    """The relevance of ``question`` (its guide text, as pooling reads it) over its video's frames."""
    if question.modality != "video":
        raise ValueError(f"relevance maps are drawn for videos; {question.key} is {question.modality}")
    inputs = model.prompt_inputs(question)
    network, config = model.model, model.config
    pixels = inputs["pixel_values"]
    _, clip_visual = network.encode_frames(pixels)
    prompt = network.encode_prompts(inputs["clip_input_ids"], inputs.get("clip_attention_mask"))
    side = config.patches_per_side
    scores = relevance(clip_visual.reshape(1, -1, clip_visual.shape[-1]), prompt[:1], network.logit_scale)
    scores = scores.float().reshape(pixels.shape[0], side, side)
    kernel, stride = network.pooling_geometry(VIDEO, None)
    frames_needed = max(pixels.shape[0], kernel[0])  # a short clip repeats its last frame, as pooling does
    padded = torch.cat([scores, scores[-1:].expand(frames_needed - scores.shape[0], side, side)])
    pooled = F.avg_pool3d(padded[None, None], kernel, stride)[0, 0] * float(np.prod(kernel))
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    frames = ((pixels.float() * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
    return RelevanceMap(frames.cpu().numpy(), scores.cpu().numpy(), pooled.cpu().numpy(), question.guide or question.text)


def _heat(values: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 colours of values in [0, 1]: black-red-yellow-white ("hot")."""
    v = np.clip(values, 0, 1)[..., None]
    return (255 * np.clip(np.concatenate([3 * v, 3 * v - 1, 3 * v - 2], axis=-1), 0, 1)).astype(np.uint8)


def _tile(heat: np.ndarray, under: np.ndarray | None) -> Image.Image:
    """A TILE x TILE picture of a heat grid (nearest), blended half over ``under`` when given."""
    picture = Image.fromarray(_heat(heat)).resize((TILE, TILE), Image.NEAREST)
    if under is None:
        return picture
    return Image.blend(Image.fromarray(under).resize((TILE, TILE), Image.BILINEAR), picture, 0.5)


def draw(result: RelevanceMap, path: str | Path) -> Path:
    """The PNG: the question, then the frames with their relevance over them (COLUMNS per row),
    then one pooled-token grid per pooled time step."""
    scale = max(float(result.scores.max()), 1e-12)
    pooled_scale = max(float(result.pooled.max()), 1e-12)
    frames, steps = len(result.frames), len(result.pooled)
    frame_rows, pooled_rows = -(-frames // COLUMNS), -(-steps // COLUMNS)
    canvas = Image.new("RGB", (COLUMNS * TILE, HEADER + (frame_rows + pooled_rows) * TILE), (255, 255, 255))
    ImageDraw.Draw(canvas).text((4, 4), result.question.replace("\n", " ")[:160], fill=(0, 0, 0))
    for index in range(frames):
        tile = _tile(result.scores[index] / scale, result.frames[index])
        canvas.paste(tile, ((index % COLUMNS) * TILE, HEADER + (index // COLUMNS) * TILE))
    for index in range(steps):
        tile = _tile(result.pooled[index] / pooled_scale, None)
        canvas.paste(tile, ((index % COLUMNS) * TILE, HEADER + (frame_rows + index // COLUMNS) * TILE))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def picture_size(frames: int, pooled_steps: int) -> tuple[int, int]:
    """(width, height) of ``draw``'s PNG for a video of ``frames`` frames and ``pooled_steps`` pooled steps."""
    return COLUMNS * TILE, HEADER + (-(-frames // COLUMNS) + -(-pooled_steps // COLUMNS)) * TILE
