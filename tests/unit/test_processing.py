"""Pixels, any-resolution tiles and placeholder expansion agree with the model's pooling."""

import numpy as np
import pytest
import torch

from ppllava import IMAGE, MULTI_IMAGE, VIDEO, PPLLaVAConfig
from ppllava.processing import (
    CLIP_MEAN,
    CLIP_STD,
    anyres_tiles,
    expand_image_placeholders,
    frames_to_pixels,
    placeholder_token_counts,
    select_best_resolution,
    visual_token_count,
)

pytestmark = pytest.mark.unit


def test_paper_geometry_token_counts():
    config = PPLLaVAConfig()  # CLIP-L/14-336: 24x24 patches
    assert visual_token_count(config, VIDEO, 32) == 1024
    assert visual_token_count(config, VIDEO, 64, kernel=(4, 3, 3)) == 1024
    assert placeholder_token_counts(config, MULTI_IMAGE, 3) == [64, 64, 64]
    # base 64 tokens, then the grid mosaic (8 pooled rows per tile) with a newline per row:
    assert visual_token_count(config, IMAGE, 3, image_size=(336, 672)) == 64 + 8 * (16 + 1)   # 1x2, no padding
    assert visual_token_count(config, IMAGE, 5, image_size=(1000, 1000)) == 64 + 16 * (16 + 1)  # 2x2
    # 300x800 goes to the 1x3 grid (336x1008); 22 of the 24 pooled columns show the image
    assert visual_token_count(config, IMAGE, 4, image_size=(300, 800)) == 64 + 8 * (22 + 1)
    with pytest.raises(ValueError, match="has 1 \\+ 1x3 tiles, not 5"):
        visual_token_count(config, IMAGE, 5, image_size=(300, 800))
    assert visual_token_count(PPLLaVAConfig(pooling_mode="separate"), VIDEO, 32) == 608


def test_frames_are_resized_straight_and_clip_normalised():
    frame = np.zeros((20, 40, 3), dtype=np.uint8)
    frame[..., 0] = 255
    pixels = frames_to_pixels([frame, frame], size=16)
    assert pixels.shape == (2, 3, 16, 16)
    torch.testing.assert_close(pixels[0, 0], torch.full((16, 16), (1 - CLIP_MEAN[0]) / CLIP_STD[0]))
    torch.testing.assert_close(pixels[0, 1], torch.full((16, 16), -CLIP_MEAN[1] / CLIP_STD[1]))
    with pytest.raises(ValueError, match="RGB uint8"):
        frames_to_pixels([np.zeros((4, 4), dtype=np.uint8)], size=16)


def test_best_resolution_follows_llava_next():
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert select_best_resolution(300, 800, pinpoints) == (336, 1008)
    assert select_best_resolution(800, 300, pinpoints) == (1008, 336)
    assert select_best_resolution(1000, 1000, pinpoints) == (672, 672)


def test_anyres_tiles_are_base_plus_grid():
    image = np.random.default_rng(0).integers(0, 255, (30, 90, 3), dtype=np.uint8)
    tiles, grid = anyres_tiles(image, size=48, pinpoints=[[48, 96], [96, 48], [96, 96]])
    assert grid == (1, 2) and tiles.shape == (3, 3, 48, 48)


def test_placeholders_expand_in_order_and_mismatches_are_reported():
    assert expand_image_placeholders([1, 9, 5, 9, 2], [2, 3], image_token_index=9) == [1, 9, 9, 5, 9, 9, 9, 2]
    with pytest.raises(ValueError, match="1 image placeholders but its visual input needs 2"):
        expand_image_placeholders([1, 9, 2], [2, 3], image_token_index=9)


def test_the_pipeline_and_the_model_name_the_same_modalities():
    from pipeline.data.records import MODALITIES, VISUAL_MODALITIES
    from ppllava.config import MODALITY_NAMES

    assert sorted(MODALITIES) == sorted(MODALITY_NAMES.values())
    assert set(VISUAL_MODALITIES) == set(MODALITIES) - {"text"}


def test_anyres_resizes_with_ceil_and_pads_black_like_the_llava_next_processor():
    """100 x 301 into a 336 x 672 grid: the width fits (672), the height is ceil(100 * 672 / 301) =
    224 (rounding would give 223), centred from row (336 - 224) // 2 = 56 on black (0, not CLIP's mean)."""
    image = np.full((100, 301, 3), 255, dtype=np.uint8)
    tiles, grid = anyres_tiles(image, 336, [[336, 672]])
    assert grid == (1, 2)
    white = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    black = [-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    for row, colour in ((55, black), (56, white), (279, white), (280, black)):
        torch.testing.assert_close(tiles[1, :, row, 10], torch.tensor(colour), atol=1e-5, rtol=0, msg=f"row {row}")
