"""Prompt-guided pooling (paper §3.2, eq.1-3), pure torch.

    relevance           eq.1  s = softmax(tau * <c, f(v)>) over all T*H*W tokens of a sample
    pooled_size         eq.2  T' = (T - kt) // dt + 1   (floor: a trailing remainder is dropped)
    prompt_guided_pool  eq.3  v'(t,h,w) = sum over the window of v * weight

The official code renormalises the relevance inside each window with a softmax at temperature
0.01 before the weighted sum; that is the default here, and ``window_temperature=None`` gives
the plain eq.3 sum with the raw s.

The weighted window sum is one autograd Function that loops over the kt*kh*kw *kernel offsets*
(18 for the video default), each step a strided multiply-add over every window of the batch at
once. That reads the input exactly once and never materialises an input-sized product or an
unfolded copy; its backward writes one input-sized gradient. There is no Conv3d and no
AdaptiveAvgPool3d anywhere (both are traps on Ascend 910B in bf16), and no device branch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Triple = tuple[int, int, int]


def relevance(visual_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Eq.1. ``visual_embeds`` [B, N, D], ``text_embeds`` [B, D] -> softmax over N, [B, N].

    Both are L2-normalised here; ``logit_scale`` is CLIP's log temperature (tau = exp of it).
    Computed in fp32: with tau ~ 100 a bf16 softmax over 18k tokens loses most of its mass.
    """
    visual = F.normalize(visual_embeds.float(), dim=-1)
    text = F.normalize(text_embeds.float(), dim=-1)
    logits = logit_scale.float().exp() * torch.einsum("bnd,bd->bn", visual, text)
    return logits.softmax(dim=-1)


def pooled_size(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int] | None = None) -> Triple:
    """Eq.2 with floor. Fewer frames than kt count as kt (the pool repeats the last frame)."""
    stride = kernel if stride is None else stride
    frames = max(size[0], kernel[0])
    return tuple((n - k) // d + 1 for n, k, d in zip((frames, size[1], size[2]), kernel, stride))  # type: ignore


def _offset_slices(kernel: Sequence[int], stride: Sequence[int], out_size: Sequence[int]):
    """For each kernel offset (i, j, k): the [T', H', W'] strided slice of the input it touches."""
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            for k in range(kernel[2]):
                yield (i, j, k), (
                    slice(None),
                    slice(i, i + stride[0] * (out_size[0] - 1) + 1, stride[0]),
                    slice(j, j + stride[1] * (out_size[1] - 1) + 1, stride[1]),
                    slice(k, k + stride[2] * (out_size[2] - 1) + 1, stride[2]),
                )


class _WindowWeightedSum(torch.autograd.Function):
    """out[b,t,h,w] = sum_{i,j,k} features[b, t*dt+i, h*dh+j, w*dw+k] * weights[b,t,h,w,i,j,k]."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weights: torch.Tensor, kernel: Triple, stride: Triple) -> torch.Tensor:
        out_size = weights.shape[1:4]
        # fp32 accumulation: 18 bf16 additions in a row would cost about two bits of precision.
        accumulate = torch.promote_types(features.dtype, torch.float32)
        out = torch.zeros((*weights.shape[:4], features.shape[-1]), dtype=accumulate, device=features.device)
        for (i, j, k), where in _offset_slices(kernel, stride, out_size):
            out.addcmul_(features[where], weights[..., i, j, k, None])
        ctx.save_for_backward(features, weights)
        ctx.kernel, ctx.stride = kernel, stride
        return out.to(features.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        features, weights = ctx.saved_tensors
        out_size = weights.shape[1:4]
        grad_features = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_features = torch.zeros_like(features)
        if ctx.needs_input_grad[1]:
            grad_weights = torch.empty_like(weights)
        for (i, j, k), where in _offset_slices(ctx.kernel, ctx.stride, out_size):
            if grad_features is not None:
                grad_features[where].addcmul_(grad_out, weights[..., i, j, k, None].to(grad_out.dtype))
            if grad_weights is not None:
                accumulate = torch.promote_types(features.dtype, torch.float32)
                grad_weights[..., i, j, k] = torch.linalg.vecdot(grad_out.to(accumulate), features[where].to(accumulate))
        return grad_features, grad_weights, None, None


def _windows(values: torch.Tensor, kernel: Triple, stride: Triple) -> torch.Tensor:
    """[B, T, H, W] -> [B, T', H', W', kt, kh, kw] (a view: unfold copies nothing)."""
    return values.unfold(1, kernel[0], stride[0]).unfold(2, kernel[1], stride[1]).unfold(3, kernel[2], stride[2])


def _repeat_last_frame(values: torch.Tensor, frames: int) -> torch.Tensor:
    missing = frames - values.shape[1]
    if missing <= 0:
        return values
    return torch.cat([values, values[:, -1:].expand(-1, missing, *values.shape[2:])], dim=1)


def window_weights(
    relevance: torch.Tensor, kernel: Triple, stride: Triple, window_temperature: float | None, reduce: str = "weighted"
) -> torch.Tensor:
    """Per-window weights [B, T', H', W', kt, kh, kw] from eq.1 relevance [B, T, H, W].

    weighted: softmax(s / temperature) inside each window (official), or s itself (plain eq.3).
    max: one-hot on the most relevant token of each window (Table 7's prompt-guided max pooling).
    average: every token of the window alike, whatever the prompt (PLLaVA's pooling, the authors'
    `avp` baseline): the same windows and token count without the guidance.
    """
    windows = _windows(relevance.to(torch.promote_types(relevance.dtype, torch.float32)), kernel, stride)
    flat = windows.flatten(start_dim=4)
    if reduce == "max":
        weights = F.one_hot(flat.argmax(dim=-1), flat.shape[-1]).to(flat.dtype)
    elif reduce == "weighted":
        weights = flat if window_temperature is None else (flat / window_temperature).softmax(dim=-1)
    elif reduce == "average":
        weights = torch.full_like(flat, 1.0 / flat.shape[-1])
    else:
        raise ValueError(f"reduce must be 'weighted', 'max' or 'average', got {reduce!r}")
    return weights.reshape(windows.shape)


def prompt_guided_pool(
    features: torch.Tensor,
    relevance: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int] | None = None,
    window_temperature: float | None = 0.01,
    reduce: str = "weighted",
) -> torch.Tensor:
    """Eq.3: pool ``features`` [B, T, H, W, C] with windows weighted by ``relevance`` [B, T, H, W].

    Returns [B, T', H', W', C] (eq.2 sizes). Fewer frames than kt: the last frame is repeated.
    Output dtype = features dtype; the sum is accumulated in fp32.
    """
    kernel = tuple(int(k) for k in kernel)
    stride = kernel if stride is None else tuple(int(d) for d in stride)
    if len(kernel) != 3 or len(stride) != 3 or min(kernel + stride) < 1:
        raise ValueError(f"kernel and stride must be three positive ints, got {kernel} and {stride}")
    if features.dim() != 5 or relevance.shape != features.shape[:4]:
        raise ValueError(
            f"features must be [B, T, H, W, C] and relevance [B, T, H, W]; got {tuple(features.shape)} "
            f"and {tuple(relevance.shape)}"
        )
    if features.shape[2] < kernel[1] or features.shape[3] < kernel[2]:
        raise ValueError(f"spatial size {tuple(features.shape[2:4])} is smaller than the kernel {kernel[1:]}")
    features = _repeat_last_frame(features, kernel[0])
    relevance = _repeat_last_frame(relevance, kernel[0])
    weights = window_weights(relevance, kernel, stride, window_temperature, reduce)
    return _WindowWeightedSum.apply(features, weights, kernel, stride)


POOLING_MODES = ("weighted", "max", "average", "none", "separate", "multi_kernel")


def pool_tokens(
    features: torch.Tensor,
    relevance: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int] | None = None,
    window_temperature: float | None = 0.01,
    mode: str = "weighted",
    second_kernel: Sequence[int] | None = None,
) -> torch.Tensor:
    """Pool one modality's features into a token sequence [B, N, C], by pooling mode (Table 7).

    weighted      eq.3 with ``kernel``/``stride`` (the paper's method)
    max           the most relevant token of each window
    average       the plain mean of each window, prompt unused (PLLaVA; the authors' `avp` baseline)
    none          every visual token, unpooled (T*H*W of them: only for small grids)
    separate      spatial and temporal pooled apart: every (h, w) over all frames (H*W tokens),
                  then every frame over all positions (T tokens); 576 + 32 = 608 for a video
    multi_kernel  ``kernel`` and ``second_kernel`` pools concatenated ((1,6,6)+(8,2,2) -> 1088)
    """
    def pooled(k, d=None, reduce="weighted"):
        out = prompt_guided_pool(features, relevance, k, d, window_temperature, reduce)
        return out.flatten(start_dim=1, end_dim=3)

    frames, height, width = features.shape[1:4]
    if mode == "weighted":
        return pooled(kernel, stride)
    if mode in ("max", "average"):
        return pooled(kernel, stride, reduce=mode)
    if mode == "none":
        return features.flatten(start_dim=1, end_dim=3)
    if mode == "separate":
        return torch.cat([pooled((frames, 1, 1)), pooled((1, height, width))], dim=1)
    if mode == "multi_kernel":
        if second_kernel is None:
            raise ValueError("pooling mode 'multi_kernel' needs second_kernel")
        return torch.cat([pooled(kernel, stride), pooled(second_kernel)], dim=1)
    raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")


def pooled_token_count(
    size: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int] | None = None,
    mode: str = "weighted",
    second_kernel: Sequence[int] | None = None,
) -> int:
    """How many tokens :func:`pool_tokens` returns for a [T, H, W] grid (the processor needs it)."""
    def count(k, d=None):
        t, h, w = pooled_size(size, k, d)
        return t * h * w

    if mode in ("weighted", "max", "average"):
        return count(kernel, stride)
    if mode == "none":
        return size[0] * size[1] * size[2]
    if mode == "separate":
        return size[1] * size[2] + max(size[0], 1)
    if mode == "multi_kernel":
        return count(kernel, stride) + count(second_kernel)
    raise ValueError(f"unknown pooling mode {mode!r}")
