"""Tiny checkpoints in the authors' released layout (farewellthree/ppllava_weight), written here.

Names and shapes follow their module definitions (ppllava/models/llava_interleave.py,
clip_btadapter.py, llava_projector.py, clip.py's ExtendTextEmbeddings) as their training code
saved them with transformers 4.4x: a LLaVA-NeXT ``config.json`` with their pooling keys, and
``model-0000k-of-0000n.safetensors`` shards with an index. Nothing here comes from our converter:
the converter is what the tests check against this.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

# Their ExtendTextEmbeddings: CLIP's 77 positions stretched to 248, the first 20 kept.
CLIP_POSITIONS, EXTENDED_POSITIONS = 77, 248


def _clip_layer(prefix: str, width: int, inner: int) -> dict[str, tuple]:
    shapes = {}
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        shapes[f"{prefix}self_attn.{proj}.weight"] = (width, width)
        shapes[f"{prefix}self_attn.{proj}.bias"] = (width,)
    for norm in ("layer_norm1", "layer_norm2"):
        shapes[f"{prefix}{norm}.weight"] = (width,)
        shapes[f"{prefix}{norm}.bias"] = (width,)
    shapes[f"{prefix}mlp.fc1.weight"] = (inner, width)
    shapes[f"{prefix}mlp.fc1.bias"] = (inner,)
    shapes[f"{prefix}mlp.fc2.weight"] = (width, inner)
    shapes[f"{prefix}mlp.fc2.bias"] = (width,)
    return shapes


def authors_shapes(vision: dict, clip_text: dict, projection_dim: int, llm_hidden: int, depth: int, max_t: int,
                   extend_clip: bool = True) -> dict[str, tuple]:
    """Name -> shape of every tensor of their model except the LLM (added from transformers' Llama)."""
    width, inner = vision["hidden_size"], vision["intermediate_size"]
    grid = (vision["image_size"] // vision["patch_size"]) ** 2
    v = "vision_tower.vision_model."
    shapes = {
        f"{v}embeddings.class_embedding": (width,),
        f"{v}embeddings.patch_embedding.weight": (width, 3, vision["patch_size"], vision["patch_size"]),
        f"{v}embeddings.position_embedding.weight": (grid + 1, width),
        f"{v}pre_layrnorm.weight": (width,), f"{v}pre_layrnorm.bias": (width,),
        f"{v}post_layernorm.weight": (width,), f"{v}post_layernorm.bias": (width,),
    }
    for i in range(vision["num_hidden_layers"]):
        shapes.update(_clip_layer(f"{v}encoder.layers.{i}.", width, inner))
    for j in range(depth):  # CLIPLayer_Spatial: a CLIP encoder layer's parameters
        shapes.update(_clip_layer(f"{v}btadapter_S_layers.{j}.", width, inner))
        t = f"{v}btadapter_T_layers.{j}."  # CLIPLayer_AttnTime: attention, one norm, temporal_fc
        shapes.update({k: s for k, s in _clip_layer(t, width, inner).items() if "mlp" not in k and "layer_norm2" not in k})
        shapes[f"{t}temporal_fc.weight"] = (width, width)
        shapes[f"{t}temporal_fc.bias"] = (width,)
    if depth:
        shapes[f"{v}btadapter_time_embed.weight"] = (max_t, width)
        shapes[f"{v}btadapter_cls_token"] = (1, 1, width)
    p, tw, ti = "multi_modal_projector.", clip_text["hidden_size"], clip_text["intermediate_size"]
    shapes.update({
        f"{p}linear_1.weight": (llm_hidden, width), f"{p}linear_1.bias": (llm_hidden,),
        f"{p}linear_2.weight": (llm_hidden, llm_hidden), f"{p}linear_2.bias": (llm_hidden,),
        f"{p}clip_text_model.embeddings.token_embedding.weight": (clip_text["vocab_size"], tw),
        f"{p}clip_text_model.final_layer_norm.weight": (tw,), f"{p}clip_text_model.final_layer_norm.bias": (tw,),
        f"{p}clip_visual_projection.weight": (projection_dim, width),
        f"{p}clip_text_projection.weight": (projection_dim, tw),
        f"{p}clip_visual_ln.weight": (width,), f"{p}clip_visual_ln.bias": (width,),
        f"{p}logit_scale": (),
        "image_newline": (llm_hidden,),
    })
    if extend_clip:
        shapes[f"{p}clip_text_model.embeddings.position_embedding"] = (EXTENDED_POSITIONS, tw)
        shapes[f"{p}clip_text_model.embeddings.position_embedding_res"] = (EXTENDED_POSITIONS, tw)
    else:
        shapes[f"{p}clip_text_model.embeddings.position_embedding.weight"] = (CLIP_POSITIONS, tw)
    for i in range(clip_text["num_hidden_layers"]):
        shapes.update(_clip_layer(f"{p}clip_text_model.encoder.layers.{i}.", tw, ti))
    return shapes


def random_tensor(name: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Weights that make every path matter: norms near 1, the temporal output linear non-zero."""
    noise = torch.randn(shape, generator=generator)
    if name == "multi_modal_projector.logit_scale":
        return torch.tensor(4.6052)
    is_norm = "norm" in name or "clip_visual_ln" in name
    if is_norm and name.endswith(".weight"):
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.05 * noise
    return 0.2 * noise


def write_authors_checkpoint(directory: Path, config, depth: int = 2, max_t: int = 64, seed: int = 0,
                             extend_clip: bool = True, tokenizer=None, shards: int = 2) -> dict[str, torch.Tensor]:
    """A released-style directory for our tiny ``config``'s towers (its CLIP text tower at 77 positions,
    as CLIP's): config.json, sharded safetensors + index, the LLM tokenizer when given, and a CLIP
    directory (``clip/``: config.json, tokenizer) that ``clip_weight`` names. Returns the tensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vision = {k: v for k, v in config.vision_config.to_dict().items() if k not in ("transformers_version",)}
    clip_text = {k: v for k, v in config.clip_text_config.to_dict().items() if k not in ("transformers_version",)}
    clip_text["max_position_embeddings"] = CLIP_POSITIONS
    llm_config = config.text_config.to_dict()
    generator = torch.Generator().manual_seed(seed)
    shapes = authors_shapes(vision, clip_text, config.projection_dim, config.text_config.hidden_size, depth, max_t,
                            extend_clip)
    tensors = {name: random_tensor(name, shape, generator) for name, shape in shapes.items()}
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**llm_config))
    tensors.update({f"language_model.{k}": v.detach().clone() for k, v in llm.state_dict().items()})

    clip_dir = directory / "clip"
    clip_dir.mkdir(exist_ok=True)
    (clip_dir / "config.json").write_text(json.dumps({
        "model_type": "clip", "projection_dim": config.projection_dim, "logit_scale_init_value": 2.6592,
        "text_config": clip_text, "vision_config": vision}, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        tokenizer.save_pretrained(clip_dir)
    authors_config = {
        "architectures": ["LlavaInterleaveForConditionalGeneration"], "model_type": "llava_next",
        "vision_config": {**vision, "depth": depth, "max_T": max_t}, "text_config": llm_config,
        "image_token_index": config.image_token_index, "image_grid_pinpoints": config.image_grid_pinpoints,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
        "pooling": "ppllava", "pooling_kernel": [2, 3, 3], "pooling_stride": [2, 3, 3],
        "image_pooling_kernel": [1, 3, 3], "image_pooling_stride": [1, 3, 3],
        "frame_shape": [config.patches_per_side] * 2, "btadapter": depth > 0, "btadapter_depth": depth or 4,
        "max_T": max_t, "extend_clip": extend_clip, "pooling_temp": 0.01, "clip_weight": str(clip_dir),
        "clip_post_pretrain": None, "qwen": False, "pad_token_id": 0, "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(authors_config, indent=1))
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name].contiguous() for name in part}, str(directory / file))
        weight_map.update({name: file for name in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors
