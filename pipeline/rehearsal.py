"""`python -m pipeline run RECIPE --rehearse`: a cluster recipe's stages on this host's CPU, with
everything real except the model's width and depth.

What a user runs on a login node before queueing 32 NPUs. Real: the recipe's dataset cards and
media (the first N records of each card), frames, image size, kernels, chat template, context,
tokenizers, special ids and vocabulary sizes, ZeRO stage, loader workers. Shrunk: the model's
hidden sizes and layer counts (``pipeline.model.tiny.SHRUNK_WIDTH``), randomly initialised, and
the schedule (a few optimizer steps per training stage, one process, eval answers of NEW_TOKENS). Any sample the real run
would refuse, any length, shape or format error shows up in minutes, and the summary says what
each stage accepted, refused (with reasons) and measured.

    <run_dir>/rehearsal/              the rehearsal's own run directory (the real run is untouched)
      models/<name>/                  the shrunk models it starts from (sft, dpo.init, eval.model_path)
      shard/ sft/ dpo/ export/ eval/  as in a real run
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from pipeline.layout import COMPLETE, MANIFEST, METRICS, PROCESSOR_CONFIG
from pipeline.metrics import read_metrics
from pipeline.recipe import Recipe, RecipeError

REHEARSAL_DIR = "rehearsal"
SEED = 0
# Tokens a rehearsal's eval generates per answer: a random model's answer has no end, and what a
# rehearsal checks (media, prompts, context, answer readers) is met by the first tokens.
NEW_TOKENS = 16


def rehearsal_dir(recipe: Recipe) -> Path:
    return Path(recipe.run_dir) / REHEARSAL_DIR


def _write_model(config, tokenizer, clip_tokenizer, directory: Path, processor_config: Path | None = None) -> str:
    """A randomly initialised model of ``config`` with its tokenizers, as `source: pretrained` reads it."""
    import torch

    from pipeline.model.setup import save_tokenizers
    from ppllava import PPLLaVAForConditionalGeneration

    torch.manual_seed(SEED)
    PPLLaVAForConditionalGeneration(config).save_pretrained(directory)
    save_tokenizers(tokenizer, clip_tokenizer, directory)
    if processor_config is not None and processor_config.is_file():
        shutil.copy(processor_config, directory / PROCESSOR_CONFIG)
    return str(directory)


def _shrunk_directory_model(path: str, key: str, out: Path) -> str:
    """A shrunk copy of a PPLLaVA model directory (config, tokenizers and processor settings)."""
    from pipeline.model.setup import load_directory_tokenizers
    from pipeline.model.tiny import shrunk_config
    from ppllava import PPLLaVAConfig

    if not (Path(path) / "config.json").is_file():
        raise RecipeError(f"{key}: {path} is not a PPLLaVA model directory yet; a rehearsal reads its config and "
                          f"tokenizers (rehearse the recipe that makes it first, then point {key} at that "
                          f"rehearsal's export, e.g. {key}=<its run_dir>/{REHEARSAL_DIR}/export)")
    tokenizer, clip_tokenizer = load_directory_tokenizers(Path(path))
    config = shrunk_config(PPLLaVAConfig.from_pretrained(path))
    return _write_model(config, tokenizer, clip_tokenizer, out, Path(path) / PROCESSOR_CONFIG)


def _shrunk_training_model(recipe: Recipe, out: Path) -> str:
    """The SFT start model at tiny width: the recipe's real configs and tokenizers."""
    from pipeline.model.budget import training_model_config
    from pipeline.model.setup import load_tokenizers
    from pipeline.model.tiny import shrunk_config

    config, where, known = training_model_config(recipe)
    if not known:
        raise RecipeError(f"{recipe.source}: model: a rehearsal needs the model's config files and tokenizers, and "
                          f"these are not readable here ({where})")
    tokenizer, clip_tokenizer = load_tokenizers(recipe)
    return _write_model(shrunk_config(config), tokenizer, clip_tokenizer, out)


def rehearsal_recipe(recipe: Recipe, samples_per_card: int = 8, steps: int = 3) -> Recipe:
    """The recipe a rehearsal runs (writes the shrunk start models under its run directory)."""
    if samples_per_card < 1 or steps < 1:
        raise RecipeError(f"--rehearse-samples and --rehearse-steps must be positive, got {samples_per_card}, {steps}")
    rehearsal = copy.deepcopy(recipe)
    root = rehearsal_dir(recipe)
    models = root / "models"
    rehearsal.run_dir, rehearsal.backend = str(root), "cpu"
    rehearsal.cluster.nodes = rehearsal.cluster.procs_per_node = 1
    rehearsal.data.num_workers = min(recipe.data.num_workers, 2)  # workers on, as in the real run; 2 cores here
    rehearsal.data.every_modality_first = True  # a few steps still train every modality the weights name
    if rehearsal.shard is not None:
        rehearsal.shard.limit_per_card, rehearsal.shard.processes = samples_per_card, 1
    for stage in ("sft", "dpo"):
        section = getattr(rehearsal, stage)
        if section is None:
            continue
        section.max_steps, section.gradient_accumulation_steps = steps, 1
        section.global_batch_size = section.micro_batch_size
        section.save_every, section.keep_last, section.log_every = steps, 1, 1
        if section.precision == "fp16":  # no fp16 training on a CPU; bf16 and fp32 run as configured
            section.precision = "fp32"
    starts_from_model = recipe.sft is not None or (recipe.dpo is not None and recipe.dpo.init == "model")
    if starts_from_model and recipe.model.source != "tiny":
        rehearsal.model.source = "pretrained"
        rehearsal.model.pretrained_path = _shrunk_training_model(recipe, models / "sft")
        rehearsal.model.tokenizer_path = rehearsal.model.clip_tokenizer_path = None
        rehearsal.model.llava_next_path = rehearsal.model.clip_path = rehearsal.model.authors_path = None
        rehearsal.model.config_overrides = {}
    if recipe.dpo is not None and recipe.dpo.init not in ("sft", "model"):
        rehearsal.dpo.init = _shrunk_directory_model(recipe.dpo.init, "dpo.init", models / "dpo_init")
    if recipe.eval is not None:
        rehearsal.eval.limit = min(recipe.eval.limit or samples_per_card, samples_per_card)
        rehearsal.eval.max_new_tokens = min(recipe.eval.max_new_tokens, NEW_TOKENS)
        for benchmark in rehearsal.eval.benchmarks:  # per task / duration / file, as eval.limit per file
            benchmark.limit = min(benchmark.limit or samples_per_card, samples_per_card)
            benchmark.max_new_tokens = min(benchmark.max_new_tokens, NEW_TOKENS)
        if recipe.eval.model_path is not None:
            rehearsal.eval.model_path = _shrunk_directory_model(recipe.eval.model_path, "eval.model_path",
                                                                models / "eval")
    return rehearsal


def rehearsal_report(recipe: Recipe) -> str:
    """What each stage of a finished rehearsal accepted, refused (with reasons) and measured."""
    root = Path(recipe.run_dir)
    lines = [f"rehearsal of {recipe.source} (model at tiny width and depth; everything else real): {root}"]
    manifest_path = root / "shard" / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        counts = ", ".join(f"{count} {name}" for name, count in sorted(manifest["counts"].items()))
        lines.append(f"  shard   {manifest['records']} records read: accepted {counts}; "
                     f"refused {len(manifest['rejected'])}")
        lines += [f"            refused {item['key']}: {item['reason']}" for item in manifest["rejected"][:20]]
        if len(manifest["rejected"]) > 20:
            lines.append(f"            ... and {len(manifest['rejected']) - 20} more: every refusal with its reason is "
                         f"in {manifest_path} (\"rejected\")")
    for stage in ("sft", "dpo"):
        metrics_path = root / stage / METRICS
        if not metrics_path.is_file():
            continue
        history = read_metrics(metrics_path)
        summary = _summary(root / stage)
        visual = {key.split("/", 1)[1]: round(value) for key, value in history[-1].items()
                  if key.startswith("visual_tokens/")}
        lines.append(f"  {stage:<7} {len(history)} steps, loss {summary.get('loss', '?')}, "
                     f"truncated {sum(m.get('truncated', 0) for m in history)}, "
                     f"refused {history[-1].get('loader_skipped', 0)}; visual tokens per sample (last step) {visual}")
        for key, reason in (summary.get("refused") or {}).items():
            lines.append(f"            refused {key}: {reason}")
        if summary.get("refused, not listed"):
            lines.append(f"            ... {summary['refused, not listed']}")
        for stream, count in (summary.get("sharded, never drawn") or {}).items():
            lines.append(f"            sharded, never drawn: {count} {stream} sample(s) (no data.weights.{stream})")
    if (root / "export" / COMPLETE).is_file():
        lines.append(f"  export  {root / 'export'}: {_summary(root / 'export')}")
    results_path = root / "eval" / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        for name, scores in results.get("multiple_choice", {}).items():
            lines.append(f"  eval    {name}: {scores.get('questions')} questions answered "
                         f"(accuracy of a random-weight model: {scores.get('accuracy')})")
        for name, scores in results.get("benchmarks", {}).items():
            overall = scores["overall"]
            reasons = ", ".join(f"{count} {reason}" for reason, count in overall.get("failure_reasons", {}).items())
            lines.append(f"  eval    {name}: {overall['questions']} questions, {overall['asked']} answered, "
                         f"{overall['failed']} failed" + (f" ({reasons})" if reasons else ""))
    return "\n".join(lines)


def _summary(stage_dir: Path) -> dict:
    from pipeline.runner import read_complete

    return (read_complete(stage_dir) or {}).get("summary", {})
