"""The eval section: question files and the paper's benchmarks in their published layouts, asked
the authors' way (docs/eval.md); each section's own checks (see ``sections.py`` for how they
validate). Every key: docs/recipes.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.recipe.checks import existing, note, positive, written_by_synth
from pipeline.recipe.typed_yaml import RecipeError


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
    frame_sampling: Literal["authors", "segments"] = "authors"  # which frames: the authors' eval arithmetic
                                        # (their EvalDataset.get_index), or segment middles; not the model's
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
    authors_rope_rounding: bool = False      # the LLM's RoPE frequencies rounded to fp16, as the authors'
                                             # benchmark scripts leave them (docs/eval.md)

    def validate(self, src: str, synth_dir: str | None, export_stage: bool, export_dir: Path,
                 missing: list[str] | None) -> None:
        """``export_stage``: the recipe exports a model (to ``export_dir``), the default model_path."""
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
        elif not export_stage and not export_dir.is_dir():
            note(f"{src}: eval.model_path: not set, and there is no export section in the recipe nor an export in "
                 f"{export_dir}; set it to a model directory", missing)
