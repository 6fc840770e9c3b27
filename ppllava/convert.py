"""Build a PPLLaVA model from a LLaVA-NeXT checkpoint (llava-hf layout) and a CLIP checkpoint,
or from the authors' released PPLLaVA checkpoints (``from_authors``, see ppllava.authors).

    vision tower, projector, image newline, LLM   <- LLaVA-NeXT (copied tensor for tensor)
    CLIP text tower, text/visual projection, tau  <- CLIP (positions stretched 77 -> 248, eq.4)

Both sources are read with transformers' own ``from_pretrained``, so every layout transformers
can load (hub llava-hf repos, sharded safetensors, older key names) works here too.

Command lines:

    python -m ppllava.convert LLAVA_NEXT_DIR CLIP_DIR OUT_DIR
    python -m ppllava.convert authors RELEASED_DIR OUT_DIR [--clip-config C] [--tokenizer T] [--clip-tokenizer CT]

The second writes a complete model directory (weights, config, LLM tokenizer, clip_tokenizer/,
processor_config.json) that `pipeline chat`, `eval.model_path` and `model.source: pretrained` read.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from transformers import CLIPModel, LlavaNextForConditionalGeneration

from ppllava.authors import (PROCESSOR_CONFIG, authors_processor_settings, from_authors, read_authors_config)
from ppllava.clip_text import extended_length
from ppllava.config import PPLLaVAConfig
from ppllava.modeling import PPLLaVAForConditionalGeneration

logger = logging.getLogger(__name__)


def config_from_sources(source, clip_config, logit_scale: float | None = None, **overrides) -> PPLLaVAConfig:
    """The PPLLaVA config implied by the two source models' configs (a LlavaNextConfig and a
    CLIPConfig), with ``overrides`` applied last. ``logit_scale``: the CLIP checkpoint's trained
    temperature (default: the CLIP config's initial value; the weight itself is copied anyway)."""
    keep = overrides.get("clip_keep_positions", 20)
    factor = overrides.get("clip_position_factor", 4)
    context = extended_length(clip_config.text_config.max_position_embeddings, keep, factor)
    clip_text_config = clip_config.text_config.to_dict()
    clip_text_config.update(max_position_embeddings=context, projection_dim=clip_config.projection_dim)
    if source.vision_config.hidden_size != clip_config.vision_config.hidden_size:
        raise ValueError(
            f"the LLaVA-NeXT vision tower has width {source.vision_config.hidden_size} but the CLIP checkpoint's "
            f"visual projection expects {clip_config.vision_config.hidden_size}: use the CLIP that LLaVA-NeXT was built on"
        )
    settings = dict(
        vision_config=source.vision_config.to_dict(),
        text_config=source.text_config.to_dict(),
        clip_text_config=clip_text_config,
        image_token_index=source.image_token_index,
        projector_hidden_act=source.projector_hidden_act,
        multimodal_projector_bias=source.multimodal_projector_bias,
        vision_feature_layer=source.vision_feature_layer,
        image_grid_pinpoints=source.image_grid_pinpoints,
        projection_dim=clip_config.projection_dim,
        logit_scale_init_value=clip_config.logit_scale_init_value if logit_scale is None else logit_scale,
        clip_context_length=context,
        clip_keep_positions=keep,
        clip_position_factor=factor,
        tie_word_embeddings=bool(getattr(source.text_config, "tie_word_embeddings", False)),
    )
    settings.update(overrides)
    return PPLLaVAConfig(**settings)


def _copy(target: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{what}: weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")


def from_llava_next(llava_next_path: str, clip_path: str, **config_overrides) -> PPLLaVAForConditionalGeneration:
    """A PPLLaVA model whose vision tower, projector and LLM equal the LLaVA-NeXT source's tensors."""
    llava_next = LlavaNextForConditionalGeneration.from_pretrained(llava_next_path, dtype="auto")
    clip = CLIPModel.from_pretrained(clip_path, dtype="auto")
    config = config_from_sources(llava_next.config, clip.config, float(clip.logit_scale.detach()), **config_overrides)
    model = PPLLaVAForConditionalGeneration._from_config(config, dtype=llava_next.dtype)

    _copy(model.vision_tower, llava_next.model.vision_tower.state_dict(), "vision tower")
    if model.bt_adapter is not None:  # a new BT-Adapter starts from CLIP's last layers, as the authors'
        model.init_bt_adapter_from_vision_tower()
    _copy(model.multi_modal_projector, llava_next.model.multi_modal_projector.state_dict(), "projector")
    llm_state = {f"model.{k}": v for k, v in llava_next.model.language_model.state_dict().items()}
    llm_state["lm_head.weight"] = llava_next.lm_head.weight
    _copy(model.language_model, llm_state, "language model")
    model.clip_text.load_from_clip(clip.text_model, config.clip_keep_positions, config.clip_position_factor)
    _copy(model.visual_projection, clip.visual_projection.state_dict(), "CLIP visual projection")
    _copy(model.text_projection, clip.text_projection.state_dict(), "CLIP text projection")
    with torch.no_grad():
        model.image_newline.copy_(llava_next.model.image_newline)
        model.logit_scale.copy_(clip.logit_scale)
    logger.info("converted %s + %s into PPLLaVA (%d parameters)", llava_next_path, clip_path, model.num_parameters())
    return model


CLIP_TOKENIZER_DIR = "clip_tokenizer"  # pipeline.layout.CLIP_TOKENIZER_DIR


def convert_authors(source: str, output: str, clip_config: str | None = None, tokenizer: str | None = None,
                    clip_tokenizer: str | None = None) -> Path:
    """A released checkpoint directory -> our complete model directory at ``output``.

    Tokenizers: the LLM's from ``tokenizer`` (default: the released directory, which their
    training saved it into), CLIP's from ``clip_tokenizer`` (default: their ``clip_weight`` when it
    is a local directory). Everything is read and checked before anything is written.
    """
    from transformers import AutoTokenizer

    authors_config = read_authors_config(source)
    clip_source = clip_tokenizer or clip_config or authors_config.get("clip_weight")
    if not clip_source or not Path(clip_source).is_dir():
        raise ValueError(f"the CLIP tokenizer: {clip_source!r} is not a local directory; pass --clip-tokenizer "
                         "(a CLIP checkpoint directory, e.g. clip-vit-large-patch14-336)")
    try:
        llm_tokenizer = AutoTokenizer.from_pretrained(tokenizer or source)
    except (OSError, ValueError) as error:
        raise ValueError(f"the LLM tokenizer: {tokenizer or source} has none ({error}); pass --tokenizer "
                         "(e.g. the llava-v1.6-vicuna-7b-hf directory)") from None
    clip_tok = AutoTokenizer.from_pretrained(clip_source)
    model = from_authors(source, clip_config=clip_config)
    out = Path(output)
    model.save_pretrained(out)
    llm_tokenizer.save_pretrained(out)
    clip_tok.save_pretrained(out / CLIP_TOKENIZER_DIR)
    settings = authors_processor_settings(authors_config, model.config)
    (out / PROCESSOR_CONFIG).write_text(json.dumps(settings, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO)
    if argv[:1] == ["authors"]:
        parser = argparse.ArgumentParser(prog="python -m ppllava.convert authors",
                                         description="convert the authors' released PPLLaVA checkpoint")
        parser.add_argument("source", help="released checkpoint directory (config.json + model*.safetensors)")
        parser.add_argument("output", help="directory to write our model directory to")
        parser.add_argument("--clip-config", help="CLIP directory or config.json (default: their clip_weight, or "
                                                  "OpenAI CLIP-L/14's known text tower)")
        parser.add_argument("--tokenizer", help="LLM tokenizer directory (default: the released directory)")
        parser.add_argument("--clip-tokenizer", help="CLIP tokenizer directory (default: --clip-config or clip_weight)")
        args = parser.parse_args(argv[1:])
        try:
            out = convert_authors(args.source, args.output, args.clip_config, args.tokenizer, args.clip_tokenizer)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        logger.info("wrote %s", out)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("llava_next", help="LLaVA-NeXT checkpoint directory (llava-hf layout)")
    parser.add_argument("clip", help="CLIP checkpoint directory (e.g. clip-vit-large-patch14-336)")
    parser.add_argument("output", help="directory to write the PPLLaVA checkpoint to")
    args = parser.parse_args(argv)
    from_llava_next(args.llava_next, args.clip).save_pretrained(args.output)


if __name__ == "__main__":
    main()
