"""Model, tokenizers and sample processor from a recipe's `model` and `data` sections.

    source: tiny         the few-MB PPLLaVA with a tokenizer trained here (tests, CPU demo)
    source: llava_next   convert a LLaVA-NeXT checkpoint (llava-hf layout) + a CLIP checkpoint
    source: pretrained   a PPLLaVA directory (save_pretrained / export), loaded straight into the
                         engine's layout (under ZeRO-3 each rank only materialises its shard)
    source: authors      the authors' released checkpoint (ppllava.authors), read and mapped in
                         every process like llava_next

`llava_next` converts in every process and holds the whole model in host memory while doing
so; for a 7B model on 8 processes per node, convert once with `python -m ppllava.convert` and
train from the result with `source: pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from pipeline.data.collate import ProcessorSettings, SampleProcessor
from pipeline.data.media import decoder
from pipeline.layout import CLIP_TOKENIZER_DIR, PROCESSOR_CONFIG
from pipeline.model.tiny import tiny_config_for, tiny_tokenizer
from pipeline.recipe import Recipe, RecipeError
from pipeline.recipe.training_sections import LoraSection
from ppllava import PPLLaVAForConditionalGeneration
from ppllava.lora import add_lora, lora_config, train_lora

logger = logging.getLogger(__name__)



def load_tokenizers(recipe: Recipe):
    """(LLM tokenizer, CLIP tokenizer) for the recipe's model."""
    from transformers import AutoTokenizer

    model = recipe.model
    if model.source == "tiny" and not model.tokenizer_path:
        tokenizer = tiny_tokenizer(chat_template=recipe.data.template == "tokenizer")
        return tokenizer, tokenizer
    if model.source == "authors":
        base = model.authors_path
        clip_path = model.clip_tokenizer_path or model.clip_path or authors_clip_directory(model.authors_path)
    else:
        base = model.llava_next_path if model.source == "llava_next" else model.pretrained_path
        clip_path = model.clip_tokenizer_path or (model.clip_path if model.source == "llava_next"
                                                  else str(Path(base) / CLIP_TOKENIZER_DIR))
    llm_path = model.tokenizer_path or base
    return AutoTokenizer.from_pretrained(llm_path), AutoTokenizer.from_pretrained(clip_path)


def authors_clip_directory(authors_path: str) -> str:
    """The CLIP checkpoint a released model names (its ``clip_weight``), when it is a local directory."""
    from ppllava.authors import read_authors_config

    clip_weight = read_authors_config(authors_path).get("clip_weight")
    if not clip_weight or not Path(clip_weight).is_dir():
        raise ValueError(f"model.authors_path: {authors_path} names its CLIP as {clip_weight!r}, which is not a local "
                         "directory here; set model.clip_path (or model.clip_tokenizer_path) to that CLIP checkpoint")
    return clip_weight


def save_tokenizers(tokenizer, clip_tokenizer, directory: Path) -> None:
    """The layout `source: pretrained` reads: LLM tokenizer at the top, CLIP's in clip_tokenizer/."""
    tokenizer.save_pretrained(directory)
    clip_tokenizer.save_pretrained(directory / CLIP_TOKENIZER_DIR)


def load_directory_tokenizers(directory: Path):
    """(LLM tokenizer, CLIP tokenizer) of a model directory written by ``save_tokenizers``; a
    directory without clip_tokenizer/ (one tokenizer for both, like the tiny model's) gives its
    top-level tokenizer twice."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    clip_directory = directory / CLIP_TOKENIZER_DIR
    return tokenizer, AutoTokenizer.from_pretrained(str(clip_directory)) if clip_directory.is_dir() else tokenizer


def loads_partitioned(recipe: Recipe) -> bool:
    """Whether ``build_model`` can construct the model under ZeRO-3's partitioned initialisation:
    yes for a model built from a config or read by ``from_pretrained``; no for one converted from
    another layout (llava_next, authors), whose tensors are copied in after construction."""
    return recipe.model.source in ("tiny", "pretrained")


def build_model(recipe: Recipe, tokenizer, attn_implementation: str) -> PPLLaVAForConditionalGeneration:
    """The model on CPU, to be handed to the DeepSpeed engine (call inside ``model_init_context``
    with ``partitioned=loads_partitioned(recipe)``)."""
    model_section = recipe.model
    attn = model_section.attn_implementation or attn_implementation
    overrides = dict(model_section.config_overrides)
    if model_section.source == "tiny":
        config = tiny_config_for(tokenizer, **overrides)
        model = PPLLaVAForConditionalGeneration._from_config(config, attn_implementation=attn)
    elif model_section.source == "llava_next":
        from ppllava.convert import from_llava_next

        model = from_llava_next(model_section.llava_next_path, model_section.clip_path, **overrides)
        model.set_attn_implementation(attn)
    elif model_section.source == "authors":
        from ppllava.authors import from_authors

        model = from_authors(model_section.authors_path, clip_config=model_section.clip_path, **overrides)
        model.set_attn_implementation(attn)
    else:
        model = PPLLaVAForConditionalGeneration.from_pretrained(model_section.pretrained_path, attn_implementation=attn,
                                                                **overrides)
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the LLM's vocabulary has "
                         f"{model.config.text_config.vocab_size}: model and tokenizer do not belong together")
    if model_section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def use_recipe_kernels(model: PPLLaVAForConditionalGeneration, backend, choice="auto",
                       attn_implementation: str | None = None) -> dict[str, str]:
    """Put the LLM of ``model`` on its fused kernels (backends/kernels.py): ``model.kernels``
    (``choice``) over the backend row's. With ``model.attn_implementation`` set, the attention the
    model was loaded with stays. Before the engine wraps the model; returns what each op runs."""
    from backends.kernels import resolve, use_kernels

    try:
        kernels = resolve(backend.kernels, choice)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    if attn_implementation is not None:
        kernels.pop("attention")
    use_kernels(model.language_model, kernels)
    logger.info("LLM kernels: %s", ", ".join(f"{op} {name}" for op, name in kernels.items()))
    return kernels


def write_start_model(recipe: Recipe, directory: Path) -> None:
    """The model section's model as a complete model directory (weights, config, tokenizers,
    processor_config.json): what a stage that starts from a directory (DPO's ``init: model``) reads.
    A released checkpoint keeps the authors' input settings; any other source the recipe's data section."""
    tokenizer, clip_tokenizer = load_tokenizers(recipe)
    model = build_model(recipe, tokenizer, "sdpa")
    model.save_pretrained(directory)
    save_tokenizers(tokenizer, clip_tokenizer, directory)
    if recipe.model.source == "authors":
        from ppllava.authors import authors_processor_settings, read_authors_config

        settings = authors_processor_settings(read_authors_config(recipe.model.authors_path), model.config)
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(settings, indent=1))
    else:
        save_processor_config(recipe, model.config, directory)


def model_source_directory(recipe: Recipe) -> Path | None:
    """The directory the model section reads its weights from (None for the tiny model)."""
    model = recipe.model
    path = {"llava_next": model.llava_next_path, "pretrained": model.pretrained_path,
            "authors": model.authors_path}.get(model.source)
    return Path(path) if path else None


def build_processor(recipe: Recipe, config, tokenizer, clip_tokenizer, training: bool = True) -> SampleProcessor:
    settings = ProcessorSettings(template=recipe.data.template, clip_text=recipe.data.clip_text,
                                 max_length=recipe.data.max_length, training=training,
                                 frame_scheme=recipe.data.frame_sampling)
    return SampleProcessor(config, tokenizer, clip_tokenizer, settings, video_decoder=decoder(recipe.data.decoder))


def save_processor_config(recipe: Recipe, config, directory: Path) -> None:
    """processor_config.json: how inputs were prepared in training (chat template, context, frames,
    kernels), so inference prepares them the same way."""
    settings = {"template": recipe.data.template, "clip_text": recipe.data.clip_text,
                "frame_sampling": recipe.data.frame_sampling, "max_length": recipe.data.max_length,
                "num_frames": config.num_frames, "video_kernel": list(config.video_kernel),
                "image_kernel": list(config.image_kernel), "multi_image_kernel": list(config.multi_image_kernel),
                "clip_context_length": config.clip_context_length}
    (directory / PROCESSOR_CONFIG).write_text(json.dumps(settings, indent=1))


def load_processor_settings(directory: Path) -> ProcessorSettings:
    """Inference settings (eval-mode frame sampling, prompt-only CLIP text) of a model directory."""
    path = Path(directory) / PROCESSOR_CONFIG
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return ProcessorSettings(template=saved.get("template", "vicuna_v1"), frame_scheme=saved.get("frame_sampling", "segments"),
                             max_length=saved.get("max_length", ProcessorSettings.max_length),
                             training=False)


def stage_trained_parts(recipe: Recipe, stage: str) -> dict[str, bool]:
    """``set_trainable_parts``' switches for a training stage: SFT's ``sft.trainable``; DPO trains
    the LLM alone (all its weights, or with ``dpo.lora`` adapters on them)."""
    if stage == "sft":
        return dataclasses.asdict(recipe.sft.trainable)
    return dict(vision=False, projector=False, clip_text=False, llm=recipe.dpo.lora is None)


def set_trained_parts(model: PPLLaVAForConditionalGeneration, parts: dict[str, bool],
                      lora: LoraSection | None):
    """What a training stage trains: ``parts`` (``set_trainable_parts``' switches), and with
    ``lora`` LoRA adapters on the LLM's linear layers, injected here, which train while the LLM's
    own weights stay frozen. Returns the adapters' LoraConfig (None without)."""
    config = None
    if lora is not None:
        config = lora_config(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        add_lora(model, config)
    model.set_trainable_parts(**parts)
    if config is not None:
        train_lora(model)
    return config


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable); under ZeRO-3 a parameter's full size is in ``ds_numel``."""
    total = trainable = 0
    for parameter in model.parameters():
        numel = getattr(parameter, "ds_numel", parameter.numel())
        total += numel
        trainable += numel if parameter.requires_grad else 0
    return total, trainable
