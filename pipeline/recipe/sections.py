"""The recipe's sections: typed keys with their defaults, and each section's own checks.

Each section's ``validate(recipe, missing)`` checks its keys, including against the rest of the
recipe where a key depends on another (``missing``: see ``pipeline.recipe.validate``). The synth
and shard sections are the settings classes of the code that runs them (``SynthSettings``,
``ShardSettings``), so their keys have one home. Every key: docs/recipes.md.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pipeline.data.records import MODALITIES
from pipeline.devices import device_named
from pipeline.recipe.checks import existing, fraction, note, positive, written_by_synth
from pipeline.recipe.typed_yaml import RecipeError

if TYPE_CHECKING:
    from pipeline.recipe.schema import Recipe


@dataclass
class ModelSection:
    source: Literal["tiny", "llava_next", "pretrained", "authors"] = "tiny"
    llava_next_path: str | None = None     # source llava_next: LLaVA-NeXT checkpoint (llava-hf layout)
    clip_path: str | None = None           # source llava_next: CLIP checkpoint; authors: its config / tokenizer
    pretrained_path: str | None = None     # source pretrained: a PPLLaVA directory (save_pretrained / export)
    authors_path: str | None = None        # source authors: the authors' released checkpoint directory
    tokenizer_path: str | None = None      # default: llava_next_path, pretrained_path or authors_path
    clip_tokenizer_path: str | None = None  # default: clip_path or pretrained_path/clip_tokenizer
    config_overrides: dict[str, Any] = field(default_factory=dict)  # PPLLaVAConfig keys
    attn_implementation: str | None = None  # default: the backend's
    gradient_checkpointing: bool = False

    def validate(self, recipe: Recipe, missing: list[str] | None) -> None:
        """The checkpoints the model is built from (needed by a stage that builds it: sft)."""
        src = recipe.source
        if self.source == "llava_next":
            existing(src, "model.llava_next_path", self.llava_next_path, "LLaVA-NeXT checkpoint directory", missing)
            existing(src, "model.clip_path", self.clip_path, "CLIP checkpoint directory", missing)
        elif self.source == "authors":
            existing(src, "model.authors_path", self.authors_path, "released PPLLaVA checkpoint directory (the authors')", missing)
            if self.clip_path is not None:
                existing(src, "model.clip_path", self.clip_path, "CLIP checkpoint directory", missing)
        elif self.source == "pretrained":
            if not written_by_synth(self.pretrained_path, recipe.synth_dir):
                existing(src, "model.pretrained_path", self.pretrained_path, "PPLLaVA model directory", missing)
            elif recipe.synth.clip_pretrain_steps <= 0:  # the demo's starting model: the synth stage writes it
                raise RecipeError(f"{src}: model.pretrained_path: {self.pretrained_path} is under the synth stage's "
                                  "directory, but synth.clip_pretrain_steps is 0, so nothing writes a model there")


@dataclass
class DataSection:
    cards: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)   # ${NAME} values for the cards
    manifest: str | None = None            # shards made elsewhere (no shard stage in this recipe)
    verify_shards: Literal["size", "hash"] = "size"  # how shards made elsewhere are checked when training starts
    weights: dict[str, float] = field(default_factory=lambda: {"video": 1.0, "image": 1.0, "multi_image": 1.0})
    mixture: Literal["weights", "natural"] = "weights"  # natural: every sample equally likely (the authors')
    interleave: bool = True
    every_modality_first: bool = False     # first batches cycle through the modalities (--rehearse sets it)
    shuffle_buffer: int = 64
    virtual_streams: int | None = None     # units of the data order (None: largest power of two <= 64 the data covers)
    num_workers: int = 2
    max_bad_fraction: float = 0.01
    template: Literal["plain_v1", "vicuna_v1", "tokenizer"] = "plain_v1"
    clip_text: Literal["conversation", "turns", "questions"] = "conversation"  # what guides pooling in SFT
    frame_sampling: Literal["segments", "authors"] = "segments"  # authors: their exact index arithmetic
    max_length: int = 2048                 # LLM context, visual tokens included (pipeline/model/budget.py)
    decoder: Literal["auto", "pyav", "decord"] = "pyav"

    def validate(self, recipe: Recipe, missing: list[str] | None) -> None:
        src = recipe.source
        for modality, weight in self.weights.items():
            if modality not in MODALITIES:
                raise RecipeError(f"{src}: data.weights.{modality}: unknown modality; expected "
                                  f"{', '.join(MODALITIES)}")
            positive(src, f"data.weights.{modality}", weight, allow_zero=True)
        for key in ("shuffle_buffer", "max_length"):
            positive(src, f"data.{key}", getattr(self, key))
        positive(src, "data.num_workers", self.num_workers, allow_zero=True)
        fraction(src, "data.max_bad_fraction", self.max_bad_fraction)
        if self.virtual_streams is not None:
            positive(src, "data.virtual_streams", self.virtual_streams)
            if self.virtual_streams % recipe.cluster.world_size:
                raise RecipeError(f"{src}: data.virtual_streams={self.virtual_streams} is not a multiple of the "
                                  f"cluster's {recipe.cluster.world_size} processes: each rank reads whole streams")
        if recipe.shard is not None:
            if not self.cards:
                raise RecipeError(f"{src}: data.cards: the shard stage needs at least one dataset card")
            for index, card in enumerate(self.cards):
                if not written_by_synth(card, recipe.synth_dir):
                    existing(src, f"data.cards[{index}]", card, "dataset card file", missing)

    def require_manifest(self, recipe: Recipe, what: str, missing: list[str] | None) -> None:
        """A training stage in a recipe without a shard stage reads data.manifest."""
        if recipe.shard is None:
            existing(recipe.source, "data.manifest", self.manifest, what, missing)


@dataclass
class ClusterSection:
    nodes: int = 1
    procs_per_node: int = 1
    dist_timeout_minutes: float = 30.0
    device: str | None = None               # e.g. a100-80g: validate plans each training stage's memory on it
    # `python -m pipeline launch` only (the batch script's header and environment; docs/cluster.md):
    partition: str | None = None
    account: str | None = None
    time: str | None = None                 # SLURM time limit, e.g. 2-00:00:00
    gpus_per_node: int | None = None        # cuda: default procs_per_node; npu/cpu: none asked for
    cpus_per_task: int | None = None
    signal_seconds: int = 900               # SIGUSR1 this long before the time limit; torchrun's shutdown timeout
    setup: list[str] = field(default_factory=list)         # shell lines run before the job step
    extra_sbatch: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. --exclusive

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def validate(self, recipe: Recipe, backend: str | None = None) -> None:
        """Every key; with the job's ``backend`` (launch) also the GPU count against the processes."""
        src = recipe.source
        for key in ("nodes", "procs_per_node", "dist_timeout_minutes"):
            positive(src, f"cluster.{key}", getattr(self, key))
        if self.device is not None:
            try:
                family = device_named(self.device, f"{src}: cluster.device").family
            except ValueError as error:
                raise RecipeError(str(error)) from None
            if recipe.backend in ("cuda", "npu") and family != recipe.backend:
                raise RecipeError(f"{src}: cluster.device: {self.device} is a {family} device, but the recipe's "
                                  f"backend is {recipe.backend}")
        for key in ("gpus_per_node", "cpus_per_task", "signal_seconds"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise RecipeError(f"{src}: cluster.{key}: must be > 0, got {value}")
        if backend == "cuda" and self.gpus_per_node is not None and self.gpus_per_node < self.procs_per_node:
            raise RecipeError(f"{src}: cluster.gpus_per_node={self.gpus_per_node} is fewer than cluster.procs_per_node="
                              f"{self.procs_per_node}: one process per GPU")
        for key in ("partition", "account", "time"):
            value = getattr(self, key)
            if value is not None and not re.fullmatch(SLURM_WORD, value):
                raise RecipeError(f"{src}: cluster.{key}: {value!r} is not a SLURM {key} (letters, digits, _ . , : - only)")
        for index, option in enumerate(self.extra_sbatch):
            if not option.startswith("-") or "\n" in option:
                raise RecipeError(f"{src}: cluster.extra_sbatch[{index}]: expected one sbatch option like --exclusive, "
                                  f"got {option!r}")
        for index, line in enumerate(self.setup):
            if "\n" in line:
                raise RecipeError(f"{src}: cluster.setup[{index}]: one shell line per item")


# What a SLURM partition, account or time limit may contain: they go into the batch script unquoted.
SLURM_WORD = r"[A-Za-z0-9_.,:@%/+=-]+"


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
    lora: LoraSection | None = None  # the LLM trains through LoRA adapters, its own weights frozen

    def validate_training(self, recipe: Recipe, stage: str) -> None:
        """Checks every training stage shares: positive sizes, fractions, batch arithmetic."""
        src = recipe.source
        for key in ("global_batch_size", "micro_batch_size", "lr", "epochs", "log_every", "save_every", "keep_last",
                    "max_nonfinite_in_a_row"):
            positive(src, f"{stage}.{key}", getattr(self, key))
        for key in ("gradient_accumulation_steps", "max_steps"):
            if getattr(self, key) is not None:
                positive(src, f"{stage}.{key}", getattr(self, key))
        positive(src, f"{stage}.gradient_clipping", self.gradient_clipping, allow_zero=True)
        positive(src, f"{stage}.weight_decay", self.weight_decay, allow_zero=True)
        fraction(src, f"{stage}.warmup_ratio", self.warmup_ratio, below_one=True)
        fraction(src, f"{stage}.min_lr_ratio", self.min_lr_ratio)
        if self.offload_optimizer and self.zero_stage < 2:
            raise RecipeError(f"{src}: {stage}.offload_optimizer: needs {stage}.zero_stage 2 or 3, got {self.zero_stage}")
        if self.lora is not None:
            self.lora.validate(src, stage)
        recipe.batch_layout(recipe.cluster.world_size, stage)


@dataclass
class SFTSection(TrainingSection):
    trainable: TrainableParts = field(default_factory=TrainableParts)

    def validate(self, recipe: Recipe, missing: list[str] | None) -> None:
        recipe.data.require_manifest(recipe, "manifest.json from a shard stage (no shard section here)", missing)
        recipe.model.validate(recipe, missing)
        self.validate_training(recipe, "sft")
        if not any(dataclasses.asdict(self.trainable).values()) and self.lora is None:
            raise RecipeError(f"{recipe.source}: sft.trainable: at least one part must train")
        if self.lora is not None:
            if self.trainable.llm:
                raise RecipeError(f"{recipe.source}: sft.lora trains the LLM through adapters, but sft.trainable.llm "
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

    def validate(self, recipe: Recipe, missing: list[str] | None) -> None:
        src = recipe.source
        recipe.data.require_manifest(recipe, "manifest.json with dpo shards", missing)
        if self.init == "sft":
            if recipe.sft is None:
                raise RecipeError(f"{src}: dpo.init: 'sft' starts from this recipe's SFT stage, but the recipe has "
                                  f"no sft section; name a PPLLaVA model directory, or 'model' (the model section)")
        elif self.init == "model":
            recipe.model.validate(recipe, missing)
        else:
            existing(src, "dpo.init", self.init, "PPLLaVA model directory (or 'sft')", missing)
        if self.frames == "random" and self.reference != "live":
            raise RecipeError(f"{src}: dpo.frames: 'random' samples new frames each time a pair is read, which a "
                              f"precomputed reference cannot follow; set dpo.reference: live (the authors' setting) "
                              f"or dpo.frames: middle")
        positive(src, "dpo.beta", self.beta)
        positive(src, "dpo.sft_weight", self.sft_weight, allow_zero=True)
        self.validate_training(recipe, "dpo")


@dataclass
class ExportSection:
    source_stage: Literal["auto", "sft", "dpo"] = "auto"   # auto: dpo when the recipe has it, else sft
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    max_shard_size: str = "5GB"
    trust_remote_code: bool = False          # also copy the modeling code and write auto_map
    adapter: bool = False                    # also the LoRA adapters alone (PEFT's format) in export/adapter/

    def validate(self, recipe: Recipe, missing: list[str] | None) -> None:
        src, source = recipe.source, recipe.export_source
        if getattr(recipe, source) is None:
            raise RecipeError(f"{src}: export.source_stage: exports the {source} stage's final checkpoint, but the "
                              f"recipe has no {source} section (keep it; `--stages export` runs only the export)")
        if self.adapter and getattr(recipe, source).lora is None:
            raise RecipeError(f"{src}: export.adapter: writes the LoRA adapters of the {source} stage, which trains "
                              f"none (no {source}.lora)")
        if self.adapter and source == "sft":
            fully = [part for part, on in dataclasses.asdict(recipe.sft.trainable).items()
                     if on and part not in ("llm", "bt_adapter")]
            if fully:
                raise RecipeError(f"{src}: export.adapter: sft also trains {', '.join(fully)} fully (sft.trainable), "
                                  f"which an adapter file cannot carry; set them false to train the adapters alone, "
                                  f"or leave export.adapter out (the merged export holds everything)")
        if not re.fullmatch(r"\d+[KMG]i?B", self.max_shard_size, flags=re.IGNORECASE):
            raise RecipeError(f"{src}: export.max_shard_size: expected a size like 5GB, 500MB or 2GiB, "
                              f"got {self.max_shard_size!r}")


BENCHMARK_NAMES = ("mvbench", "videomme", "msvd_qa", "msrvtt_qa", "activitynet_qa", "vcg")
# The paths each benchmark reads (pipeline/benchmarks/readers.py): the others must be left out.
BENCHMARK_PATHS = {"mvbench": ("root",), "videomme": ("root",), "msvd_qa": ("annotations", "videos"),
                   "msrvtt_qa": ("annotations", "videos"), "activitynet_qa": ("annotations", "answers", "videos"),
                   "vcg": ("root", "videos")}


@dataclass
class BenchmarkSection:
    """One of the paper's benchmarks in its published layout, asked the authors' way (docs/eval.md)."""

    name: Literal["mvbench", "videomme", "msvd_qa", "msrvtt_qa", "activitynet_qa", "vcg"]
    root: str | None = None             # mvbench, videomme: the benchmark's folder; vcg: its Benchmarking_QA folder
    annotations: str | None = None      # QA: the questions file (with answers, but ActivityNet-QA's)
    answers: str | None = None          # activitynet_qa: test_a.json
    videos: str | None = None           # QA, vcg: the folder of videos (or frame folders)
    subtitles: bool = False             # videomme: the subtitles shown at the sampled frames go first
    system: bool = False                # mvbench: the authors' system text first (their released script omits it)
    num_frames: int | None = None       # default: videomme 32 short / 64 medium and long; else the model's
    video_kernel: list[int] | None = None  # default the model's (the authors keep (2,3,3) for 64 frames)
    limit: int | None = None            # the first N questions of each task / duration / file
    max_new_tokens: int = 200           # the authors' generation length

    @property
    def label(self) -> str:
        """Its name in results and file names: VideoMME with subtitles is another column of the paper's."""
        return f"{self.name}_subtitles" if self.subtitles else self.name

    def validate(self, src: str, where: str, missing: list[str] | None) -> None:
        needed = BENCHMARK_PATHS[self.name]
        for key in ("root", "annotations", "answers", "videos"):
            value = getattr(self, key)
            if key in needed:
                if value is None:
                    raise RecipeError(f"{src}: {where}.{key}: {self.name} needs it (docs/eval.md)")
                existing(src, f"{where}.{key}", value, f"{self.name} {key}", missing)
            elif value is not None:
                raise RecipeError(f"{src}: {where}.{key}: {self.name} does not read it (it reads "
                                  f"{', '.join(needed)})")
        if self.subtitles and self.name != "videomme":
            raise RecipeError(f"{src}: {where}.subtitles: only videomme has subtitles")
        if self.system and self.name != "mvbench":
            raise RecipeError(f"{src}: {where}.system: only mvbench has the authors' system text")
        for key in ("num_frames", "limit", "max_new_tokens"):
            if getattr(self, key) is not None:
                positive(src, f"{where}.{key}", getattr(self, key))
        if self.video_kernel is not None and (len(self.video_kernel) != 3 or min(self.video_kernel) < 1):
            raise RecipeError(f"{src}: {where}.video_kernel: expected three positive integers (t, h, w), "
                              f"got {self.video_kernel}")


@dataclass
class EvalSection:
    model_path: str | None = None            # default: the export stage's directory
    multiple_choice: list[str] = field(default_factory=list)  # MVBench-style JSON files
    open_ended: list[str] = field(default_factory=list)       # JSON files of {video|image, question}
    media_root: str | None = None            # media paths are relative to it (default: each file's folder)
    num_frames: int | None = None            # default: the model's
    video_kernel: list[int] | None = None    # e.g. [4, 3, 3] with 64 frames (paper Table 8)
    max_new_tokens: int = 64
    prompt: Literal["mvbench", "plain"] = "mvbench"  # how a multiple-choice question is asked (docs/recipes.md)
    limit: int | None = None                 # questions per file at most
    baseline: bool = False                   # also score the untrained start model on the same questions
    benchmarks: list[BenchmarkSection] = field(default_factory=list)  # the paper's, the authors' way
    relevance_maps: int = 0                  # the first N questions of each benchmark: a relevance-map PNG
    batch_size: int = 8                      # benchmark questions per batched generation

    def validate(self, recipe: Recipe, missing: list[str] | None) -> None:
        src, synth_dir = recipe.source, recipe.synth_dir
        if not self.multiple_choice and not self.open_ended and not self.benchmarks:
            raise RecipeError(f"{src}: eval: give at least one question file in eval.multiple_choice or "
                              f"eval.open_ended, or a benchmark in eval.benchmarks")
        positive(src, "eval.relevance_maps", self.relevance_maps, allow_zero=True)
        positive(src, "eval.batch_size", self.batch_size)
        names = [benchmark.label for benchmark in self.benchmarks]
        if len(set(names)) != len(names):
            raise RecipeError(f"{src}: eval.benchmarks: {names} names a benchmark twice (videomme may appear "
                              f"twice: with and without subtitles)")
        for index, benchmark in enumerate(self.benchmarks):
            benchmark.validate(src, f"eval.benchmarks[{index}]", missing)
        for key in ("num_frames", "limit"):
            if getattr(self, key) is not None:
                positive(src, f"eval.{key}", getattr(self, key))
        positive(src, "eval.max_new_tokens", self.max_new_tokens)
        if self.video_kernel is not None and (len(self.video_kernel) != 3 or min(self.video_kernel) < 1):
            raise RecipeError(f"{src}: eval.video_kernel: expected three positive integers (t, h, w), "
                              f"got {self.video_kernel}")
        for key in ("multiple_choice", "open_ended"):
            for index, path in enumerate(getattr(self, key)):
                if not written_by_synth(path, synth_dir):
                    existing(src, f"eval.{key}[{index}]", path, "JSON file of questions", missing)
        if self.media_root is not None and not written_by_synth(self.media_root, synth_dir):
            existing(src, "eval.media_root", self.media_root, "directory of the questions' media", missing)
        if self.model_path is not None:
            existing(src, "eval.model_path", self.model_path, "model directory (an export)", missing)
        elif recipe.export is None and not recipe.stage_dir("export").is_dir():
            note(f"{src}: eval.model_path: not set, and there is no export section in the recipe nor an export in "
                 f"{recipe.stage_dir('export')}; set it to a model directory", missing)
