"""The LLM context each stage of a recipe gives a sample, against the visual tokens its model's
frames, image size and pooling kernels produce.

A sample's visual tokens cannot be cut (the pooled grid is one block), so a video whose tokens
alone fill the context is refused by every stage that reads it. `validate` prints this budget
for each stage and stops a recipe whose videos or largest images cannot fit; `run` checks the
same before any device work. Only configs are read (config.json files), never weights; where a
model directory does not exist yet (a DPO recipe's init is the SFT run's future export, or the
cluster's storage is not mounted here) the PPLLaVA defaults stand in, and the line says so. A
budget the defaults fail says nothing of a pretrained PPLLaVA directory's model: when
model.pretrained_path is not there and no stage of the recipe writes it, that is the error, first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.recipe import Recipe, RecipeError
from pipeline.recipe.checks import written_by_synth
from ppllava.config import MULTI_IMAGE, VIDEO, PPLLaVAConfig
from ppllava.processing import image_token_count, visual_token_count

# Room a sample needs beyond its visual tokens: the shortest prompt and answer of any template.
MIN_TEXT_TOKENS = 16


@dataclass
class StageBudget:
    stage: str
    context: int
    context_key: str           # the recipe key (or model field) the context comes from
    model: str                 # where the geometry below came from
    num_frames: int
    video_kernel: tuple[int, int, int]
    image_size: int
    video: int                 # visual tokens of one video
    largest_image: int         # visual tokens of the largest any-resolution image
    per_extra_image: int       # visual tokens of each image of a multi-image sample
    llm_context: int | None    # the LLM's own max_position_embeddings, when the config is known
    unreadable: str | None = None  # model.pretrained_path when no stage writes it and it is not there

    def lines(self) -> list[str]:
        room = self.context - self.video
        return [
            f"{self.stage} context {self.context} tokens ({self.context_key}); model: {self.model}",
            f"  video        {self.num_frames} frames of {self.image_size}px, kernel {self.video_kernel}: "
            f"{self.video} visual tokens, {room} left for text" + ("" if room >= MIN_TEXT_TOKENS else "  <- does not fit"),
            f"  image        up to {self.largest_image} visual tokens (largest any-resolution grid)",
            f"  multi_image  {self.per_extra_image} visual tokens per image, "
            f"{max(0, (self.context - MIN_TEXT_TOKENS) // self.per_extra_image)} images at most",
        ]

    def problems(self) -> list[str]:
        found = []
        if self.context - self.video < MIN_TEXT_TOKENS:
            found.append(f"a video of {self.num_frames} frames is {self.video} visual tokens, which leaves "
                         f"{self.context - self.video} of the {self.stage} context of {self.context} "
                         f"({self.context_key}) for its text: raise {self.context_key} or use fewer frames / a "
                         f"larger video kernel")
        if self.context - self.largest_image < MIN_TEXT_TOKENS:
            found.append(f"the largest any-resolution image is {self.largest_image} visual tokens, which does not fit "
                         f"the {self.stage} context of {self.context} ({self.context_key}) with its text")
        if self.llm_context is not None and self.context > self.llm_context:
            found.append(f"{self.context_key}={self.context} is longer than the LLM's own context "
                         f"(text_config.max_position_embeddings={self.llm_context})")
        return found


def _defaults(overrides: dict, why: str) -> tuple[PPLLaVAConfig, str, bool]:
    return PPLLaVAConfig(**overrides), f"PPLLaVA defaults ({why})", False


def _directory_config(path: str | None, what: str, overrides: dict | None = None) -> tuple[PPLLaVAConfig, str, bool]:
    """A model directory's config with ``overrides`` applied as ``build_model`` applies them."""
    if path and (Path(path) / "config.json").is_file():
        return PPLLaVAConfig.from_pretrained(path, **(overrides or {})), str(path), True
    return _defaults(overrides or {}, f"{what} {path} is not there yet")


def training_model_config(recipe: Recipe) -> tuple[PPLLaVAConfig, str, bool]:
    """(config, where it came from, whether it was read from real files) of the model SFT trains."""
    model = recipe.model
    overrides = dict(model.config_overrides)
    if model.source == "tiny":
        return PPLLaVAConfig.tiny(**overrides), "the tiny model", True
    if model.source == "llava_next":
        paths = [Path(p or "") / "config.json" for p in (model.llava_next_path, model.clip_path)]
        if not all(p.is_file() for p in paths):
            return _defaults(overrides, "model.llava_next_path / model.clip_path are not readable here")
        from transformers import AutoConfig

        from ppllava.convert import config_from_sources

        llava_next, clip = (AutoConfig.from_pretrained(p) for p in (model.llava_next_path, model.clip_path))
        return config_from_sources(llava_next, clip, **overrides), str(model.llava_next_path), True
    if model.source == "authors":
        if not (Path(model.authors_path or "") / "config.json").is_file():
            return _defaults(overrides, "model.authors_path is not readable here")
        from ppllava.authors import clip_text_config_of, config_from_authors, read_authors_config

        authors = read_authors_config(model.authors_path)
        clip_text, projection_dim = clip_text_config_of(authors, model.clip_path)
        return (config_from_authors(authors, clip_text, projection_dim, PPLLaVAConfig.logit_scale_init_value, **overrides),
                str(model.authors_path), True)
    if written_by_synth(model.pretrained_path, recipe.synth_dir) and not Path(model.pretrained_path).is_dir():
        return PPLLaVAConfig.tiny(**overrides), "the tiny model the synth stage writes", True
    return _directory_config(model.pretrained_path, "model.pretrained_path", overrides)


def config_source(recipe: Recipe, stage: str) -> tuple[str, str | None]:
    """Where a stage's model config comes from: ("model", None), the recipe's model section (SFT,
    DPO from SFT or model, eval of this recipe's own export), or (key, path) of a model directory."""
    if stage == "dpo" and recipe.dpo.init not in ("sft", "model"):
        return "dpo.init", recipe.dpo.init
    if stage == "eval":
        if recipe.eval.model_path is not None:
            return "eval.model_path", recipe.eval.model_path
        return config_source(recipe, recipe.export_source)
    return "model", None


def stage_model_config(recipe: Recipe, stage: str) -> tuple[PPLLaVAConfig, str, bool]:
    """The model config a stage reads its samples for."""
    key, path = config_source(recipe, stage)
    return training_model_config(recipe) if path is None else _directory_config(path, key)


def missing_pretrained_model(recipe: Recipe, stage: str) -> str | None:
    """"model.pretrained_path: /x does not exist ..." when the stage's config would come from
    model.pretrained_path, which no stage of the recipe writes and which is not there; else None.
    (The other stand-ins are deliberate: a DPO init that is an SFT run's future export, LLaVA-NeXT
    checkpoints on storage this host does not mount, are PPLLaVA-7B shaped like the defaults; a
    pretrained PPLLaVA directory may be any size, the demo's tiny model included.)"""
    if config_source(recipe, stage)[1] is not None:
        return None
    path = recipe.model.pretrained_path
    if recipe.model.source != "pretrained" or not path or written_by_synth(path, recipe.synth_dir) or Path(path).exists():
        return None
    return f"model.pretrained_path: {path} does not exist, and no stage of the recipe writes it"


def stage_budget(recipe: Recipe, stage: str) -> StageBudget:
    config, where, known = stage_model_config(recipe, stage)
    llm_context = getattr(config.text_config, "max_position_embeddings", None) if known else None
    eval_kernel = recipe.eval.video_kernel if stage == "eval" else None  # stride = kernel, as inference sets it
    frames, kernel = config.num_frames, tuple(eval_kernel or config.video_kernel)
    if stage == "eval":
        frames = recipe.eval.num_frames or frames
        # Inference prompts may use the whole LLM context (pipeline/model/inference.py).
        context, context_key = (llm_context, "the LLM's max_position_embeddings") if llm_context else \
            (recipe.data.max_length, "data.max_length")
    else:
        context, context_key = recipe.data.max_length, "data.max_length"
    video = visual_token_count(config, VIDEO, frames, eval_kernel)
    largest = max(image_token_count(config, (int(h), int(w))) for h, w in config.image_grid_pinpoints)
    per_image = visual_token_count(config, MULTI_IMAGE, 1)
    return StageBudget(stage, context, context_key, where, frames, kernel, config.vision_config.image_size, video,
                       largest, per_image, llm_context, None if known else missing_pretrained_model(recipe, stage))


def recipe_budgets(recipe: Recipe) -> list[StageBudget]:
    """The budget of every stage that reads samples (sft, dpo, eval)."""
    return [stage_budget(recipe, stage) for stage in ("sft", "dpo", "eval") if getattr(recipe, stage) is not None]


def check_budgets(recipe: Recipe, budgets: list[StageBudget] | None = None) -> None:
    """RecipeError naming each stage whose videos or largest images cannot fit its context; first,
    a model.pretrained_path whose absence made a stage's budget fail on the PPLLaVA defaults."""
    budgets = recipe_budgets(recipe) if budgets is None else budgets
    unreadable = list(dict.fromkeys(b.unreadable for b in budgets if b.unreadable and b.problems()))
    problems = [f"{b.stage}: {problem}" for b in budgets if not b.unreadable for problem in b.problems()]
    if unreadable:
        raise RecipeError(f"{recipe.source}: " + "; ".join(unreadable) + ": the token budget is judged from the "
                          "model's config.json, and the PPLLaVA defaults standing in for it do not fit"
                          + (f" (also: {'; '.join(problems)})" if problems else ""))
    if problems:
        raise RecipeError(f"{recipe.source}: " + "; ".join(problems))
