"""Recipes: YAML -> typed dataclasses, validated before any device, model or data work.

    name: demo_cpu
    run_dir: runs/demo_cpu
    backend: cpu            # auto | cpu | cuda | npu
    seed: 0
    model: {...}            # ModelSection
    data: {...}             # DataSection
    cluster: {...}          # ClusterSection
    synth: {...}            # one section per stage; the stages a recipe runs are the sections
    shard: {...}            #   it has, in pipeline order (STAGE_ORDER)
    sft: {...}

Every key and its meaning: docs/recipes.md. Errors name the dotted key path, what was expected
and, for a misspelt key, the nearest allowed name. This module imports no torch, so a bad recipe
fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.data.records import VISUAL_MODALITIES
from pipeline.data.sharding import ShardSettings
from pipeline.data.synthetic import SynthSettings
from pipeline.layout import MANIFEST

STAGE_ORDER = ("synth", "shard", "sft", "dpo", "export", "eval")


# Names other trainers use (HF Trainer, torchtune, DeepSpeed) -> ours, for "did you mean".
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
           "per_device_train_batch_size": "micro_batch_size", "batch_size": "micro_batch_size",
           "train_batch_size": "global_batch_size", "gradient_accumulation": "gradient_accumulation_steps",
           "max_grad_norm": "gradient_clipping", "clip_grad_norm": "gradient_clipping", "warmup": "warmup_ratio",
           "output_dir": "run_dir", "bf16": "precision", "fp16": "precision", "device": "backend"}


class RecipeError(ValueError):
    """A recipe that cannot run; the message starts with the file and the dotted key path."""


@dataclass
class ModelSection:
    source: Literal["tiny", "llava_next", "pretrained"] = "tiny"
    llava_next_path: str | None = None     # source llava_next: LLaVA-NeXT checkpoint (llava-hf layout)
    clip_path: str | None = None           # source llava_next: CLIP checkpoint (text tower + projections)
    pretrained_path: str | None = None     # source pretrained: a PPLLaVA directory (save_pretrained / export)
    tokenizer_path: str | None = None      # default: llava_next_path or pretrained_path
    clip_tokenizer_path: str | None = None  # default: clip_path or pretrained_path/clip_tokenizer
    config_overrides: dict[str, Any] = field(default_factory=dict)  # PPLLaVAConfig keys
    attn_implementation: str | None = None  # default: the backend's
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    cards: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)   # ${NAME} values for the cards
    manifest: str | None = None            # shards made elsewhere (no shard stage in this recipe)
    weights: dict[str, float] = field(default_factory=lambda: {"video": 1.0, "image": 1.0, "multi_image": 1.0})
    interleave: bool = True
    shuffle_buffer: int = 64
    num_workers: int = 2
    max_bad_fraction: float = 0.01
    template: Literal["vicuna_v1", "tokenizer"] = "vicuna_v1"
    max_length: int = 1024
    decoder: Literal["auto", "pyav", "decord"] = "pyav"


@dataclass
class ClusterSection:
    nodes: int = 1
    procs_per_node: int = 1
    dist_timeout_minutes: float = 30.0
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


@dataclass
class TrainableParts:
    vision: bool = False
    projector: bool = True
    clip_text: bool = True
    llm: bool = True


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
    max_nonfinite_in_a_row: int = 5


@dataclass
class SFTSection(TrainingSection):
    trainable: TrainableParts = field(default_factory=TrainableParts)


@dataclass
class DPOSection(TrainingSection):
    """LLaVA-Hound-style DPO on video pairs (paper Table 9): the LLM trains, nothing else."""

    global_batch_size: int = 64
    lr: float = 5e-6
    warmup_ratio: float = 0.1
    epochs: float = 2.0
    beta: float = 0.1
    sft_weight: float = 0.0                 # weight of an extra NLL term on the chosen answers
    reference: Literal["precomputed", "live"] = "precomputed"
    init: str = "sft"                       # "sft": the SFT stage's final checkpoint; else a PPLLaVA directory


@dataclass
class ExportSection:
    source_stage: Literal["auto", "sft", "dpo"] = "auto"   # auto: dpo when the recipe has it, else sft
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    max_shard_size: str = "5GB"
    trust_remote_code: bool = False          # also copy the modeling code and write auto_map


@dataclass
class EvalSection:
    model_path: str | None = None            # default: the export stage's directory
    multiple_choice: list[str] = field(default_factory=list)  # MVBench-style JSON files
    open_ended: list[str] = field(default_factory=list)       # JSON files of {video|image, question}
    media_root: str | None = None            # media paths are relative to it (default: each file's folder)
    num_frames: int | None = None            # default: the model's
    video_kernel: list[int] | None = None    # e.g. [4, 3, 3] with 64 frames (paper Table 8)
    max_new_tokens: int = 64
    limit: int | None = None                 # questions per file at most
    baseline: bool = False                   # also score the untrained start model on the same questions


@dataclass
class Recipe:
    name: str
    run_dir: str
    backend: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    synth: SynthSettings | None = None
    shard: ShardSettings | None = None
    sft: SFTSection | None = None
    dpo: DPOSection | None = None
    export: ExportSection | None = None
    eval: EvalSection | None = None
    source: str = field(default="<recipe>", metadata={"internal": True})

    @property
    def stages(self) -> list[str]:
        return [name for name in STAGE_ORDER if getattr(self, name, None) is not None]

    def stage_dir(self, stage: str) -> Path:
        return Path(self.run_dir) / stage

    @property
    def export_source(self) -> str:
        """The training stage whose final checkpoint the export stage reads (export.source_stage)."""
        if self.export is not None and self.export.source_stage != "auto":
            return self.export.source_stage
        return "dpo" if self.dpo is not None else "sft"

    @property
    def manifest_path(self) -> Path:
        return self.stage_dir("shard") / MANIFEST if self.shard is not None else Path(self.data.manifest or "")

    def batch_layout(self, world_size: int, stage: str = "sft") -> tuple[int, int, int]:
        """(micro batch, accumulation, world) whose product is <stage>.global_batch_size, or RecipeError."""
        section = getattr(self, stage)
        micro, accumulation, target = section.micro_batch_size, section.gradient_accumulation_steps, section.global_batch_size
        if accumulation is None:
            if target % (micro * world_size):
                raise RecipeError(f"{self.source}: {stage}.global_batch_size={target} is not divisible by "
                                  f"{stage}.micro_batch_size x world size = {micro} x {world_size}; change one of "
                                  f"them or set {stage}.gradient_accumulation_steps")
            accumulation = target // (micro * world_size)
        if micro * accumulation * world_size != target:
            raise RecipeError(f"{self.source}: {stage}.micro_batch_size x {stage}.gradient_accumulation_steps x world "
                              f"size = {micro} x {accumulation} x {world_size} = {micro * accumulation * world_size}, "
                              f"but {stage}.global_batch_size={target}")
        return micro, accumulation, world_size

    def batch_layout_line(self, stage: str) -> str:
        """The layout line `validate` and `launch` print for a training stage of this recipe's cluster."""
        micro, accumulation, world = self.batch_layout(self.cluster.world_size, stage)
        return (f"{stage} global batch: micro {micro} x accumulation {accumulation} x world {world} "
                f"({self.cluster.nodes} node(s) x {self.cluster.procs_per_node}) = {micro * accumulation * world}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source")
        return {key: value for key, value in data.items() if value is not None or key not in STAGE_ORDER}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- parsing -------------------------------------------------------------------------------------

def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(kind))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(kind))
    if origin is list:
        return f"a list of {_describe(typing.get_args(kind)[0])}"
    if origin is dict:
        return f"a mapping of {_describe(typing.get_args(kind)[1])}"
    if dataclasses.is_dataclass(kind):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(kind))
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string",
            Any: "any value"}.get(kind, str(kind))


def _convert(kind: Any, value: Any, path: str, source: str) -> Any:
    """``value`` as ``kind``, or RecipeError naming ``path`` and what was expected."""
    origin = typing.get_origin(kind)
    wrong = RecipeError(f"{source}: {path}: expected {_describe(kind)}, got {value!r}")
    if kind is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(kind) and type(value) in {type(v) for v in typing.get_args(kind)}:
            return value
        raise wrong
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(kind) if option is not type(None)]
        if value is None and len(options) < len(typing.get_args(kind)):
            return None
        if len(options) == 1:  # "X or null": X's own, more precise, error
            return _convert(options[0], value, path, source)
        for option in options:
            try:
                return _convert(option, value, path, source)
            except RecipeError:
                continue
        raise wrong
    if kind is type(None):
        if value is None:
            return None
        raise wrong
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, path, source)
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        return [_convert(typing.get_args(kind)[0], item, f"{path}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        return {str(k): _convert(typing.get_args(kind)[1], v, f"{path}.{k}", source) for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 1e-5 (no dot) as a string; it is a number to anyone writing a learning rate.
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            return float(value)
        raise wrong
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    raise TypeError(f"recipe schema has an unsupported type at {path}: {kind}")


def _build(cls: type, data: Any, path: str, source: str) -> Any:
    if data is None:
        data = {}
    where = path or "the recipe's top level"
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {where}: expected {_describe(cls)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in allowed:
            close = [ALIASES[key]] if ALIASES.get(key) in allowed else difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{source}: {dotted}: unknown key{hint}; allowed keys here: {', '.join(allowed)}")
        kwargs[key] = _convert(hints[key], value, dotted, source)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{source}: {where}: missing required key(s) {', '.join(missing)}")
    return cls(**kwargs)


def apply_override(data: dict, assignment: str, source: str = "<override>") -> None:
    """``a.b.c=value`` into the raw recipe mapping; the value is parsed as YAML (1e-5, true, [1,2])."""
    if "=" not in assignment:
        raise RecipeError(f"override {assignment!r} is not of the form key=value (e.g. sft.lr=1e-5)")
    dotted, _, raw = assignment.partition("=")
    keys = dotted.strip().split(".")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    for depth, key in enumerate(keys[:-1]):
        if node.get(key) is None:
            if depth == 0 and key in STAGE_ORDER:
                raise RecipeError(f"override {assignment!r}: {source} has no '{key}' section, so the {key} stage "
                                  f"does not run; add the section to the recipe to configure it")
            node[key] = {}
        if not isinstance(node[key], dict):
            raise RecipeError(f"override {assignment!r}: {'.'.join(keys[:depth + 1])} is not a mapping")
        node = node[key]
    node[keys[-1]] = value


def _interpolate(value: Any, variables: dict[str, str]) -> Any:
    """``${run_dir}`` / ``${name}``, then ``${X}`` set in the environment, in string values; an unset
    ``${X}`` stays (a dataset card may define it, and a path check names it if it is not)."""
    if isinstance(value, str):
        value = re.sub(r"\$\{(run_dir|name)\}", lambda m: variables[m.group(1)], value)
        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: os.environ.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [_interpolate(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, variables) for k, v in value.items()}
    return value


def parse_recipe(data: Any, overrides: list[str] = (), source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of keys, got {type(data).__name__}")
    data = dict(data)
    for assignment in overrides:
        apply_override(data, assignment, source)
    if isinstance(data.get("run_dir"), str):  # run_dir may itself use ${name}
        data["run_dir"] = data["run_dir"].replace("${name}", str(data.get("name", "")))
    data = _interpolate(data, {"name": str(data.get("name", "")), "run_dir": str(data.get("run_dir", ""))})
    recipe = _build(Recipe, data, "", source)
    recipe.source = source
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    return parse_recipe(data, overrides, str(path))


# -- validation ----------------------------------------------------------------------------------

def _positive(recipe: Recipe, path: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise RecipeError(f"{recipe.source}: {path}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _existing(recipe: Recipe, path: str, value: str | None, kind: str, missing: list[str] | None) -> None:
    """A required path: absent from the recipe is always an error; not found on disk is an error,
    or with ``missing`` given (``validate`` on a login node) a note appended to it."""
    if not value:
        raise RecipeError(f"{recipe.source}: {path}: required here, expected a {kind}")
    if os.path.exists(value):
        return
    unset = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value)
    reason = (f"uses ${{{unset[0]}}}, which is not set in the environment" if unset else "does not exist")
    message = f"{recipe.source}: {path}: {value} {reason} (expected a {kind})"
    if missing is None:
        raise RecipeError(message)
    missing.append(message)


def validate(recipe: Recipe, missing_paths: list[str] | None = None) -> None:
    """Cross-key checks that need no device, model or data: sizes, paths, batch arithmetic.

    Paths that do not exist raise, unless ``missing_paths`` is given: then they are collected
    there (a recipe for a cluster can be checked on a machine without the cluster's storage).
    """
    src = recipe.source
    if not recipe.stages:
        raise RecipeError(f"{src}: no stage section; add one or more of {', '.join(STAGE_ORDER)}")
    if not recipe.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", recipe.name):
        raise RecipeError(f"{src}: name: letters, digits, '_', '.' and '-' only, got {recipe.name!r}")
    if not recipe.run_dir:
        raise RecipeError(f"{src}: run_dir: required, expected a directory path")
    if "${" in recipe.run_dir:
        raise RecipeError(f"{src}: run_dir: {recipe.run_dir} uses a variable that is not set in the environment")
    for key in ("nodes", "procs_per_node"):
        _positive(recipe, f"cluster.{key}", getattr(recipe.cluster, key))
    _positive(recipe, "cluster.dist_timeout_minutes", recipe.cluster.dist_timeout_minutes)
    data = recipe.data
    for modality, weight in data.weights.items():
        if modality not in VISUAL_MODALITIES:
            raise RecipeError(f"{src}: data.weights.{modality}: unknown modality; expected {', '.join(VISUAL_MODALITIES)}")
        _positive(recipe, f"data.weights.{modality}", weight, allow_zero=True)
    for key in ("shuffle_buffer", "max_length"):
        _positive(recipe, f"data.{key}", getattr(data, key))
    _positive(recipe, "data.num_workers", data.num_workers, allow_zero=True)
    if not 0 <= data.max_bad_fraction <= 1:
        raise RecipeError(f"{src}: data.max_bad_fraction: expected a fraction in [0, 1], got {data.max_bad_fraction}")
    if recipe.shard is not None:
        if not data.cards:
            raise RecipeError(f"{src}: data.cards: the shard stage needs at least one dataset card")
        synth_dir = str(recipe.stage_dir("synth")) if recipe.synth is not None else None
        for index, card in enumerate(data.cards):
            if synth_dir is None or not os.path.normpath(card).startswith(os.path.normpath(synth_dir)):
                _existing(recipe, f"data.cards[{index}]", card, "dataset card file", missing_paths)
        for key, what in recipe.shard.problems():
            raise RecipeError(f"{src}: shard.{key}: {what}")
    if recipe.sft is not None:
        _validate_sft(recipe, missing_paths)
    if recipe.dpo is not None:
        _validate_dpo(recipe, missing_paths)
    if recipe.eval is not None:
        _validate_eval(recipe, missing_paths)
    if recipe.export is not None:
        _validate_export(recipe)


def _validate_export(recipe: Recipe) -> None:
    section, src = recipe.export, recipe.source
    source = recipe.export_source
    if getattr(recipe, source) is None:
        raise RecipeError(f"{src}: export.source_stage: exports the {source} stage's final checkpoint, but the recipe "
                          f"has no {source} section (keep it; `--stages export` runs only the export)")
    if not re.fullmatch(r"\d+[KMG]i?B", section.max_shard_size, flags=re.IGNORECASE):
        raise RecipeError(f"{src}: export.max_shard_size: expected a size like 5GB, 500MB or 2GiB, "
                          f"got {section.max_shard_size!r}")


def _validate_training(recipe: Recipe, stage: str, missing: list[str] | None) -> None:
    """Checks every training stage (sft, dpo) shares: positive sizes, fractions, batch arithmetic."""
    src, section = recipe.source, getattr(recipe, stage)
    for key in ("global_batch_size", "micro_batch_size", "lr", "epochs", "log_every", "save_every", "keep_last",
                "max_nonfinite_in_a_row"):
        _positive(recipe, f"{stage}.{key}", getattr(section, key))
    for key in ("gradient_accumulation_steps", "max_steps"):
        if getattr(section, key) is not None:
            _positive(recipe, f"{stage}.{key}", getattr(section, key))
    _positive(recipe, f"{stage}.gradient_clipping", section.gradient_clipping, allow_zero=True)
    _positive(recipe, f"{stage}.weight_decay", section.weight_decay, allow_zero=True)
    if not 0 <= section.warmup_ratio < 1:
        raise RecipeError(f"{src}: {stage}.warmup_ratio: expected a fraction in [0, 1), got {section.warmup_ratio}")
    if not 0 <= section.min_lr_ratio <= 1:
        raise RecipeError(f"{src}: {stage}.min_lr_ratio: expected a fraction in [0, 1], got {section.min_lr_ratio}")
    if section.offload_optimizer and section.zero_stage < 2:
        raise RecipeError(f"{src}: {stage}.offload_optimizer: needs {stage}.zero_stage 2 or 3, got {section.zero_stage}")
    recipe.batch_layout(recipe.cluster.world_size, stage)


def _validate_sft(recipe: Recipe, missing: list[str] | None) -> None:
    model = recipe.model
    if recipe.shard is None:
        _existing(recipe, "data.manifest", recipe.data.manifest, "manifest.json from a shard stage (no shard section "
                  "here)", missing)
    if model.source == "llava_next":
        _existing(recipe, "model.llava_next_path", model.llava_next_path, "LLaVA-NeXT checkpoint directory", missing)
        _existing(recipe, "model.clip_path", model.clip_path, "CLIP checkpoint directory", missing)
    elif model.source == "pretrained":
        _existing(recipe, "model.pretrained_path", model.pretrained_path, "PPLLaVA model directory", missing)
    _validate_training(recipe, "sft", missing)
    if not any(dataclasses.asdict(recipe.sft.trainable).values()):
        raise RecipeError(f"{recipe.source}: sft.trainable: at least one part must train")


def _validate_eval(recipe: Recipe, missing: list[str] | None) -> None:
    src, section = recipe.source, recipe.eval
    if not section.multiple_choice and not section.open_ended:
        raise RecipeError(f"{src}: eval: give at least one question file in eval.multiple_choice or eval.open_ended")
    for key in ("num_frames", "limit"):
        if getattr(section, key) is not None:
            _positive(recipe, f"eval.{key}", getattr(section, key))
    _positive(recipe, "eval.max_new_tokens", section.max_new_tokens)
    if section.video_kernel is not None and (len(section.video_kernel) != 3 or min(section.video_kernel) < 1):
        raise RecipeError(f"{src}: eval.video_kernel: expected three positive integers (t, h, w), got {section.video_kernel}")
    synth_dir = os.path.normpath(recipe.stage_dir("synth")) if recipe.synth is not None else None
    for key in ("multiple_choice", "open_ended"):
        for index, path in enumerate(getattr(section, key)):
            if synth_dir is None or not os.path.normpath(path).startswith(synth_dir):  # else this run writes it
                _existing(recipe, f"eval.{key}[{index}]", path, "JSON file of questions", missing)
    written_here = synth_dir is not None and os.path.normpath(section.media_root or "").startswith(synth_dir)
    if section.media_root is not None and not written_here:
        _existing(recipe, "eval.media_root", section.media_root, "directory of the questions' media", missing)
    if section.model_path is not None:
        _existing(recipe, "eval.model_path", section.model_path, "model directory (an export)", missing)
    elif recipe.export is None and not recipe.stage_dir("export").is_dir():
        message = (f"{src}: eval.model_path: not set, and there is no export section in the recipe nor an export in "
                   f"{recipe.stage_dir('export')}; set it to a model directory")
        if missing is None:
            raise RecipeError(message)
        missing.append(message)


def _validate_dpo(recipe: Recipe, missing: list[str] | None) -> None:
    dpo = recipe.dpo
    if recipe.shard is None:
        _existing(recipe, "data.manifest", recipe.data.manifest, "manifest.json with dpo shards", missing)
    if dpo.init == "sft":
        if recipe.sft is None:
            raise RecipeError(f"{recipe.source}: dpo.init: 'sft' starts from this recipe's SFT stage, but the recipe has "
                              f"no sft section; name a PPLLaVA model directory instead")
    else:
        _existing(recipe, "dpo.init", dpo.init, "PPLLaVA model directory (or 'sft')", missing)
    _positive(recipe, "dpo.beta", dpo.beta)
    _positive(recipe, "dpo.sft_weight", dpo.sft_weight, allow_zero=True)
    _validate_training(recipe, "dpo", missing)


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe mappings."""
    keys = sorted(set(old) | set(new))
    changed = []
    for key in keys:
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += differences(a, b, f"{path}.")
        elif a != b:
            changed.append(path)
    return changed
