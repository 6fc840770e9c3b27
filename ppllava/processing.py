"""Model inputs: frames/images -> pixels, visual token counts, image-token placeholder expansion.

The processor decides how many image tokens each sample's text carries, so it must agree with
the model's pooling exactly; both read the geometry from the same :class:`PPLLaVAConfig`.

    video        T frames resized to S x S          -> pooled with the video kernel (32 -> 1024)
    image        base view + any-resolution tiles   -> tiles on the T axis, (1,3,3) each, + newline
    multi_image  each image resized to S x S        -> 64 tokens per image, one placeholder each
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ppllava.config import IMAGE, MULTI_IMAGE, VIDEO, PPLLaVAConfig
from ppllava.pooling import pooled_size, pooled_token_count

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_pil(frame: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame if frame.mode == "RGB" else frame.convert("RGB")
    return Image.fromarray(_rgb_array(frame))


def _rgb_array(frame: np.ndarray) -> np.ndarray:
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"a frame must be an RGB uint8 array [H, W, 3], got {array.dtype} {array.shape}")
    return array


def _normalize_reference(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """The arithmetic of CLIP normalisation, as every earlier version computed it: float32 / 255
    (NumPy), then (x - mean) / std (torch, float32). :func:`normalize` reproduces it bit for bit
    through a table made by this function."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


_TABLE: np.ndarray | None = None


def _table() -> np.ndarray:
    """[3, 256] float32: the normalised value of each 8-bit level in each channel. Every output
    element depends only on its level and channel through IEEE float32 operations, so looking it
    up gives exactly what computing it gives, in one pass instead of five over the frames."""
    global _TABLE
    if _TABLE is None:
        levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # [1, 256, 3]
        _TABLE = np.ascontiguousarray(_normalize_reference([levels])[0, :, 0, :].numpy())
    return _TABLE


def normalize(images: Sequence[Image.Image | np.ndarray] | np.ndarray) -> torch.Tensor:
    """RGB images (PIL, uint8 arrays [H, W, 3], or one uint8 array [N, H, W, 3]) already at their
    final size -> CLIP-normalised float tensor [N, 3, H, W], laid out channels-last in memory as
    it always was (a permuted NHWC array): the same strides, so the vision tower downstream runs
    the same kernels on it."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8:
        levels = images  # a decoded clip: no second copy
    else:
        levels = np.stack([_rgb_array(image) for image in images])  # [N, H, W, 3] uint8
    table = _table()
    pixels = np.empty(levels.shape, dtype=np.float32)
    for index in range(len(levels)):  # per frame: NumPy's index conversion stays in cache (2x faster)
        for channel in range(3):  # mode="clip" writes the strided output directly (levels < 256 anyway)
            np.take(table[channel], levels[index, ..., channel], out=pixels[index, ..., channel], mode="clip")
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def frames_to_pixels(frames: Sequence[Image.Image | np.ndarray] | np.ndarray, size: int) -> torch.Tensor:
    """Video frames (a list, or a clip array [T, H, W, 3]) or multi-image inputs: each resized
    straight to size x size (no crop); arrays already that size go to the table as they are
    (PIL's same-size resize is a copy)."""
    if len(frames) == 0:
        raise ValueError("no frames given")
    if isinstance(frames, np.ndarray) and frames.ndim == 4 and frames.shape[1:3] == (size, size):
        return normalize(frames)
    sized = []
    for frame in frames:
        if not isinstance(frame, Image.Image) and _rgb_array(frame).shape[:2] == (size, size):
            sized.append(frame)
        else:
            image = _to_pil(frame)
            sized.append(image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC))
    return normalize(sized)


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """LLaVA-NeXT's rule: the (h, w) pinpoint keeping the most image detail, then the least padding."""
    best, best_key = None, None
    for grid_h, grid_w in pinpoints:
        scale = min(grid_w / width, grid_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = grid_w * grid_h - effective
        key = (effective, -wasted)
        if best_key is None or key > best_key:
            best, best_key = (int(grid_h), int(grid_w)), key
    return best


def anyres_tiles(image: Image.Image | np.ndarray, size: int, pinpoints: Sequence[Sequence[int]]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Base view + grid tiles of one image, [1 + rows*cols, 3, size, size], and (rows, cols).

    As the LLaVA-NeXT image processor the vision tower was tuned with: the image is resized to
    fit the best pinpoint keeping its aspect ratio (the fitted side exact, the other rounded up),
    centred on a black canvas, and cut into size x size tiles row by row; the base view is the
    whole image squashed to size x size.
    """
    image = _to_pil(image)
    grid_h, grid_w = select_best_resolution(image.height, image.width, pinpoints)
    if grid_w / image.width < grid_h / image.height:  # the width fits the grid exactly
        new_w, new_h = grid_w, min(math.ceil(image.height * grid_w / image.width), grid_h)
    else:
        new_w, new_h = min(math.ceil(image.width * grid_h / image.height), grid_w), grid_h
    canvas = Image.new("RGB", (grid_w, grid_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((grid_w - new_w) // 2, (grid_h - new_h) // 2))
    rows, cols = grid_h // size, grid_w // size
    tiles = [image.resize((size, size), Image.BICUBIC)]
    tiles += [canvas.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]
    return normalize(tiles), (rows, cols)


def image_grid(image_size: Sequence[int], config: PPLLaVAConfig) -> tuple[int, int]:
    """(rows, cols) of any-resolution tiles for an image of (height, width), as anyres_tiles cuts it."""
    grid_h, grid_w = select_best_resolution(int(image_size[0]), int(image_size[1]), config.image_grid_pinpoints)
    side = config.vision_config.image_size
    return grid_h // side, grid_w // side


def unpadded_window(image_size: Sequence[int], mosaic: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the part of a pooled tile mosaic [H, W] that shows the image.

    anyres_tiles centres the resized image on a padded canvas; like LLaVA-NeXT, the pooled grid
    features of that padding are dropped before the tokens go to the LLM.
    """
    height, width = (int(v) for v in image_size)
    rows, cols = mosaic
    if width / height > cols / rows:  # wider than the mosaic: padding above and below
        kept = int(round(height * cols / width, 7))
        pad = (rows - kept) // 2
        return pad, rows - pad, 0, cols
    kept = int(round(width * rows / height, 7))
    pad = (cols - kept) // 2
    return 0, rows, pad, cols - pad


def image_token_count(config: PPLLaVAConfig, image_size: Sequence[int], kernel: Sequence[int] | None = None) -> int:
    """Tokens of one any-resolution image: pooled base view, then the pooled grid tiles arranged
    as one mosaic, its padding removed, with an image-newline token ending every row."""
    side = config.patches_per_side
    kernel_, stride = config.pooling_geometry(IMAGE)
    if kernel is not None:
        kernel_, stride = tuple(kernel), tuple(kernel)
    _, pooled_h, pooled_w = pooled_size((1, side, side), kernel_, stride)
    rows, cols = image_grid(image_size, config)
    newline = 1 if config.use_image_newline else 0
    top, bottom, left, right = unpadded_window(image_size, (rows * pooled_h, cols * pooled_w))
    return pooled_h * pooled_w + (bottom - top) * (right - left + newline)


def placeholder_token_counts(config: PPLLaVAConfig, modality: int, frames: int, kernel: Sequence[int] | None = None,
                             image_size: Sequence[int] | None = None) -> list[int]:
    """Image tokens behind each ``<image>`` placeholder of a sample, in text order.

    video: one placeholder for all frames; image: one placeholder for base + grid mosaic (needs the
    image's (height, width)); multi_image: one placeholder per image. ``kernel`` overrides the
    configured one (stride = kernel).
    """
    side = config.patches_per_side
    configured_kernel, stride = config.pooling_geometry(modality)
    if kernel is not None:
        configured_kernel, stride = tuple(kernel), tuple(kernel)
    if modality == VIDEO:
        mode = config.pooling_mode
        return [pooled_token_count((frames, side, side), configured_kernel, stride, mode, config.second_video_kernel)]
    if modality == IMAGE:
        if image_size is None:
            raise ValueError("an image's token count depends on its size: pass image_size=(height, width)")
        rows, cols = image_grid(image_size, config)
        if frames != 1 + rows * cols:
            raise ValueError(f"an image of size {tuple(image_size)} has 1 + {rows}x{cols} tiles, not {frames}")
        return [image_token_count(config, image_size, kernel)]
    if modality == MULTI_IMAGE:
        if configured_kernel[0] != 1 or stride[0] != 1:
            raise ValueError(f"multi-image pooling must keep images apart (kt = dt = 1), got {configured_kernel}/{stride}")
        per_image = pooled_token_count((1, side, side), configured_kernel, stride)
        return [per_image] * frames
    raise ValueError(f"modality {modality!r} has no visual tokens")


def visual_token_count(config: PPLLaVAConfig, modality: int, frames: int, kernel: Sequence[int] | None = None,
                       image_size: Sequence[int] | None = None) -> int:
    """Total pooled visual tokens of one sample (video 32 frames -> 1024 with the defaults)."""
    return sum(placeholder_token_counts(config, modality, frames, kernel, image_size))


def expand_image_placeholders(input_ids: Sequence[int], counts: Sequence[int], image_token_index: int) -> list[int]:
    """Replace the k-th image token of ``input_ids`` by ``counts[k]`` copies of it."""
    positions = [i for i, token in enumerate(input_ids) if token == image_token_index]
    if len(positions) != len(counts):
        raise ValueError(
            f"the text has {len(positions)} image placeholders but its visual input needs {len(counts)}"
        )
    expanded: list[int] = []
    placeholder = 0
    for token in input_ids:
        if token == image_token_index:
            expanded.extend([image_token_index] * counts[placeholder])
            placeholder += 1
        else:
            expanded.append(token)
    return expanded
