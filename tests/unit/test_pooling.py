"""prompt_guided_pool against a literal loop transcription of the paper's eq.1-3."""

import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from ppllava.pooling import pool_tokens, pooled_size, pooled_token_count, prompt_guided_pool, relevance

pytestmark = pytest.mark.unit


def naive_pool(features, scores, kernel, stride, window_temperature):
    """Eq.3 written out with one Python loop per axis, window softmax done by hand."""
    batch, frames, height, width, channels = features.shape
    if frames < kernel[0]:
        pad = kernel[0] - frames
        features = torch.cat([features] + [features[:, -1:]] * pad, dim=1)
        scores = torch.cat([scores] + [scores[:, -1:]] * pad, dim=1)
        frames = kernel[0]
    out_t = (frames - kernel[0]) // stride[0] + 1
    out_h = (height - kernel[1]) // stride[1] + 1
    out_w = (width - kernel[2]) // stride[2] + 1
    out = torch.zeros(batch, out_t, out_h, out_w, channels, dtype=torch.float64)
    for b, t, h, w in itertools.product(range(batch), range(out_t), range(out_h), range(out_w)):
        cells = [
            (t * stride[0] + i, h * stride[1] + j, w * stride[2] + k)
            for i in range(kernel[0])
            for j in range(kernel[1])
            for k in range(kernel[2])
        ]
        raw = [float(scores[b, ti, hi, wi]) for ti, hi, wi in cells]
        if window_temperature is None:
            weights = raw
        else:
            exps = [math.exp((s - max(raw)) / window_temperature) for s in raw]
            weights = [e / sum(exps) for e in exps]
        for weight, (ti, hi, wi) in zip(weights, cells):
            out[b, t, h, w] += weight * features[b, ti, hi, wi].double()
    return out


def random_inputs(batch, frames, height, width, channels=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, frames, height, width, channels, generator=generator)
    logits = 3 * torch.randn(batch, frames * height * width, generator=generator)
    scores = logits.softmax(dim=-1).reshape(batch, frames, height, width)
    return features, scores


CASES = [
    # (name, (T, H, W), kernel, stride)
    ("video", (8, 6, 6), (2, 3, 3), None),
    ("image", (1, 6, 6), (1, 3, 3), None),
    ("multi_image", (3, 6, 6), (1, 3, 3), None),
    ("video_overlapping", (7, 7, 8), (2, 3, 3), (1, 2, 2)),
    ("video_gappy", (9, 8, 7), (2, 2, 3), (3, 3, 2)),
    ("temporal_only", (6, 4, 4), (3, 1, 1), (2, 1, 1)),
]


@pytest.mark.parametrize("name,size,kernel,stride", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("window_temperature", [0.01, None, 0.5])
def test_pool_matches_naive_eq3(name, size, kernel, stride, window_temperature):
    features, scores = random_inputs(2, *size)
    expected = naive_pool(features, scores, kernel, stride or kernel, window_temperature)
    # random_inputs' scores come from logits of spread 3, so s / 0.01 spans tens of units and the
    # official window softmax is far from a plain mean here (max difference > 1.6 in every case).
    got = prompt_guided_pool(features, scores, kernel, stride, window_temperature)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_window_softmax_is_not_a_plain_mean():
    features, scores = random_inputs(1, 2, 3, 3)
    scores = scores * 0 + torch.linspace(0, 0.05, 18).reshape(1, 2, 3, 3)
    official = prompt_guided_pool(features, scores, (2, 3, 3))
    mean = features.mean(dim=(1, 2, 3), keepdim=True)
    assert (official - mean).abs().max() > 0.05
    torch.testing.assert_close(official.double(), naive_pool(features, scores, (2, 3, 3), (2, 3, 3), 0.01), atol=1e-5, rtol=1e-5)


def test_paper_token_counts():
    assert math.prod(pooled_size((32, 24, 24), (2, 3, 3))) == 1024
    assert math.prod(pooled_size((1, 24, 24), (1, 3, 3))) == 64
    assert math.prod(pooled_size((64, 24, 24), (4, 3, 3))) == 1024
    assert pooled_token_count((32, 24, 24), None, mode="separate") == 608
    assert pooled_token_count((32, 24, 24), (1, 6, 6), mode="multi_kernel", second_kernel=(8, 2, 2)) == 1088
    assert pooled_token_count((32, 24, 24), (4, 3, 3), mode="multi_kernel", second_kernel=(2, 4, 4)) == 1088
    features, scores = random_inputs(1, 32, 24, 24, channels=4)
    assert prompt_guided_pool(features, scores, (2, 3, 3)).shape == (1, 16, 8, 8, 4)


@pytest.mark.parametrize(
    "mode,kernel,second", [("weighted", (2, 3, 3), None), ("max", (2, 3, 3), None), ("separate", (2, 3, 3), None),
                           ("average", (2, 3, 3), None), ("none", (2, 3, 3), None),
                           ("multi_kernel", (1, 6, 6), (8, 2, 2)), ("multi_kernel", (4, 3, 3), (2, 4, 4))]
)
def test_pool_tokens_counts_match_pooled_token_count(mode, kernel, second):
    features, scores = random_inputs(1, 32, 24, 24, channels=3)
    tokens = pool_tokens(features, scores, kernel, mode=mode, second_kernel=second)
    assert tokens.shape == (1, pooled_token_count((32, 24, 24), kernel, mode=mode, second_kernel=second), 3)


def test_max_mode_takes_the_most_relevant_token_of_each_window():
    features, scores = random_inputs(1, 4, 6, 6)
    pooled = prompt_guided_pool(features, scores, (2, 3, 3), reduce="max")
    for t, h, w in itertools.product(range(2), range(2), range(2)):
        window = scores[0, 2 * t : 2 * t + 2, 3 * h : 3 * h + 3, 3 * w : 3 * w + 3]
        i, j, k = divmod(int(window.argmax()), 9)[0], *divmod(int(window.argmax()) % 9, 3)
        torch.testing.assert_close(pooled[0, t, h, w], features[0, 2 * t + i, 3 * h + j, 3 * w + k])


def test_average_mode_is_the_plain_window_mean_whatever_the_prompt():
    """PLLaVA's pooling / the authors' avp baseline: torch's avg_pool3d over the same windows."""
    features, scores = random_inputs(1, 4, 6, 6, channels=5)
    tokens = pool_tokens(features, scores, (2, 3, 3), mode="average")
    expected = torch.nn.functional.avg_pool3d(features[0].permute(3, 0, 1, 2), (2, 3, 3)).permute(1, 2, 3, 0)
    torch.testing.assert_close(tokens[0], expected.reshape(-1, 5), atol=1e-6, rtol=1e-5)
    other = pool_tokens(features, torch.rand_like(scores), (2, 3, 3), mode="average")
    torch.testing.assert_close(tokens, other)  # the prompt's relevance does not enter


def test_none_mode_passes_every_visual_token():
    features, scores = random_inputs(1, 2, 6, 6, channels=5)
    tokens = pool_tokens(features, scores, (2, 3, 3), mode="none")
    assert torch.equal(tokens[0], features[0].reshape(-1, 5)) and tokens.shape[1] == pooled_token_count((2, 6, 6), (2, 3, 3), mode="none")


def test_separate_mode_is_spatial_then_temporal_weighted_pools():
    features, scores = random_inputs(1, 4, 6, 6)
    tokens = pool_tokens(features, scores, (2, 3, 3), mode="separate")
    spatial = naive_pool(features, scores, (4, 1, 1), (4, 1, 1), 0.01).reshape(36, -1)
    temporal = naive_pool(features, scores, (1, 6, 6), (1, 6, 6), 0.01).reshape(4, -1)
    torch.testing.assert_close(tokens[0].double(), torch.cat([spatial, temporal]), atol=1e-5, rtol=1e-5)


def test_fewer_frames_than_kernel_repeat_the_last_frame():
    features, scores = random_inputs(1, 1, 6, 6)
    single = prompt_guided_pool(features, scores, (2, 3, 3))
    doubled = prompt_guided_pool(features.repeat(1, 2, 1, 1, 1), scores.repeat(1, 2, 1, 1), (2, 3, 3))
    torch.testing.assert_close(single, doubled)
    assert single.shape == (1, 1, 2, 2, 5)


def test_trailing_remainder_is_dropped():
    features, scores = random_inputs(1, 5, 7, 6)
    full = prompt_guided_pool(features, scores, (2, 3, 3))
    cropped = prompt_guided_pool(features[:, :4, :6], scores[:, :4, :6], (2, 3, 3))
    assert full.shape == (1, 2, 2, 2, 5)
    torch.testing.assert_close(full, cropped)


def test_relevance_is_a_softmax_over_all_tokens():
    generator = torch.Generator().manual_seed(1)
    visual, text = torch.randn(3, 40, 8, generator=generator), torch.randn(3, 8, generator=generator)
    logit_scale = torch.tensor(math.log(100.0))
    scores = relevance(visual, text, logit_scale)
    torch.testing.assert_close(scores.sum(dim=-1), torch.ones(3))
    cosine = torch.nn.functional.cosine_similarity(visual, text[:, None], dim=-1)
    torch.testing.assert_close(scores, (100 * cosine).softmax(dim=-1), atol=1e-6, rtol=1e-5)


def test_bf16_matches_fp32():
    features, scores = random_inputs(2, 8, 6, 6, channels=16)
    full = prompt_guided_pool(features, scores, (2, 3, 3))
    half = prompt_guided_pool(features.bfloat16(), scores.bfloat16(), (2, 3, 3))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("window_temperature", [0.5, None])
def test_gradients_match_finite_differences(window_temperature):
    features, scores = random_inputs(1, 3, 5, 4, channels=2)
    features = features.double().requires_grad_()
    scores = scores.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f, s: prompt_guided_pool(f, s, (2, 3, 2), (1, 2, 1), window_temperature), (features, scores)
    )


def test_bad_shapes_are_reported():
    features, scores = random_inputs(1, 2, 6, 6)
    with pytest.raises(ValueError, match="relevance"):
        prompt_guided_pool(features, scores[:, :1], (1, 3, 3))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        prompt_guided_pool(features, scores, (1, 7, 7))
    with pytest.raises(ValueError, match="positive"):
        prompt_guided_pool(features, scores, (0, 3, 3))


def test_model_package_has_no_device_branch_or_banned_ops():
    source = "\n".join(p.read_text() for p in Path(__file__).resolve().parents[2].joinpath("ppllava").glob("*.py"))
    # Word-bounded: "npu" is also a substring of "input".
    device_words = re.findall(r"\b(?:cuda|npu|torch_npu|is_cuda|device\.type)\b", source, flags=re.IGNORECASE)
    assert device_words == []
    banned_calls = re.findall(r"\b(?:Conv3d|conv3d|AdaptiveAvgPool3d|adaptive_avg_pool3d)\s*\(", source)
    assert banned_calls == []
