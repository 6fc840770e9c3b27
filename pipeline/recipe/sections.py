"""The recipe's sections: typed keys with their defaults, and each section's own checks.

Each section's ``validate(src, ..., missing)`` checks its keys; where a key depends on the rest of
the recipe, the facts it needs (the synth stage's directory, the world size, whether a stage is
there) are its arguments, which ``pipeline.recipe.validate`` passes: the sections know nothing of
``Recipe`` (schema.py imports them, never the reverse). ``missing``: see ``validate``. The synth
and shard sections are the settings classes of the code that runs them (``SynthSettings``,
``ShardSettings``), so their keys have one home. Every key: docs/recipes.md.

    sections.py            what a run reads and where it runs: model, data, cluster
    training_sections.py   what the training stages do: sft, dpo (and the keys they share), export
    eval_sections.py       what eval asks: question files, the paper's benchmarks
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.data.records import MODALITIES
from pipeline.devices import device_named
from pipeline.recipe.checks import existing, fraction, positive, written_by_synth
from pipeline.recipe.typed_yaml import RecipeError


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
    attn_implementation: str | None = None  # default: the backend's; set, the LLM's attention too (not kernels)
    # The LLM's fused kernels (backends/kernels.py): auto (the device row's), reference, or {op: implementation}
    kernels: Literal["auto", "reference"] | dict[str, str] = "auto"
    gradient_checkpointing: bool = False

    def validate(self, src: str, synth_dir: str | None, synth_model_steps: int, missing: list[str] | None) -> None:
        """The checkpoints the model is built from (needed by a stage that builds it: sft).
        ``synth_dir``: where this recipe's synth stage writes (None: no synth stage), which writes a
        starting model when it pretrains CLIP (``synth_model_steps`` > 0)."""
        if self.source == "llava_next":
            existing(src, "model.llava_next_path", self.llava_next_path, "LLaVA-NeXT checkpoint directory", missing)
            existing(src, "model.clip_path", self.clip_path, "CLIP checkpoint directory", missing)
        elif self.source == "authors":
            existing(src, "model.authors_path", self.authors_path, "released PPLLaVA checkpoint directory (the authors')", missing)
            if self.clip_path is not None:
                existing(src, "model.clip_path", self.clip_path, "CLIP checkpoint directory", missing)
        elif self.source == "pretrained":
            if not written_by_synth(self.pretrained_path, synth_dir):
                existing(src, "model.pretrained_path", self.pretrained_path, "PPLLaVA model directory", missing)
            elif synth_model_steps <= 0:  # the demo's starting model: the synth stage writes it
                raise RecipeError(f"{src}: model.pretrained_path: {self.pretrained_path} is under the synth stage's "
                                  "directory, but synth.clip_pretrain_steps is 0, so nothing writes a model there")

    def validate_kernels(self, src: str) -> None:
        """``kernels`` and ``attn_implementation``: every stage that runs the model reads them."""
        if not isinstance(self.kernels, dict):  # auto and reference need no look-up (nor torch, which it imports)
            return
        from backends.kernels import choice_problem

        problem = choice_problem(self.kernels)
        if problem is not None:
            raise RecipeError(f"{src}: model.kernels: {problem}")
        if self.attn_implementation is not None and "attention" in self.kernels:
            raise RecipeError(f"{src}: model.kernels.attention and model.attn_implementation both choose the LLM's "
                              f"attention; keep one")


@dataclass
class DataSection:
    cards: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)   # ${NAME} values for the cards
    manifest: str | None = None            # shards made elsewhere (no shard stage in this recipe)
    verify_shards: Literal["size", "hash"] = "size"  # how shards made elsewhere are checked when training starts
    # Where and how shards are read (pipeline/data/shard_io.py); how, not what: not fingerprinted.
    shard_root: str | None = None          # a folder, URL prefix (s3://, http(s)://) or pipe: command with {path}
    read_retries: int = 5                  # re-opens in a row after a dropped connection before the run stops
    read_backoff_s: float = 1.0            # wait before the first re-open, doubling (at most 30 s)
    read_timeout_s: float = 60.0           # a connection silent this long counts as dropped
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

    def validate(self, src: str, world_size: int, shard_stage: bool, synth_dir: str | None,
                 missing: list[str] | None) -> None:
        """``shard_stage``: the recipe shards its cards (else it reads ``manifest``)."""
        for modality, weight in self.weights.items():
            if modality not in MODALITIES:
                raise RecipeError(f"{src}: data.weights.{modality}: unknown modality; expected "
                                  f"{', '.join(MODALITIES)}")
            positive(src, f"data.weights.{modality}", weight, allow_zero=True)
        for key in ("shuffle_buffer", "max_length"):
            positive(src, f"data.{key}", getattr(self, key))
        positive(src, "data.num_workers", self.num_workers, allow_zero=True)
        positive(src, "data.read_retries", self.read_retries, allow_zero=True)
        positive(src, "data.read_backoff_s", self.read_backoff_s, allow_zero=True)
        positive(src, "data.read_timeout_s", self.read_timeout_s)
        if self.shard_root is not None:
            self.validate_shard_root(src, missing)
        fraction(src, "data.max_bad_fraction", self.max_bad_fraction)
        if self.virtual_streams is not None:
            positive(src, "data.virtual_streams", self.virtual_streams)
            if self.virtual_streams % world_size:
                raise RecipeError(f"{src}: data.virtual_streams={self.virtual_streams} is not a multiple of the "
                                  f"cluster's {world_size} processes: each rank reads whole streams")
        if shard_stage:
            if not self.cards:
                raise RecipeError(f"{src}: data.cards: the shard stage needs at least one dataset card")
            for index, card in enumerate(self.cards):
                if not written_by_synth(card, synth_dir):
                    existing(src, f"data.cards[{index}]", card, "dataset card file", missing)

    def validate_shard_root(self, src: str, missing: list[str] | None) -> None:
        from pipeline.data.shard_io import is_url

        root = self.shard_root
        if root.startswith("pipe:"):
            if "{path}" not in root:
                raise RecipeError(f"{src}: data.shard_root: a pipe: command needs {{path}} where each shard's path "
                                  f"goes, e.g. 'pipe:aws s3 cp s3://bucket/shards/{{path}} -'")
        elif not is_url(root):
            existing(src, "data.shard_root", root, "folder holding the manifest's shards", missing)

    def require_manifest(self, src: str, shard_stage: bool, what: str, missing: list[str] | None) -> None:
        """A training stage in a recipe without a shard stage reads data.manifest."""
        if not shard_stage:
            existing(src, "data.manifest", self.manifest, what, missing)


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

    def validate(self, src: str, recipe_backend: str, backend: str | None = None) -> None:
        """Every key (``cluster.device`` against the recipe's backend); with the job's ``backend``
        (launch) also the GPU count against the processes."""
        for key in ("nodes", "procs_per_node", "dist_timeout_minutes"):
            positive(src, f"cluster.{key}", getattr(self, key))
        if self.device is not None:
            try:
                family = device_named(self.device, f"{src}: cluster.device").family
            except ValueError as error:
                raise RecipeError(str(error)) from None
            if recipe_backend in ("cuda", "npu") and family != recipe_backend:
                raise RecipeError(f"{src}: cluster.device: {self.device} is a {family} device, but the recipe's "
                                  f"backend is {recipe_backend}")
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
