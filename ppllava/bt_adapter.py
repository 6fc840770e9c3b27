"""BT-Adapter: a spatio-temporal side branch beside the last CLIP layers (the authors' released model).

The paper describes PPLLaVA on a LLaVA-NeXT start; the authors' released Vicuna models add a
BT-Adapter (Liu et al., "One for All: Video Conversation is Feasible Without Video Instruction
Tuning") to the frozen CLIP tower, and their vision features pass through it. It never changes
CLIP's own stream: it reads the outputs of CLIP's last ``depth`` layers and keeps a state of its own,

    state = (one class token per clip [n, D], patch tokens [n, P, T, D])

built from the first adapter layer's CLIP output (CLIP's position table, a learned time
embedding and the adapter's own class token) and, for every later layer, the previous adapter
state plus that layer's CLIP output. Each adapter layer is a temporal block (attention over the T
frames at each patch position, through a zero-initialised linear, so an untrained adapter leaves
its input unchanged) followed by a spatial block (attention over each frame's patches with the
clip's class token, then CLIP's MLP). The feature the LLM sees at a CLIP layer the adapter has
reached is that layer's CLIP patch tokens averaged with the adapter's (the class token stays CLIP's).

A "clip" is a video sample's frames, a multi-image sample's images (T = number of images), or a
single image tile (T = 1), as in the authors' code. Clips of the same length are batched together.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPMLP


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the whole residual branch of a random subset of rows (dim 0),
    scaling the kept ones by 1 / (1 - rate)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class ZeroInitLinear(nn.Linear):
    """A linear layer the model's weight initialisation sets to zero (the temporal block's output)."""


class TemporalAdapterLayer(GradientCheckpointingLayer):
    """Attention over time at every patch position; the class token passes through unchanged."""

    def __init__(self, vision_config, drop_path_rate: float) -> None:
        super().__init__()
        width = vision_config.hidden_size
        self.layer_norm1 = nn.LayerNorm(width)
        self.self_attn = CLIPAttention(vision_config)
        self.temporal_fc = ZeroInitLinear(width, width)
        self.drop_path_rate = drop_path_rate

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clips, positions, frames, width = patches.shape
        tubes = patches.reshape(clips * positions, frames, width)
        attended, _ = self.self_attn(self.layer_norm1(tubes))
        update = self.temporal_fc(drop_path(attended, self.drop_path_rate, self.training))
        return cls, patches + update.reshape(clips, positions, frames, width)


class SpatialAdapterLayer(GradientCheckpointingLayer):
    """A CLIP encoder layer over each frame (its patches with the clip's class token in front);
    the class token's update is the mean of its per-frame updates."""

    def __init__(self, vision_config, drop_path_rate: float) -> None:
        super().__init__()
        width = vision_config.hidden_size
        self.self_attn = CLIPAttention(vision_config)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = CLIPMLP(vision_config)
        self.layer_norm2 = nn.LayerNorm(width)
        self.drop_path_rate = drop_path_rate

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clips, positions, frames, width = patches.shape
        per_frame = torch.cat(
            [cls[:, None, None, :].expand(clips, frames, 1, width), patches.transpose(1, 2)], dim=2
        ).reshape(clips * frames, 1 + positions, width)
        attended, _ = self.self_attn(self.layer_norm1(per_frame))
        attended = drop_path(attended, self.drop_path_rate, self.training).reshape(clips, frames, 1 + positions, width)
        tokens = torch.cat([
            (cls + attended[:, :, 0].mean(dim=1))[:, None],
            (patches + attended[:, :, 1:].transpose(1, 2)).reshape(clips, positions * frames, width),
        ], dim=1)
        tokens = tokens + self.mlp(self.layer_norm2(tokens))
        return tokens[:, 0], tokens[:, 1:].reshape(clips, positions, frames, width)


class BTAdapter(nn.Module):
    """The adapter's layers and embeddings; :meth:`features` mixes it into a CLIP hidden state.

    Stochastic depth as the authors' released code has it: the spatial blocks' rates rise
    linearly from 0 to ``drop_path_rate``; every temporal block uses ``drop_path_rate``.
    """

    def __init__(self, vision_config, depth: int, max_frames: int, drop_path_rate: float) -> None:
        super().__init__()
        if not 0 < depth <= vision_config.num_hidden_layers:
            raise ValueError(f"bt_adapter_depth={depth} must be in [1, {vision_config.num_hidden_layers}] "
                             "(the vision tower's layer count)")
        width = vision_config.hidden_size
        spatial_rates = np.linspace(0.0, drop_path_rate, depth).tolist()
        self.temporal_layers = nn.ModuleList(TemporalAdapterLayer(vision_config, drop_path_rate) for _ in range(depth))
        self.spatial_layers = nn.ModuleList(SpatialAdapterLayer(vision_config, rate) for rate in spatial_rates)
        self.time_embedding = nn.Embedding(max_frames, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))

    @property
    def depth(self) -> int:
        return len(self.spatial_layers)

    @property
    def max_frames(self) -> int:
        return self.time_embedding.num_embeddings

    def layers_used(self, num_clip_layers: int, feature_index: int) -> int:
        """How many adapter layers reach CLIP hidden state ``feature_index`` (0 = the embeddings,
        ``num_clip_layers`` = the last layer's output); the rest cannot change the features."""
        first = num_clip_layers - self.depth  # the first CLIP layer the adapter reads the output of
        return max(0, min(self.depth, feature_index - first))

    def features(
        self, hidden_states: tuple[torch.Tensor, ...], feature_index: int, clip_lengths: list[int],
        position_embedding: nn.Embedding,
    ) -> torch.Tensor:
        """CLIP hidden state ``feature_index`` [F, 1+P, D] with the adapter mixed into its patch tokens.

        ``hidden_states``: CLIP's (embeddings, layer 1 output, ..., layer L output), frames of all
        clips in order; ``clip_lengths`` splits the F frames into clips. ``position_embedding``:
        CLIP's positional table (a module, called, so that ZeRO-3 gathers it).
        """
        features = hidden_states[feature_index]
        used = self.layers_used(len(hidden_states) - 1, feature_index)
        if used == 0:
            return features
        if sum(clip_lengths) != features.shape[0]:
            raise ValueError(f"clip lengths sum to {sum(clip_lengths)} but the vision tower saw {features.shape[0]} frames")
        if max(clip_lengths) > self.max_frames:
            raise ValueError(f"a clip of {max(clip_lengths)} frames exceeds the BT-Adapter's time embedding "
                             f"({self.max_frames} frames, config bt_adapter_max_frames)")
        first_read = len(hidden_states) - self.depth  # hidden-state index of the first adapter input
        starts = np.cumsum([0] + list(clip_lengths))[:-1].tolist()
        mixed = features
        for length in sorted(set(clip_lengths)):
            rows = torch.cat([torch.arange(start, start + length) for start, n in zip(starts, clip_lengths) if n == length])
            rows = rows.to(features.device)
            states = [hidden_states[first_read + j].index_select(0, rows) for j in range(used)]
            cls, patches = self._run(states, length, position_embedding)
            own = features.index_select(0, rows)
            clips, positions = patches.shape[:2]
            adapter_patches = patches.transpose(1, 2).reshape(clips * length, positions, -1)
            combined = torch.cat([own[:, :1], (own[:, 1:] + adapter_patches.to(own.dtype)) / 2], dim=1)
            mixed = mixed.index_copy(0, rows, combined)
        return mixed

    def _run(self, clip_states: list[torch.Tensor], frames: int, position_embedding: nn.Embedding):
        """The adapter state after ``len(clip_states)`` layers, for clips of ``frames`` frames each.

        clip_states[j]: the output of the CLIP layer adapter layer j reads, [n·frames, 1+P, D].
        """
        cls, patches = None, None
        for j, state in enumerate(clip_states):
            state = state.reshape(-1, frames, *state.shape[1:])  # [n, T, 1+P, D]
            frame_cls = state[:, :, 0].mean(dim=1)
            frame_patches = state[:, :, 1:].transpose(1, 2)  # [n, P, T, D]
            if j == 0:
                cls, patches = self._initial_state(frame_cls, frame_patches, position_embedding)
            else:
                cls, patches = cls + frame_cls, patches + frame_patches
            cls, patches = self.temporal_layers[j](cls, patches)
            cls, patches = self.spatial_layers[j](cls, patches)
        return cls, patches

    def _initial_state(self, frame_cls: torch.Tensor, frame_patches: torch.Tensor, position_embedding: nn.Embedding):
        """The first layer's input: CLIP positions and the time embedding on the patches; the class
        token is the mean of the frames' CLIP class tokens and the adapter's own (positioned) one."""
        positions, frames = frame_patches.shape[1:3]
        table = position_embedding(torch.arange(1 + positions, device=frame_patches.device)).to(frame_patches.dtype)
        times = self.time_embedding(torch.arange(frames, device=frame_patches.device)).to(frame_patches.dtype)
        patches = frame_patches + table[1:, None, :] + times[None, :, :]
        own_cls = self.cls_token.reshape(-1).to(frame_cls.dtype) + table[0]
        return (frame_cls + own_cls) / 2, patches
