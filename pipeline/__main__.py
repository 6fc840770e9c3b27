"""`python -m pipeline COMMAND ...`: the pipeline's command line.

    run RECIPE [key=value ...] [--stages a,b] [--resume auto|PATH] [--dry-run]
    validate RECIPE [key=value ...]     check a recipe without touching a device, model or data
    plan RECIPE [key=value ...] [--device NAME ...]   each training stage's memory per device, and whether it fits
    launch RECIPE [key=value ...] --scheduler slurm|torchrun [--out job.sh] [--submit]   a cluster job (docs/cluster.md)
    status RUN_DIR                      stages done, latest checkpoints, last metrics
    synth OUT_DIR                       write synthetic videos, images, multi-image sets, cards
    chat MODEL_DIR [--video V | --image I ...] QUESTION    answer a question, streaming it
    explain MODEL_DIR --video V QUESTION [--out PNG]     where the question's relevance goes (a heat-map PNG)

Exit codes: 0 done; 2 bad recipe or input; 3 stopped by a signal after a checkpoint (requeue);
anything else a failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from pipeline.data.cards import CardError
from pipeline.data.synthetic import SynthSettings, generate
from pipeline.devices import DEVICES
from pipeline.exit_codes import ExitCode
from pipeline.recipe import RecipeError, load_recipe, validate



def _synth(args: argparse.Namespace) -> int:
    settings = SynthSettings(**{f.name: getattr(args, f.name) for f in fields(SynthSettings)})
    if settings.size % 2:
        print(f"--size must be even (H.264 4:2:0), got {settings.size}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    start = time.perf_counter()
    counts = generate(args.out_dir, settings)
    summary = ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in counts.items())
    print(f"wrote {summary} to {args.out_dir} in {time.perf_counter() - start:.1f}s (cards in {args.out_dir}/cards)")
    return ExitCode.OK


def _load(args: argparse.Namespace):
    recipe = load_recipe(args.recipe, args.overrides)
    validate(recipe)  # before torch is imported: a bad recipe fails in a fraction of a second
    from pipeline.model.budget import check_budgets

    check_budgets(recipe)  # a video that cannot fit the context stops the run before any device work
    return recipe


def _validate(args: argparse.Namespace) -> int:
    from pipeline.model.budget import check_budgets, recipe_budgets

    recipe = load_recipe(args.recipe, args.overrides)
    missing: list[str] = []
    validate(recipe, missing_paths=missing)
    for note in missing:
        print(f"note: {note}; `run` needs it")
    undrawn = _never_drawn(recipe)
    if undrawn:
        print(f"warning: {recipe.manifest_path}: {undrawn}")
    for conflict in _environment_conflicts(recipe):
        print(f"warning: {conflict}")
    budgets = recipe_budgets(recipe)
    for budget in budgets:  # printed before the verdict, so a failing budget shows its numbers
        print("\n".join(budget.lines()))
    check_budgets(recipe, budgets)
    from pipeline.model.memory_fit import judged_on_its_device, plan_report

    if judged_on_its_device(recipe):  # the memory plan on the device the recipe names
        text, problems = plan_report(recipe)
        print(text)
        if problems:
            raise RecipeError(f"{recipe.source}: " + "; ".join(problems))
    print(f"{args.recipe}: valid. stages: {', '.join(recipe.stages)}; run_dir: {recipe.run_dir}; "
          f"backend: {recipe.backend}")
    for stage in ("sft", "dpo"):
        if getattr(recipe, stage) is not None:
            print(recipe.batch_layout_line(stage))
    return ExitCode.OK


def _environment_conflicts(recipe) -> list[str]:
    """Variables the recipe's device runtime refuses together (torch_npu exits on both allocator
    settings), in this shell's environment with the job's ``cluster.setup`` exports over it."""
    import os
    import shlex

    from backends import BACKENDS

    environ = dict(os.environ)
    for line in recipe.cluster.setup:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # unbalanced quotes: the shell will say so; not ours to judge
            continue
        if words[:1] == ["export"]:
            environ.update(word.split("=", 1) for word in words[1:] if "=" in word)
    rows = BACKENDS.values() if recipe.backend == "auto" else [BACKENDS[recipe.backend]]
    where = f"in this environment or {recipe.source}'s cluster.setup"
    return [f"{conflict} ({where})" for row in rows for conflict in row.env_conflicts(environ)]


def _never_drawn(recipe) -> str | None:
    """What SFT would never draw of shards already made (the shard stage's, or data.manifest)."""
    if recipe.sft is None or not recipe.manifest_path.is_file():
        return None
    from pipeline.data.shard_files import LoaderError, mixture_weights, never_drawn, never_drawn_warning

    try:
        undrawn = never_drawn(recipe.manifest_path, mixture_weights(recipe.manifest_path, recipe.data.mixture,
                                                                     recipe.data.weights))
    except LoaderError as error:  # not a manifest: said here, not at the first training step
        raise RecipeError(f"{recipe.source}: data.manifest: {error}") from None
    return never_drawn_warning(undrawn) if undrawn else None


def _plan(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    validate(recipe, missing_paths=[])  # paths missing here are fine: the plan reads configs where it can
    from pipeline.model.memory_fit import plan_report, training_stages

    if not training_stages(recipe):
        print(f"error: {args.recipe} has no training stage (sft, dpo) to plan", file=sys.stderr)
        return ExitCode.BAD_INPUT
    text, problems = plan_report(recipe, args.device, args.tokens)
    print(text)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return ExitCode.BAD_INPUT if problems else ExitCode.OK


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    """`run`: start one process per device of this node (returns the job's exit code), or, when a
    launcher (torchrun, srun, ours) started this process, run here and exit."""
    only = [s.strip() for s in args.stages.split(",")] if args.stages else None
    if args.rehearse:
        from pipeline.model.budget import check_budgets
        from pipeline.rehearsal import rehearsal_recipe

        # The model directories a rehearsal replaces by shrunk copies (dpo.init, eval.model_path) may
        # not exist yet: the rehearsal says where to point them; every other path is checked after it.
        recipe = load_recipe(args.recipe, args.overrides)
        validate(recipe, missing_paths=[])
        recipe = rehearsal_recipe(recipe, args.rehearse_samples, args.rehearse_steps)
        validate(recipe)
        check_budgets(recipe)
    else:
        recipe = _load(args)  # before any device, model or data work
    from pipeline.local_launch import launch_local, launched_by_a_launcher
    from pipeline.runner import check_stage_selection

    check_stage_selection(recipe, only)

    if recipe.cluster.world_size > 1 and not launched_by_a_launcher():
        if recipe.cluster.nodes > 1:
            raise RecipeError(f"{recipe.source}: cluster.nodes={recipe.cluster.nodes}: a multi-node run is started "
                              f"on every node by torchrun or srun, not by `run` alone")
        return launch_local(recipe.cluster.procs_per_node, argv)
    _run_here(recipe, only, args)


def _run_here(recipe, only: list[str] | None, args: argparse.Namespace) -> NoReturn:
    """Run the stages in this process (one rank of the job) and leave with its exit code."""
    import backends
    from backends import BackendUnavailable
    from pipeline.checkpoint import CheckpointError, CheckpointWriteFailed
    from pipeline.data.shard_files import LoaderError
    from pipeline.runner import StageFailed, StoppedForRequeue, run_recipe

    try:
        run_recipe(recipe, only, args.resume, args.dry_run)
        if args.rehearse:
            from pipeline.rehearsal import rehearsal_report

            print(rehearsal_report(recipe), flush=True)
        code = ExitCode.OK
    except StoppedForRequeue as stop:
        logging.getLogger("pipeline").warning("%s", stop)
        code = ExitCode.REQUEUE
    except (RecipeError, CardError, CheckpointError, LoaderError, BackendUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        code = ExitCode.BAD_INPUT
    except (StageFailed, CheckpointWriteFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        code = ExitCode.FAILED
    except Exception:  # noqa: BLE001 - reported in full, then the same clean exit as every other path
        traceback.print_exc()
        code = ExitCode.FAILED
    # Leave without interpreter finalisation: DeepSpeed's gloo threads can abort a clean exit.
    backends.exit_process(code)


def _launch(args: argparse.Namespace) -> int:
    from pipeline.launch import launch

    return launch(args)


def _status(args: argparse.Namespace) -> int:
    from pipeline.status import print_status

    return print_status(Path(args.run_dir))


def _chat(args: argparse.Namespace) -> int:
    from pipeline.model_commands import chat

    return chat(args)


def _explain(args: argparse.Namespace) -> int:
    from pipeline.model_commands import explain

    return explain(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="PPLLaVA training pipeline")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a recipe's stages (skipping those already complete)",
                              description="Run the recipe's stages in order. Exit codes: 0 done, 2 bad recipe or "
                                          "input, 3 stopped by SIGTERM/SIGUSR1 after a checkpoint (requeue).")
    run.add_argument("recipe", help="recipe YAML (see docs/recipes.md)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. sft.lr=1e-5")
    run.add_argument("--stages", help="comma-separated subset of the recipe's stages to run (earlier ones must be done)")
    run.add_argument("--resume", metavar="auto|PATH", help="continue training from the newest complete checkpoint "
                                                            "(auto) or from a checkpoint directory")
    run.add_argument("--dry-run", action="store_true", help="run data stages as needed, build the model, engine and "
                                                           "loader, run one forward/backward on one real batch, stop")
    run.add_argument("--rehearse", action="store_true",
                     help="rehearse a cluster recipe on this host's CPU: its real cards (first N records each), "
                          "frames, context, tokenizers and special ids, the model at tiny width and depth, a few "
                          "steps per training stage, in RUN_DIR/rehearsal (docs/cluster.md)")
    run.add_argument("--rehearse-samples", type=int, default=8, metavar="N",
                     help="records of each dataset card a rehearsal shards (default 8)")
    run.add_argument("--rehearse-steps", type=int, default=3, metavar="N",
                     help="optimizer steps per training stage in a rehearsal (default 3)")
    run.set_defaults(handler=_run)

    check = commands.add_parser("validate", help="validate a recipe (no device, model or data work)")
    check.add_argument("recipe")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    check.set_defaults(handler=_validate)

    plan = commands.add_parser(
        "plan", help="the device memory each training stage needs, and whether it fits (no device needed)",
        description="Plan each training stage's memory per device from the model's config on the meta device "
                    "(nothing is allocated): weights, gradients and optimizer states by ZeRO stage, activations for "
                    "the longest sequence with and without gradient checkpointing, the frozen vision tower, the DPO "
                    "reference, host memory; then a verdict per device and, where it does not fit, the smallest "
                    "change that makes it fit. Exit code 2 when a device named (--device, or the recipe's "
                    "cluster.device) does not fit.",
        epilog=f"devices: {', '.join(DEVICES)}")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*", metavar="key=value")
    plan.add_argument("--device", action="append", metavar="NAME",
                      help="judge the plan on this device (repeatable; default: cluster.device, else every known "
                           "device of the recipe's backend)")
    plan.add_argument("--tokens", type=int, metavar="N", help="longest row in tokens (default: data.max_length)")
    plan.set_defaults(handler=_plan)

    from pipeline.launch import add_arguments as add_launch_arguments

    job = commands.add_parser("launch", help="a SLURM batch script or per-node torchrun lines for a recipe",
                              description="Validate the recipe for the job's layout, then write a SLURM batch script "
                                          "(srun, one task per device, requeue on exit code 3) or print one torchrun "
                                          "line per node. See docs/cluster.md.")
    add_launch_arguments(job)
    job.set_defaults(handler=_launch)

    status = commands.add_parser("status", help="what is done in a run directory, where training stopped")
    status.add_argument("run_dir")
    status.set_defaults(handler=_status)

    synth = commands.add_parser("synth", help="write synthetic training data (moving coloured shapes)")
    synth.add_argument("out_dir", help="output directory (created)")
    defaults = SynthSettings()
    for field in fields(SynthSettings):
        synth.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=int,
                           default=getattr(defaults, field.name), help=f"default {getattr(defaults, field.name)}")
    synth.set_defaults(handler=_synth)

    chat = commands.add_parser(
        "chat", help="ask a model directory about a video or images, the answer streamed to stdout",
        description="Answer one question about a video, an image, or several images (one multi-image sample) with a "
                    "model directory (the export stage's output, or eval.model_path's kind), greedy, streamed token "
                    "by token. Frames are sampled at segment middles; the question alone guides the pooling.",
        epilog="example: python -m pipeline chat runs/demo_cpu/export --video clip.mp4 --frames 64 --video-kernel 4 3 3 "
               "\"Which way does the red circle move?\"")
    chat.add_argument("model_dir", help="model directory: config.json, weights, tokenizer, clip_tokenizer/, "
                                        "processor_config.json")
    chat.add_argument("question", help="the question (put it in quotes)")
    media = chat.add_mutually_exclusive_group()
    media.add_argument("--video", action="append", metavar="PATH", help="a video file")
    media.add_argument("--image", action="append", metavar="PATH", help="an image file; repeat for a multi-image question")
    chat.add_argument("--frames", type=int, metavar="N", help="frames sampled from the video (default: the model's)")
    chat.add_argument("--video-kernel", type=int, nargs=3, metavar=("T", "H", "W"),
                      help="video pooling kernel = stride, e.g. 4 3 3 with --frames 64 (paper Table 8; default: the "
                           "model's)")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    chat.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "npu"),
                      help="device family (default auto: npu, then cuda, then cpu)")
    chat.set_defaults(handler=_chat)

    explain = commands.add_parser(
        "explain", help="draw where a question's relevance goes in a video (prompt-guided pooling, a PNG)",
        description="The question's relevance (the paper's eq.1: CLIP's question embedding against every patch of "
                    "every frame, a softmax over the video) as a heat map over the frames the model sees, and the "
                    "pooled-token grid it produces (each pooled token's window mass), in one PNG.",
        epilog="example: python -m pipeline explain runs/demo_cpu/export --video clip.mp4 \"What colour is the "
               "triangle?\" --out triangle.png")
    explain.add_argument("model_dir", help="model directory (the export stage's output)")
    explain.add_argument("question", help="the question (put it in quotes)")
    explain.add_argument("--video", required=True, metavar="PATH", help="a video file or a folder of frames")
    explain.add_argument("--out", metavar="PNG", help="where to write the picture (default: <video>.relevance.png)")
    explain.add_argument("--frames", type=int, metavar="N", help="frames sampled from the video (default: the model's)")
    explain.add_argument("--video-kernel", type=int, nargs=3, metavar=("T", "H", "W"),
                         help="video pooling kernel = stride (default: the model's)")
    explain.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda", "npu"),
                         help="device family (default auto: npu, then cuda, then cpu)")
    explain.set_defaults(handler=_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # key=value overrides may come before or after the options: collect the ones argparse left over.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if "=" not in item or item.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    quiet = os.environ.get("RANK", "0") != "0"  # one rank speaks; the others only warn
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return args.handler(args, argv) if args.handler is _run else args.handler(args)
    except (RecipeError, CardError) as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
