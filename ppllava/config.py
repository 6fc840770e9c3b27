"""PPLLaVAConfig: CLIP vision + CLIP text + an LLM config, plus the prompt-guided pooling settings."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ppllava.clip_text import extended_length

# Modalities of a sample, as integer ids the collate and the model agree on.
TEXT, IMAGE, MULTI_IMAGE, VIDEO = 0, 1, 2, 3
MODALITY_NAMES = {TEXT: "text", IMAGE: "image", MULTI_IMAGE: "multi_image", VIDEO: "video"}
# The label of a position the loss ignores (transformers' convention).
IGNORE_INDEX = -100

POOLING_MODES = ("weighted", "max", "separate", "multi_kernel")

# CLIP ViT-L/14-336 and CLIP ViT-L/14 text tower (the towers LLaVA-NeXT-7B and the paper use).
_CLIP_VISION_L14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "projection_dim": 768,
}
_CLIP_TEXT_L14_EXTENDED = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "max_position_embeddings": 248,
}


@strict
class PPLLaVAConfig(PreTrainedConfig):
    r"""
    Composite configuration of PPLLaVA.

    vision_config: CLIP vision tower (patch tokens of layer ``vision_feature_layer`` feed the model).
    clip_text_config: CLIP text tower, ``max_position_embeddings`` = extended context (248).
    text_config: the LLM (Llama / Mistral / Qwen2 / any causal LM transformers knows).
    projection_dim / logit_scale_init_value: CLIP's joint space and temperature (eq.1's tau = exp).
    video_kernel, image_kernel, multi_image_kernel: pooling windows (kt, kh, kw) per modality;
        the matching ``*_stride`` of None means stride = kernel.
    pooling_mode: "weighted" (eq.3, paper default); the baselines "average" (plain window mean, the
        prompt unused: PLLaVA / the authors' avp) and "none" (every visual token); or the Table 7
        ablations "max", "separate"
        (spatial and temporal pooled apart, concatenated), "multi_kernel" (two kernels, concatenated;
        the second one is ``second_video_kernel``).
    window_temperature: the official per-window softmax temperature (0.01); None = plain eq.3.
    clip_context_length / clip_keep_positions / clip_position_factor: eq.4 extension (77 -> 248).
    num_frames: frames sampled per video.
    bt_adapter_depth: 0 (the paper's LLaVA-NeXT start) or the number of last CLIP layers a
        BT-Adapter runs beside (the authors' released Vicuna models: 4); see ppllava.bt_adapter.
    bt_adapter_max_frames: rows of the adapter's time embedding (the longest clip it accepts).
    bt_adapter_drop_path: the adapter's stochastic-depth rate in training (the authors': 0.1).
    image_grid_pinpoints: LLaVA-NeXT any-resolution grid (height, width) pairs.
    """

    model_type = "ppllava"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=_CLIP_VISION_L14_336
        ),
        "clip_text_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_text_model", init_kwargs=_CLIP_TEXT_L14_EXTENDED
        ),
    }

    vision_config: dict | PreTrainedConfig | None = None
    clip_text_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int = -2
    projection_dim: int = 768
    logit_scale_init_value: float = 2.6592
    image_grid_pinpoints: list | None = None
    use_image_newline: bool = True
    num_frames: int = 32
    video_kernel: list | None = None
    video_stride: list | None = None
    image_kernel: list | None = None
    image_stride: list | None = None
    multi_image_kernel: list | None = None
    multi_image_stride: list | None = None
    second_video_kernel: list | None = None
    pooling_mode: Literal["weighted", "max", "average", "none", "separate", "multi_kernel"] = "weighted"
    window_temperature: float | None = 0.01
    clip_context_length: int = 248
    clip_keep_positions: int = 20
    clip_position_factor: int = 4
    tie_word_embeddings: bool = False
    bt_adapter_depth: int = 0
    bt_adapter_max_frames: int = 64
    bt_adapter_drop_path: float = 0.1

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        self.video_kernel = _triple(self.video_kernel, (2, 3, 3), "video_kernel")
        self.image_kernel = _triple(self.image_kernel, (1, 3, 3), "image_kernel")
        self.multi_image_kernel = _triple(self.multi_image_kernel, (1, 3, 3), "multi_image_kernel")
        self.video_stride = _triple(self.video_stride, self.video_kernel, "video_stride")
        self.image_stride = _triple(self.image_stride, self.image_kernel, "image_stride")
        self.multi_image_stride = _triple(self.multi_image_stride, self.multi_image_kernel, "multi_image_stride")
        self.second_video_kernel = _triple(self.second_video_kernel, (1, 6, 6), "second_video_kernel")
        if self.clip_text_config.max_position_embeddings != self.clip_context_length:
            raise ValueError(
                f"clip_text_config.max_position_embeddings={self.clip_text_config.max_position_embeddings} "
                f"must equal clip_context_length={self.clip_context_length}"
            )
        if not 0 < self.clip_keep_positions < self.clip_context_length:
            raise ValueError(f"clip_keep_positions={self.clip_keep_positions} must be in (0, {self.clip_context_length})")
        if not 0 <= self.bt_adapter_depth <= self.vision_config.num_hidden_layers:
            raise ValueError(f"bt_adapter_depth={self.bt_adapter_depth} must be in [0, "
                             f"{self.vision_config.num_hidden_layers}] (0 = no BT-Adapter; at most the vision layers)")
        layers = self.vision_config.num_hidden_layers
        if self.bt_adapter_depth and self.vision_feature_layer % (layers + 1) <= layers - self.bt_adapter_depth:
            raise ValueError(f"bt_adapter_depth={self.bt_adapter_depth} runs beside the last {self.bt_adapter_depth} of "
                             f"{layers} vision layers, all past vision_feature_layer={self.vision_feature_layer}: "
                             "it could not change the features")
        if self.bt_adapter_max_frames < 1 or not 0.0 <= self.bt_adapter_drop_path < 1.0:
            raise ValueError(f"bt_adapter_max_frames={self.bt_adapter_max_frames} must be >= 1 and "
                             f"bt_adapter_drop_path={self.bt_adapter_drop_path} in [0, 1)")
        if self.vision_config.projection_dim != self.projection_dim:
            self.vision_config.projection_dim = self.projection_dim
        if self.clip_text_config.projection_dim != self.projection_dim:
            self.clip_text_config.projection_dim = self.projection_dim

    @property
    def patches_per_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    def pooling_geometry(self, modality: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(kernel, stride) of a modality id (IMAGE, MULTI_IMAGE or VIDEO)."""
        if modality == VIDEO:
            return tuple(self.video_kernel), tuple(self.video_stride)
        if modality == IMAGE:
            return tuple(self.image_kernel), tuple(self.image_stride)
        if modality == MULTI_IMAGE:
            return tuple(self.multi_image_kernel), tuple(self.multi_image_stride)
        raise ValueError(f"modality {modality!r} has no pooling geometry (expected 1, 2 or 3)")

    @classmethod
    def tiny(cls, **overrides) -> "PPLLaVAConfig":
        """A few-MB PPLLaVA for tests and the CPU demo, with the paper's pooling kernels.

        48x48 frames of 8x8 patches (a 6x6 grid, so (1,3,3) gives 4 tokens per frame and 8 video
        frames with (2,3,3) give 16), 3-layer CLIP vision tower, 2-layer CLIP text tower with
        16 -> 52 positions (keep 4), 2-layer Llama. Any key can be overridden;
        ``text_config`` / ``vision_config`` / ``clip_text_config`` dicts are merged into the
        tiny defaults.
        """
        vision = {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "patch_size": 8,
            "image_size": 48,
            "projection_dim": 16,
        }
        keep, factor, original = 4, 4, 16
        clip_text = {
            "model_type": "clip_text_model",
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": extended_length(original, keep, factor),
            "projection_dim": 16,
            "bos_token_id": 126,
            "eos_token_id": 127,
            "pad_token_id": 0,
        }
        llm = {
            "model_type": "llama",
            "vocab_size": 160,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        }
        vision.update(overrides.pop("vision_config", {}) or {})
        clip_text.update(overrides.pop("clip_text_config", {}) or {})
        llm.update(overrides.pop("text_config", {}) or {})
        settings = {
            "image_token_index": 159,
            "projection_dim": 16,
            # CLIP's trained temperature (tau = 100), as the real towers carry it: eq.1 as sharp as in
            # the real model (the untrained CLIP default, tau = 14, barely tells tokens apart).
            "logit_scale_init_value": 4.6052,
            "num_frames": 8,
            "second_video_kernel": [1, 6, 6],
            "image_grid_pinpoints": [[48, 96], [96, 48], [96, 96]],
            "clip_context_length": clip_text["max_position_embeddings"],
            "clip_keep_positions": keep,
            "clip_position_factor": factor,
        }
        settings.update(overrides)
        return cls(vision_config=vision, clip_text_config=clip_text, text_config=llm, **settings)


def _triple(value, default, name: str) -> list[int]:
    value = list(default if value is None else value)
    if len(value) != 3 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"{name} must be three positive integers (t, h, w), got {value!r}")
    return value
