"""The whole recipe: its sections, what it derives from them, and ``validate``.

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
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline.data.sharding import ShardSettings
from pipeline.data.synthetic import SynthSettings
from pipeline.layout import MANIFEST
from pipeline.recipe.checks import positive
from pipeline.recipe.eval_sections import EvalSection
from pipeline.recipe.sections import ClusterSection, DataSection, ModelSection
from pipeline.recipe.training_sections import DPOSection, ExportSection, SFTSection
from pipeline.recipe.typed_yaml import RecipeError

STAGE_ORDER = ("synth", "shard", "sft", "dpo", "export", "eval")


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
    # The environment variables the recipe's ${X} were read from (name -> value), for `portable`.
    environment: dict = field(default_factory=dict, metadata={"internal": True})

    @property
    def stages(self) -> list[str]:
        return [name for name in STAGE_ORDER if getattr(self, name, None) is not None]

    def stage_dir(self, stage: str) -> Path:
        return Path(self.run_dir) / stage

    @property
    def synth_dir(self) -> str | None:
        """Where this recipe's synth stage writes (paths under it need not exist yet), or None."""
        return str(self.stage_dir("synth")) if self.synth is not None else None

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
        return getattr(self, stage).batch_layout(self.source, stage, world_size)

    def batch_layout_line(self, stage: str) -> str:
        """The layout line `validate` and `launch` print for a training stage of this recipe's cluster."""
        micro, accumulation, world = self.batch_layout(self.cluster.world_size, stage)
        return (f"{stage} global batch: micro {micro} x accumulation {accumulation} x world {world} "
                f"({self.cluster.nodes} node(s) x {self.cluster.procs_per_node}) = {micro * accumulation * world}")

    def portable(self, value):
        """``value`` (a stage's inputs) with every path under the run directory written as
        ``${run_dir}/...`` and every path under a directory a variable names (``data.variables``, or
        an environment variable the recipe used, e.g. ``${DATA_ROOT}``) as ``${NAME}/...``: what a
        stage depends on, wherever the file system mounts it. A run directory moved or copied to
        another cluster (and the data with it) keeps its fingerprints; content is fingerprinted
        apart (cards, annotations, media, manifests, model files), so data that really changed
        still re-runs its stages."""
        roots = {self.run_dir: "${run_dir}"}
        for name, root in {**self.environment, **self.data.variables}.items():
            # paths only: a variable holding a setting (a template name, a dtype) must stay its value,
            # or changing it would not change the fingerprint
            if isinstance(root, str) and "/" in root and root.strip("/"):
                roots.setdefault(root, "${" + name + "}")
        prefixes = {}
        for root, name in roots.items():
            for form in (root, os.path.abspath(root), os.path.realpath(root)):
                prefixes.setdefault(form.rstrip("/"), name)
        ordered = sorted(prefixes.items(), key=lambda item: -len(item[0]))

        def rewrite(item):
            if isinstance(item, str):
                for prefix, name in ordered:
                    if item == prefix or item.startswith(prefix + "/"):
                        return name + item[len(prefix):]
                return item
            if isinstance(item, dict):
                return {rewrite(k): rewrite(v) for k, v in item.items()}
            if isinstance(item, (list, tuple)):
                return [rewrite(v) for v in item]
            return item

        return rewrite(value)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source")
        data.pop("environment")
        return {key: value for key, value in data.items() if value is not None or key not in STAGE_ORDER}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def validate(recipe: Recipe, missing_paths: list[str] | None = None) -> None:
    """Every check that needs no device, model or data: sizes, paths, batch arithmetic; each
    section checks its own keys (``sections.py``), given what it needs of the others, in
    pipeline order.

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
    world, synth_dir, shard_stage = recipe.cluster.world_size, recipe.synth_dir, recipe.shard is not None
    recipe.cluster.validate(src, recipe.backend)
    recipe.model.validate_kernels(src)
    if recipe.synth is not None:
        positive(src, "synth.clip_pretrain_steps", recipe.synth.clip_pretrain_steps, allow_zero=True)
    recipe.data.validate(src, world, shard_stage, synth_dir, missing_paths)
    if recipe.shard is not None:
        for key, what in recipe.shard.problems():
            raise RecipeError(f"{src}: shard.{key}: {what}")
    synth_model_steps = recipe.synth.clip_pretrain_steps if recipe.synth is not None else 0
    # The stages that build the model from the model section check its checkpoints: SFT, and DPO
    # when it starts from that model (dpo.init: model).
    if recipe.sft is not None:
        recipe.data.require_manifest(src, shard_stage, "manifest.json from a shard stage (no shard section here)",
                                     missing_paths)
        recipe.model.validate(src, synth_dir, synth_model_steps, missing_paths)
        recipe.sft.validate(src, world)
    if recipe.dpo is not None:
        recipe.data.require_manifest(src, shard_stage, "manifest.json with dpo shards", missing_paths)
        if recipe.dpo.init == "model":
            recipe.model.validate(src, synth_dir, synth_model_steps, missing_paths)
        recipe.dpo.validate(src, world, recipe.sft is not None, missing_paths)
    if recipe.eval is not None:
        recipe.eval.validate(src, synth_dir, recipe.export is not None, recipe.stage_dir("export"), missing_paths)
    if recipe.export is not None:
        source = recipe.export_source
        recipe.export.validate(src, source, getattr(recipe, source))
