"""The training stages' sections (sft, dpo, the keys they share, LoRA) and the export section that
writes their result; each section's own checks (see ``sections.py`` for how they validate).
Every key: docs/recipes.md.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

from pipeline.recipe.checks import existing, fraction, positive
from pipeline.recipe.typed_yaml import RecipeError


@dataclass
class TrainableParts:
    vision: bool = False
    projector: bool = True
    clip_text: bool = True          # the paper trains the text tower; the authors' code freezes it (false)
    clip_projections: bool = True   # CLIP's text and visual projections (trained in both)
    llm: bool = True
    bt_adapter: bool = True         # the BT-Adapter, when the model has one (the authors train it in SFT)


@dataclass
class LoraSection:
    """LoRA adapters on the LLM's linear layers (PEFT); present (``lora: {}`` for the defaults) = on."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | None = None  # last name parts of LLM linear layers; None: all but lm_head

    def validate(self, src: str, stage: str) -> None:
        positive(src, f"{stage}.lora.rank", self.rank)
        positive(src, f"{stage}.lora.alpha", self.alpha)
        fraction(src, f"{stage}.lora.dropout", self.dropout, below_one=True)
        if self.target_modules is not None and not self.target_modules:
            raise RecipeError(f"{src}: {stage}.lora.target_modules: empty; leave it out for every linear layer of "
                              f"the LLM")


@dataclass
class TrainingSection:
    """Keys every training stage (sft, dpo) has: DeepSpeed, batch, schedule, logging, checkpoints."""

    zero_stage: Literal[0, 1, 2, 3] = 3
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    global_batch_size: int = 256
    micro_batch_size: int = 1
    gradient_accumulation_steps: int | None = None  # None: global / (micro x world)
    lr: float = 2e-5
    min_lr_ratio: float = 0.0
    lr_schedule: Literal["cosine", "linear"] = "cosine"   # decay after the warmup
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    gradient_clipping: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None
    optimizer: Literal["auto", "torch_adamw", "deepspeed_adam"] = "auto"
    offload_optimizer: bool = False
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    verify_checkpoints: Literal["hash", "size"] = "hash"  # files.json: sha256 + size, or sizes only
    max_nonfinite_in_a_row: int = 5
    record_samples: bool = False  # <stage>/samples/rank_N.jsonl: the sample keys of every step
    gc_every: int = 50  # Python's garbage collection every N steps on all ranks together (0: Python's own timing)
    lora: LoraSection | None = None  # the LLM trains through LoRA adapters, its own weights frozen

    def validate_training(self, src: str, stage: str, world_size: int) -> None:
        """Checks every training stage shares: positive sizes, fractions, batch arithmetic."""
        for key in ("global_batch_size", "micro_batch_size", "lr", "epochs", "log_every", "save_every", "keep_last",
                    "max_nonfinite_in_a_row"):
            positive(src, f"{stage}.{key}", getattr(self, key))
        for key in ("gradient_accumulation_steps", "max_steps"):
            if getattr(self, key) is not None:
                positive(src, f"{stage}.{key}", getattr(self, key))
        positive(src, f"{stage}.gradient_clipping", self.gradient_clipping, allow_zero=True)
        positive(src, f"{stage}.weight_decay", self.weight_decay, allow_zero=True)
        positive(src, f"{stage}.gc_every", self.gc_every, allow_zero=True)
        fraction(src, f"{stage}.warmup_ratio", self.warmup_ratio, below_one=True)
        fraction(src, f"{stage}.min_lr_ratio", self.min_lr_ratio)
        if self.offload_optimizer and self.zero_stage < 2:
            raise RecipeError(f"{src}: {stage}.offload_optimizer: needs {stage}.zero_stage 2 or 3, got {self.zero_stage}")
        if self.lora is not None:
            self.lora.validate(src, stage)
        self.batch_layout(src, stage, world_size)

    def batch_layout(self, src: str, stage: str, world_size: int) -> tuple[int, int, int]:
        """(micro batch, accumulation, world) whose product is global_batch_size, or RecipeError."""
        micro, accumulation, target = self.micro_batch_size, self.gradient_accumulation_steps, self.global_batch_size
        if accumulation is None:
            if target % (micro * world_size):
                raise RecipeError(f"{src}: {stage}.global_batch_size={target} is not divisible by "
                                  f"{stage}.micro_batch_size x world size = {micro} x {world_size}; change one of "
                                  f"them or set {stage}.gradient_accumulation_steps")
            accumulation = target // (micro * world_size)
        if micro * accumulation * world_size != target:
            raise RecipeError(f"{src}: {stage}.micro_batch_size x {stage}.gradient_accumulation_steps x world "
                              f"size = {micro} x {accumulation} x {world_size} = {micro * accumulation * world_size}, "
                              f"but {stage}.global_batch_size={target}")
        return micro, accumulation, world_size


@dataclass
class SFTSection(TrainingSection):
    trainable: TrainableParts = field(default_factory=TrainableParts)

    def validate(self, src: str, world_size: int) -> None:
        self.validate_training(src, "sft", world_size)
        if not any(dataclasses.asdict(self.trainable).values()) and self.lora is None:
            raise RecipeError(f"{src}: sft.trainable: at least one part must train")
        if self.lora is not None:
            if self.trainable.llm:
                raise RecipeError(f"{src}: sft.lora trains the LLM through adapters, but sft.trainable.llm "
                                  f"is true (every LLM weight would train as well): set sft.trainable.llm: false")


@dataclass
class DPOSection(TrainingSection):
    """LLaVA-Hound-style DPO on video pairs (paper Table 9): the LLM trains, nothing else."""

    global_batch_size: int = 64
    lr: float = 5e-6
    lr_schedule: Literal["cosine", "linear"] = "linear"   # the authors' DPO (LLaVA-Hound's)
    warmup_ratio: float = 0.1
    epochs: float = 2.0
    beta: float = 0.1
    sft_weight: float = 0.0                 # weight of an extra NLL term on the chosen answers
    reference: Literal["precomputed", "live"] = "precomputed"
    template: Literal["plain_v1", "vicuna_v1", "tokenizer"] | None = "vicuna_v1"  # None: the start model's
    frames: Literal["middle", "random"] = "middle"   # random (the authors') needs reference: live
    init: str = "sft"                       # "sft": the SFT stage's final checkpoint; "model": the model
                                            # section's model (any source); else a PPLLaVA directory

    def validate(self, src: str, world_size: int, sft_stage: bool, missing: list[str] | None) -> None:
        """``sft_stage``: the recipe has an sft section (``init: sft`` starts from it). The model
        section, which ``init: model`` starts from, is checked by the recipe's validate."""
        if self.init == "sft":
            if not sft_stage:
                raise RecipeError(f"{src}: dpo.init: 'sft' starts from this recipe's SFT stage, but the recipe has "
                                  f"no sft section; name a PPLLaVA model directory, or 'model' (the model section)")
        elif self.init != "model":
            existing(src, "dpo.init", self.init, "PPLLaVA model directory (or 'sft')", missing)
        if self.frames == "random" and self.reference != "live":
            raise RecipeError(f"{src}: dpo.frames: 'random' samples new frames each time a pair is read, which a "
                              f"precomputed reference cannot follow; set dpo.reference: live (the authors' setting) "
                              f"or dpo.frames: middle")
        positive(src, "dpo.beta", self.beta)
        positive(src, "dpo.sft_weight", self.sft_weight, allow_zero=True)
        self.validate_training(src, "dpo", world_size)


@dataclass
class ExportSection:
    source_stage: Literal["auto", "sft", "dpo"] = "auto"   # auto: dpo when the recipe has it, else sft
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    max_shard_size: str = "5GB"
    trust_remote_code: bool = False          # also copy the modeling code and write auto_map
    adapter: bool = False                    # also the LoRA adapters alone (PEFT's format) in export/adapter/

    def validate(self, src: str, source: str, trained: TrainingSection | None) -> None:
        """``source``: the training stage it exports (``Recipe.export_source``); ``trained``: that
        stage's section, None when the recipe has none."""
        if trained is None:
            raise RecipeError(f"{src}: export.source_stage: exports the {source} stage's final checkpoint, but the "
                              f"recipe has no {source} section (keep it; `--stages export` runs only the export)")
        if self.adapter and trained.lora is None:
            raise RecipeError(f"{src}: export.adapter: writes the LoRA adapters of the {source} stage, which trains "
                              f"none (no {source}.lora)")
        if self.adapter and source == "sft":
            fully = [part for part, on in dataclasses.asdict(trained.trainable).items()
                     if on and part not in ("llm", "bt_adapter")]
            if fully:
                raise RecipeError(f"{src}: export.adapter: sft also trains {', '.join(fully)} fully (sft.trainable), "
                                  f"which an adapter file cannot carry; set them false to train the adapters alone, "
                                  f"or leave export.adapter out (the merged export holds everything)")
        if not re.fullmatch(r"\d+[KMG]i?B", self.max_shard_size, flags=re.IGNORECASE):
            raise RecipeError(f"{src}: export.max_shard_size: expected a size like 5GB, 500MB or 2GiB, "
                              f"got {self.max_shard_size!r}")
