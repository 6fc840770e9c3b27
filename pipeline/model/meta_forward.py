"""The memory plan's counting (``pipeline.model.memory``): a stage's model built on the meta device,
its parameters counted by part, and one micro-batch's forward run on meta tensors with a hook on
every tensor autograd saves, so the count follows the model code that actually runs (LoRA's
dropout, the fp32 up-casts in norms and loss). Nothing is allocated: a 7B count takes about a
second. Attention runs as a fused kernel saves it (q, k, v, output, log-sum-exp; no sequence x
sequence matrix); grouped-query keys and values are repeated to every head as transformers' SDPA
path does.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ppllava.config import VIDEO, PPLLaVAConfig

PERSISTENCE = 100_000           # ZeRO-3 stage3_param_persistence_threshold: smaller parameters stay whole

@dataclass
class ParameterCounts:
    """Parameters (elements) of a meta model as a stage sets it up."""
    total: int
    trained: int
    vision: int                 # the vision tower's (with the BT-Adapter's when frozen)
    vision_trained: int
    largest_module: int         # the most elements one module holds directly (ZeRO-3 gathers per module)
    persistent: int             # parameters under ZeRO-3's persistence threshold, kept whole


def meta_model(config: PPLLaVAConfig, parts: dict[str, bool], lora) -> torch.nn.Module:
    from pipeline.model.setup import set_trained_parts
    from ppllava import PPLLaVAForConditionalGeneration

    with torch.device("meta"):
        model = PPLLaVAForConditionalGeneration._from_config(copy.deepcopy(config))
        set_trained_parts(model, parts, lora)
    return model


def count_parameters(model: torch.nn.Module) -> ParameterCounts:
    total = trained = vision = vision_trained = persistent = largest = 0
    for name, parameter in model.named_parameters():
        numel = parameter.numel()
        total += numel
        trained += numel if parameter.requires_grad else 0
        if name.startswith(("vision_tower.", "bt_adapter.")):
            vision += numel
            vision_trained += numel if parameter.requires_grad else 0
        persistent += numel if numel < PERSISTENCE else 0
    for module in model.modules():
        largest = max(largest, sum(p.numel() for p in module.parameters(recurse=False)))
    return ParameterCounts(total, trained, vision, vision_trained, largest, persistent)


ATTENTION = "ppllava_memory_plan"


def fused_attention_stand_in(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention as a fused kernel saves it (q, k, v, output, log-sum-exp): meta tensors only."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # as transformers' SDPA path does for grouped-query attention
        key, value = (tensor.repeat_interleave(groups, dim=1) for tensor in (key, value))
    output = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal=True,
                                                                        scale=scaling)[0]
    return output.transpose(1, 2).contiguous(), None


@dataclass
class SavedBytes:
    """Bytes autograd saves in one forward, by where: before the LLM's decoder layers (the visual
    path, the embeddings), inside them, after them (final norm, logits, loss)."""
    before: int = 0
    in_layers: int = 0
    head: int = 0
    largest_in_layers: int = 0
    largest_in_head: int = 0
    layers: int = 0
    layer_input: int = 0        # one layer's input (what a checkpointed layer keeps)

    def add(self, where: str, size: int) -> None:
        setattr(self, where, getattr(self, where) + size)
        if where == "in_layers":
            self.largest_in_layers = max(self.largest_in_layers, size)
        elif where == "head":
            self.largest_in_head = max(self.largest_in_head, size)


@contextmanager
def saved_tensor_meter(model: torch.nn.Module, layers: torch.nn.ModuleList, saved: SavedBytes):
    """Add the size of every tensor autograd saves to ``saved`` (each storage once, parameters not)."""
    parameters = {id(p) for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}   # kept alive so ids are not reused
    where = ["before"]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in parameters and id(base) not in seen:
            seen[id(base)] = base
            saved.add(where[0], base.numel() * base.element_size())
        return tensor

    def enter(module, args, kwargs):
        where[0] = "in_layers"
        if not saved.layer_input:
            hidden = args[0] if args else kwargs["hidden_states"]
            saved.layer_input = hidden.numel() * hidden.element_size()

    def leave(module, args, output):
        where[0] = "head" if module is layers[-1] else "before"

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(enter, with_kwargs=True),
                                                layer.register_forward_hook(leave))]
    saved.layers = len(layers)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
    finally:
        for handle in handles:
            handle.remove()


def meta_forward(model, config: PPLLaVAConfig, dtype: torch.dtype, videos: int, rows: int, tokens: int,
                  dpo: bool) -> SavedBytes:
    """Saved activations of one micro-batch: ``videos`` videos through the visual path, ``rows``
    sequences of ``tokens`` through the LLM (the loss as the stage takes it)."""
    from transformers import AttentionInterface, PretrainedConfig

    from pipeline.preference import sequence_logps
    from ppllava.pooling import pool_tokens, relevance

    AttentionInterface.register(ATTENTION, fused_attention_stand_in)
    model.to(dtype)
    for module in model.modules():  # every tower's attention (the model's config is meta_model's copy)
        if isinstance(getattr(module, "config", None), PretrainedConfig):
            module.config._attn_implementation = ATTENTION
    language_model = model.language_model
    model.train()
    saved = SavedBytes()
    meta = {"device": "meta"}
    layers = language_model.get_decoder().layers
    with saved_tensor_meter(model, layers, saved):
        # The visual path of one video per sample, as visual_tokens runs it (without its checks).
        frames, side, size = config.num_frames, config.patches_per_side, config.vision_config.image_size
        for _ in range(videos):
            pixels = torch.empty(frames, 3, size, size, dtype=dtype, **meta)
            projected, clip_visual = model.encode_frames(pixels)
            prompt = torch.zeros(1, config.clip_context_length, dtype=torch.long, **meta)
            scores = relevance(clip_visual.reshape(1, -1, clip_visual.shape[-1]), model.encode_prompts(prompt, None),
                               model.logit_scale)
            kernel, stride = config.pooling_geometry(VIDEO)
            pool_tokens(projected.reshape(1, frames, side, side, -1), scores.reshape(1, frames, side, side).to(dtype),
                        kernel, stride, config.window_temperature, config.pooling_mode, config.second_video_kernel)
        upstream = any(p.requires_grad for name, p in model.named_parameters() if not name.startswith("language_model."))
        embeds = torch.empty(rows, tokens, config.text_config.hidden_size, dtype=dtype, requires_grad=upstream, **meta)
        labels = torch.zeros(rows, tokens, dtype=torch.long, **meta)
        if dpo:
            sequence_logps(language_model(inputs_embeds=embeds, use_cache=False).logits, labels)
        else:
            language_model(inputs_embeds=embeds, labels=labels, use_cache=False)
    return saved


def pixel_bytes(config: PPLLaVAConfig, videos: int, element: int = 4) -> int:
    """A micro-batch's frames (the loader's pixels are fp32; the tower reads them in its dtype)."""
    size = config.vision_config.image_size
    return videos * config.num_frames * 3 * size * size * element


def vision_forward_bytes(config: PPLLaVAConfig, videos: int, element: int) -> int:
    """The frozen tower's no-grad forward of ``videos`` videos at its peak: its input in the
    training dtype, every hidden state (they are all returned), one layer's working set (its MLP's
    input, hidden and output)."""
    vision = config.vision_config
    tokens = videos * config.num_frames * (config.patches_per_side ** 2 + 1)
    states = (vision.num_hidden_layers + 1) * tokens * vision.hidden_size
    working = tokens * (2 * vision.hidden_size + 2 * vision.intermediate_size)
    return (states + working) * element + pixel_bytes(config, videos, element)
