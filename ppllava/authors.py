"""The authors' released PPLLaVA checkpoints (farewellthree/ppllava_weight) as our model.

A released directory is what their training saved with ``save_pretrained``: ``config.json`` (a
LLaVA-NeXT config carrying their pooling keys: ``pooling``, ``pooling_kernel``, ``btadapter``,
``clip_weight``, ...) and ``model*.safetensors`` (or ``*.bin``) with their module names:

    theirs                                                   ours
    vision_tower.vision_model.{embeddings,pre_layrnorm,      vision_tower.{...}
        encoder}.*
    vision_tower.vision_model.btadapter_S_layers.j.*         bt_adapter.spatial_layers.j.*
    vision_tower.vision_model.btadapter_T_layers.j.*         bt_adapter.temporal_layers.j.*
    vision_tower.vision_model.btadapter_time_embed.weight    bt_adapter.time_embedding.weight
    vision_tower.vision_model.btadapter_cls_token            bt_adapter.cls_token
    multi_modal_projector.linear_{1,2}.*                     multi_modal_projector.linear_{1,2}.*
    multi_modal_projector.clip_text_model.*                  clip_text.*  (positions: see below)
    multi_modal_projector.clip_visual_ln.*                   vision_tower.post_layernorm.*
    multi_modal_projector.clip_visual_projection.weight      visual_projection.weight
    multi_modal_projector.clip_text_projection.weight        text_projection.weight
    multi_modal_projector.logit_scale                        logit_scale
    image_newline, language_model.*                          the same

Two of their tensors are not carried over, on purpose: ``vision_tower.vision_model.post_layernorm``
only normalises the vision tower's pooled class token, which neither model uses (our
``vision_tower.post_layernorm`` is the relevance branch's layernorm, their ``clip_visual_ln``);
and of the extended CLIP text positions, ``position_embedding`` is read for the first
``keep`` (20) rows and ``position_embedding_res`` for the rest, as their forward masks them.

Their config does not hold the CLIP text tower's shape (their code reads it from ``clip_weight``
at load time), so it comes from ``clip_config`` (a CLIP directory or config.json), from
``clip_weight`` when that is a local directory, or from the known OpenAI CLIP-L/14 text tower.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPVisionConfig

from ppllava.clip_text import extended_length
from ppllava.config import PPLLaVAConfig
from ppllava.modeling import PPLLaVAForConditionalGeneration

logger = logging.getLogger(__name__)

# The file our model directories keep their input settings in (pipeline.layout.PROCESSOR_CONFIG).
PROCESSOR_CONFIG = "processor_config.json"

# Their ExtendTextEmbeddings: 248 positions, the first 20 from the frozen table.
AUTHORS_CLIP_CONTEXT, AUTHORS_KEEP_POSITIONS, AUTHORS_POSITION_FACTOR = 248, 20, 4

# OpenAI's CLIP ViT-L/14 (and -336) text tower: the one every released Vicuna model uses.
_OPENAI_CLIP_L14_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
KNOWN_CLIP_TEXT = {
    "openai/clip-vit-large-patch14-336": (_OPENAI_CLIP_L14_TEXT, 768),
    "openai/clip-vit-large-patch14": (_OPENAI_CLIP_L14_TEXT, 768),
}

_VISION = "vision_tower.vision_model."
_PROJECTOR = "multi_modal_projector."
# (their prefix, our prefix), first match wins; anything else is unexpected.
_RENAMES = (
    (_VISION + "btadapter_S_layers.", "bt_adapter.spatial_layers."),
    (_VISION + "btadapter_T_layers.", "bt_adapter.temporal_layers."),
    (_VISION + "btadapter_time_embed.", "bt_adapter.time_embedding."),
    (_VISION + "btadapter_cls_token", "bt_adapter.cls_token"),
    (_VISION + "embeddings.", "vision_tower.embeddings."),
    (_VISION + "pre_layrnorm.", "vision_tower.pre_layrnorm."),
    (_VISION + "encoder.", "vision_tower.encoder."),
    (_PROJECTOR + "linear_", "multi_modal_projector.linear_"),
    (_PROJECTOR + "clip_text_model.", "clip_text."),
    (_PROJECTOR + "clip_visual_ln.", "vision_tower.post_layernorm."),
    (_PROJECTOR + "clip_visual_projection.", "visual_projection."),
    (_PROJECTOR + "clip_text_projection.", "text_projection."),
    (_PROJECTOR + "logit_scale", "logit_scale"),
    ("image_newline", "image_newline"),
    ("language_model.", "language_model."),
)
# Tensors of theirs that carry nothing ours needs (see the module docstring).
_NOT_CARRIED = re.compile(
    r"^vision_tower\.vision_model\.post_layernorm\.|\.position_ids$|\.rotary_emb\.inv_freq$"
)
_TEXT_POSITIONS = _PROJECTOR + "clip_text_model.embeddings.position_embedding"


class AuthorsCheckpointError(ValueError):
    """A released checkpoint directory that cannot be read as the authors' layout."""


def is_authors_checkpoint(directory: str | Path) -> bool:
    """A directory whose config.json is the authors' (LLaVA-NeXT plus their pooling keys)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return config.get("model_type") != PPLLaVAConfig.model_type and "pooling" in config and "clip_weight" in config


def read_authors_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise AuthorsCheckpointError(f"{directory}: no config.json (expected the authors' released checkpoint directory)")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise AuthorsCheckpointError(f"{path}: not valid JSON ({error})") from None
    for key in ("pooling", "vision_config", "text_config"):
        if key not in config:
            raise AuthorsCheckpointError(f"{path}: no {key!r}: not a config written by the authors' PPLLaVA code")
    if config.get("qwen") or config.get("model_type") == "llava_onevision":
        raise AuthorsCheckpointError(
            f"{path}: the authors' Qwen2 / SigLIP model is not supported: its relevance uses SigLIP's attention-pooling "
            "head over the patch tokens plus a logit bias, and its text context is 64 -> 196 tokens; docs/model.md says "
            "what is missing")
    if config["pooling"] != "ppllava":
        raise AuthorsCheckpointError(f"{path}: pooling={config['pooling']!r}; only the authors' prompt-guided pooling "
                                     "('ppllava') is this model")
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise AuthorsCheckpointError(f"{path}: vision_feature_select_strategy={config['vision_feature_select_strategy']!r}; "
                                     "expected 'default' (class token dropped)")
    return config


def clip_text_config_of(authors_config: dict, clip_config: str | Path | None = None) -> tuple[dict, int]:
    """(CLIP text config dict, projection dim) of the CLIP tower the released model was built on."""
    source = clip_config or authors_config.get("clip_weight")
    if source is not None and Path(source).exists():
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise AuthorsCheckpointError(f"{source}: no config.json (expected a CLIP checkpoint directory)")
        clip = CLIPConfig.from_dict(json.loads(path.read_text()))
        return clip.text_config.to_dict(), clip.projection_dim
    if clip_config is None and source in KNOWN_CLIP_TEXT:
        text, projection = KNOWN_CLIP_TEXT[source]
        return dict(text), projection
    raise AuthorsCheckpointError(
        f"the CLIP text tower's shape is not in the authors' config (clip_weight={authors_config.get('clip_weight')!r}) "
        f"and {source!r} is not a local CLIP directory: pass its directory or config.json (--clip-config, recipe "
        f"model.clip_path)")


def config_from_authors(authors_config: dict, clip_text: dict, projection_dim: int, logit_scale: float,
                        **overrides) -> PPLLaVAConfig:
    """Our config with the released model's values: towers, kernels, window temperature, BT-Adapter
    (``overrides`` last)."""
    vision = {k: v for k, v in authors_config["vision_config"].items() if k not in ("depth", "max_T")}
    vision["model_type"] = "clip_vision_model"
    # llava-hf configs write only what differs from CLIP's defaults: read sizes through the config class
    defaults = CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"})
    side = defaults.image_size // defaults.patch_size
    frame_shape = list(authors_config.get("frame_shape") or (side, side))
    if frame_shape != [side, side]:
        raise AuthorsCheckpointError(f"config.json: frame_shape={frame_shape} but the vision tower gives a {side}x{side} grid")
    extended = bool(authors_config.get("extend_clip", False))
    if extended:
        context, keep, factor = AUTHORS_CLIP_CONTEXT, AUTHORS_KEEP_POSITIONS, AUTHORS_POSITION_FACTOR
        if extended_length(clip_text["max_position_embeddings"], keep, factor) != context:
            raise AuthorsCheckpointError(f"extend_clip: a CLIP text context of {clip_text['max_position_embeddings']} "
                                         f"does not stretch to the authors' {context}")
    else:
        context, keep, factor = clip_text["max_position_embeddings"], AUTHORS_KEEP_POSITIONS, 1
    clip_text = {**clip_text, "model_type": "clip_text_model", "max_position_embeddings": context,
                 "projection_dim": projection_dim}
    video_kernel = _kernel(authors_config, "pooling_kernel", None)
    image_kernel = _kernel(authors_config, "image_pooling_kernel", video_kernel)
    image_stride = _kernel(authors_config, "image_pooling_stride", _kernel(authors_config, "pooling_stride", None))
    btadapter = bool(authors_config.get("btadapter", False))
    settings = dict(
        vision_config=vision,
        text_config=authors_config["text_config"],
        clip_text_config=clip_text,
        image_token_index=authors_config.get("image_token_index", 32000),
        projector_hidden_act=authors_config.get("projector_hidden_act", "gelu"),
        multimodal_projector_bias=True,
        vision_feature_layer=authors_config.get("vision_feature_layer", -2),
        image_grid_pinpoints=authors_config.get("image_grid_pinpoints"),
        projection_dim=projection_dim,
        logit_scale_init_value=logit_scale,
        video_kernel=video_kernel,
        video_stride=_kernel(authors_config, "pooling_stride", video_kernel),
        image_kernel=image_kernel,
        image_stride=image_stride,
        # Their multi-image path pools with the image kernel (encode_video(..., video=False)).
        multi_image_kernel=image_kernel,
        multi_image_stride=image_stride,
        window_temperature=authors_config.get("pooling_temp", 0.01),
        clip_context_length=context,
        clip_keep_positions=keep,
        clip_position_factor=factor,
        bt_adapter_depth=int(authors_config.get("btadapter_depth", 4)) if btadapter else 0,
        bt_adapter_max_frames=int(authors_config["vision_config"].get("max_T", authors_config.get("max_T", 64))),
        tie_word_embeddings=bool(authors_config["text_config"].get("tie_word_embeddings", False)),
    )
    settings.update(overrides)
    return PPLLaVAConfig(**settings)


def _kernel(config: dict, key: str, default):
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, str):  # their YAML writes "(2,3,3)"
        value = [int(v) for v in re.findall(r"\d+", value)]
    return [int(v) for v in value]


def read_authors_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the released directory: model*.safetensors / *.bin as their loader reads
    them, every shard an index names present, every file readable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = directory / index_name
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get("weight_map", {})
            absent = sorted({name for name in weight_map.values() if not (directory / name).is_file()})
            if absent:
                lost = sorted(key for key, name in weight_map.items() if name in absent)
                raise AuthorsCheckpointError(
                    f"{index_path}: shard(s) {', '.join(absent)} missing, holding {len(lost)} tensors "
                    f"(first: {', '.join(lost[:3])})")
    files = sorted(p for p in directory.iterdir()
                   if re.match(r"^(model|pytorch_model|non_lora_trainable).*\.(safetensors|bin)$", p.name))
    if not files:
        raise AuthorsCheckpointError(f"{directory}: no model*.safetensors or *.bin weight files")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            part = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise AuthorsCheckpointError(f"{path}: cannot be read ({error}); a truncated or damaged download?") from None
        tensors.update(part)
    return tensors


def map_authors_tensors(tensors: dict[str, torch.Tensor], config: PPLLaVAConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our state dict, their names that map to nothing). Text positions are split as their
    forward reads them: rows < keep from ``position_embedding``, the rest from ``_res``."""
    ours: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    keep = config.clip_keep_positions
    for name, tensor in tensors.items():
        if name == _TEXT_POSITIONS or name == _TEXT_POSITIONS + ".weight":
            ours["clip_text.embeddings.position_embedding.frozen_head"] = tensor[:keep]
            if name.endswith(".weight"):  # not extended: one table, split at keep
                ours["clip_text.embeddings.position_embedding.trainable_tail"] = tensor[keep:]
            continue
        if name == _TEXT_POSITIONS + "_res":
            ours["clip_text.embeddings.position_embedding.trainable_tail"] = tensor[keep:]
            continue
        if _NOT_CARRIED.search(name):
            continue
        for theirs, mine in _RENAMES:
            if name.startswith(theirs):
                ours[mine + name[len(theirs):]] = tensor
                break
        else:
            unexpected.append(name)
    if "logit_scale" in ours:
        ours["logit_scale"] = ours["logit_scale"].reshape(())
    return ours, unexpected


def from_authors(checkpoint_dir: str | Path, clip_config: str | Path | None = None,
                 **config_overrides) -> PPLLaVAForConditionalGeneration:
    """Our model holding a released checkpoint's every tensor (in its dtype). ``config_overrides``:
    PPLLaVAConfig keys set over the release's (settings such as ``num_frames`` or ``pooling_mode``;
    one that changes a tensor's shape is reported as a misfit).

    Raises :class:`AuthorsCheckpointError` naming every tensor that is missing, unexpected or of
    the wrong shape (a truncated, renamed or foreign checkpoint), before anything is written.
    """
    authors_config = read_authors_config(checkpoint_dir)
    clip_text, projection_dim = clip_text_config_of(authors_config, clip_config)
    tensors = read_authors_tensors(checkpoint_dir)
    scale = tensors.get(_PROJECTOR + "logit_scale")
    config = config_from_authors(authors_config, clip_text, projection_dim,
                                 float(scale) if scale is not None else 4.6052, **config_overrides)
    state, unexpected = map_authors_tensors(tensors, config)
    # the release's dtype, read off its LLM (a checkpoint without one is reported as missing below)
    dtype = next((t.dtype for k, t in tensors.items() if k.startswith("language_model.")), torch.float32)
    model = PPLLaVAForConditionalGeneration._from_config(config, dtype=dtype)
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    wrong = [f"{name} {tuple(state[name].shape)} (expected {tuple(expected[name].shape)})"
             for name in expected if name in state and state[name].shape != expected[name].shape]
    if missing or unexpected or wrong:
        problems = []
        for what, names in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong)):
            if names:
                problems.append(f"{len(names)} {what}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
        raise AuthorsCheckpointError(f"{checkpoint_dir}: does not fit the authors' layout of this config; "
                                     + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    logger.info("read the authors' checkpoint %s (%d tensors, BT-Adapter depth %d)", checkpoint_dir, len(tensors),
                config.bt_adapter_depth)
    return model


def authors_processor_settings(authors_config: dict, config: PPLLaVAConfig) -> dict:
    """processor_config.json for a converted release: the inputs their code prepares (plain_v1
    prompts, the formatted conversation as CLIP text in training, their frame arithmetic)."""
    return {"template": "plain_v1", "clip_text": "conversation", "frame_sampling": "authors",
            "max_length": int(authors_config.get("model_max_length") or 4096), "num_frames": config.num_frames,
            "video_kernel": list(config.video_kernel), "image_kernel": list(config.image_kernel),
            "multi_image_kernel": list(config.multi_image_kernel), "clip_context_length": config.clip_context_length}
