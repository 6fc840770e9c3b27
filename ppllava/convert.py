"""Build a PPLLaVA model from a LLaVA-NeXT checkpoint (llava-hf layout) and a CLIP checkpoint.

    vision tower, projector, image newline, LLM   <- LLaVA-NeXT (copied tensor for tensor)
    CLIP text tower, text/visual projection, tau  <- CLIP (positions stretched 77 -> 248, eq.4)

Both sources are read with transformers' own ``from_pretrained``, so every layout transformers
can load (hub llava-hf repos, sharded safetensors, older key names) works here too.

Command line: ``python -m ppllava.convert LLAVA_NEXT_DIR CLIP_DIR OUT_DIR``.
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import CLIPModel, LlavaNextForConditionalGeneration

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("llava_next", help="LLaVA-NeXT checkpoint directory (llava-hf layout)")
    parser.add_argument("clip", help="CLIP checkpoint directory (e.g. clip-vit-large-patch14-336)")
    parser.add_argument("output", help="directory to write the PPLLaVA checkpoint to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from_llava_next(args.llava_next, args.clip).save_pretrained(args.output)


if __name__ == "__main__":
    main()
