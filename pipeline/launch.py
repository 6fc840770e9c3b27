"""`python -m pipeline launch RECIPE --scheduler slurm|torchrun`: a cluster job for a recipe.

    launch recipes/sft_gpu.yaml --scheduler slurm --out job.sh [--submit]
        -> a batch script: SBATCH header from the recipe's cluster section (and --nodes,
           --procs-per-node, --partition, --time, --account), the backend's environment,
           MASTER_ADDR / MASTER_PORT, one `srun` task per device running
           `python -m pipeline run RECIPE --resume auto`, and exit code 3 -> `scontrol requeue`
    launch recipes/sft_gpu.yaml --scheduler torchrun [--master-addr HOST]
        -> the environment exports and one `torchrun` line per node, printed

The recipe is validated first (paths missing on this machine are only notes, as in `validate`),
with the job's node and process counts, so a batch layout that does not divide the global batch
fails here rather than after the job waited in the queue. Why srun rather than torchrun on SLURM,
and which signal goes where: docs/cluster.md.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.exit_codes import ExitCode
from pipeline.recipe import Recipe, RecipeError, load_recipe, validate

TORCHRUN_PORT = 29500
MASTER_PLACEHOLDER = '"${MASTER_ADDR:?export MASTER_ADDR=<hostname of node 0> first}"'


@dataclass
class LaunchOptions:
    scheduler: str                      # "slurm" or "torchrun"
    backend: str | None = None          # default: the recipe's
    master_addr: str | None = None      # torchrun only; default: a placeholder the shell refuses to run with
    master_port: int = TORCHRUN_PORT    # torchrun only (SLURM: derived from the job id)
    workdir: str | None = None          # SBATCH --chdir; default: the current directory
    command: str = ""                   # the launch command, quoted in the script's first lines
    overrides: list[str] = field(default_factory=list)  # key=value passed on to `run`
    stages: list[str] | None = None     # `run --stages`
    python: str = field(default_factory=lambda: sys.executable)  # slurm: the interpreter the job runs


def cluster_overrides(args: argparse.Namespace) -> list[str]:
    """--backend / --nodes / --procs-per-node as recipe overrides: validated like the file and passed on to `run`, so
    the runs see the world size the job has. (--partition, --time, --account only shape the header and are
    set on the recipe as given: YAML would read a time of 1:00:00 as the number 3600.)"""
    pairs = [("backend", args.backend), ("cluster.nodes", args.nodes), ("cluster.procs_per_node", args.procs_per_node)]
    return [f"{key}={value}" for key, value in pairs if value is not None]


def check_job(recipe: Recipe, backend: str, stages: list[str] | None = None) -> list[str]:
    """Errors for a job the recipe cannot run as; returns the batch layout lines (one per training stage)."""
    src = recipe.source
    if backend not in ("cuda", "npu", "cpu"):
        raise RecipeError(f"{src}: backend: {backend!r}; a cluster job needs a named backend (cuda or npu): set "
                          f"`backend` in the recipe or pass --backend")
    recipe.cluster.validate(recipe.source, recipe.backend, backend)
    limit = None if recipe.cluster.time is None else slurm_seconds(recipe.cluster.time, "--time / cluster.time")
    if limit is not None and limit <= recipe.cluster.signal_seconds:
        raise RecipeError(f"{src}: --time / cluster.time {recipe.cluster.time} ({limit} s) is not longer than "
                          f"cluster.signal_seconds ({recipe.cluster.signal_seconds}): SLURM would send the checkpoint "
                          f"signal (USR1@{recipe.cluster.signal_seconds}) at the job's first check, and every restart "
                          f"would checkpoint and requeue at once. Ask for more time or lower cluster.signal_seconds")
    for stage in stages or ():
        if stage not in recipe.stages:
            raise RecipeError(f"{src}: --stages: {stage!r} is not one of this recipe's stages ({', '.join(recipe.stages)})")
    layout = []
    for stage in ("sft", "dpo"):
        if getattr(recipe, stage) is not None and (not stages or stage in stages):
            layout.append(recipe.batch_layout_line(stage))
    return layout


def _double_quoted(value: str) -> str:
    return '"' + "".join("\\" + c if c in '"$`\\' else c for c in value) + '"'


def env_defaults(backend: str) -> dict[str, str]:
    """DS_ACCELERATOR and the backend row's environment defaults (backends/*.py)."""
    from backends import BACKENDS  # imports torch: only once the recipe is valid

    row = BACKENDS[backend]
    return {"DS_ACCELERATOR": row.deepspeed_accelerator, **row.env_defaults}


def env_lines(backend: str) -> list[str]:
    from backends import BACKENDS

    lines = [f"# The {backend} backend's environment (backends/{backend}.py); a value already set is kept."]
    groups = BACKENDS[backend].exclusive_env
    for key, value in env_defaults(backend).items():
        line = f'export {key}="${{{key}:-{_double_quoted(value)[1:-1]}}}"'
        others = [other for group in groups if key in group for other in group if other != key]
        if others:  # the runtime refuses two of a group: ours only where the user set none of the others
            unset = " && ".join(f'[ -z "${{{other}+x}}" ]' for other in others)
            line = f"if {unset}; then {line}; fi"
        lines.append(line)
    return lines


def run_arguments(recipe_path: str, overrides: list[str], stages: list[str] | None = None) -> str:
    """What follows the interpreter: `-m pipeline run RECIPE ... --resume auto OVERRIDES`, quoted."""
    selection = ["--stages", ",".join(stages)] if stages else []
    return " ".join(shlex.quote(word) for word in ["-m", "pipeline", "run", recipe_path, *selection,
                                                   "--resume", "auto", *overrides])


def slurm_seconds(value: str, where: str) -> int | None:
    """SLURM's time limit formats (minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes, days-hours:minutes:seconds) in seconds; None for UNLIMITED."""
    text = str(value).strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "-1"):
        return None
    try:
        days, _, clock = text.rpartition("-")
        parts = [int(part) for part in clock.split(":")]
        if days:  # days-hours[:minutes[:seconds]]
            hours, minutes, seconds = (parts + [0, 0])[:3]
        else:     # minutes, minutes:seconds, hours:minutes:seconds
            hours, minutes, seconds = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
        return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    except (ValueError, KeyError):
        raise RecipeError(f"{where}: {value!r} is not a SLURM time (e.g. 90, 1:30:00, 2-00:00:00)") from None


def slurm_script(recipe: Recipe, recipe_path: str, options: LaunchOptions) -> str:
    cluster, backend = recipe.cluster, options.backend or recipe.backend
    workdir = options.workdir or str(Path.cwd())
    header = [f"--job-name={recipe.name}", f"--nodes={cluster.nodes}", f"--ntasks-per-node={cluster.procs_per_node}"]
    if backend == "cuda":
        header.append(f"--gpus-per-node={cluster.gpus_per_node or cluster.procs_per_node}")
    if cluster.cpus_per_task:
        header.append(f"--cpus-per-task={cluster.cpus_per_task}")
    for key in ("partition", "account", "time"):
        if getattr(cluster, key) is not None:
            header.append(f"--{key}={getattr(cluster, key)}")
    header += [f"--output={Path(recipe.run_dir) / 'logs'}/%x-%j.out", "--open-mode=append", f"--chdir={workdir}",
               f"--signal=USR1@{cluster.signal_seconds}", "--requeue", *cluster.extra_sbatch]
    # --kill-on-bad-exit: a rank that dies ends the step at once, instead of its peers waiting in a
    # collective for up to cluster.dist_timeout_minutes.
    srun = ["srun", f"--nodes={cluster.nodes}", f"--ntasks-per-node={cluster.procs_per_node}", "--kill-on-bad-exit=1"]
    if cluster.cpus_per_task:  # srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05)
        srun.append(f"--cpus-per-task={cluster.cpus_per_task}")
    lines = [
        "#!/bin/bash",
        f"# {options.command or 'python -m pipeline launch ' + recipe_path + ' --scheduler slurm'}",
        f"# {recipe.name}: {cluster.nodes} node(s) x {cluster.procs_per_node} {backend} processes, one srun task per "
        f"device. Submit with: sbatch THIS_FILE",
        "# A requeued job runs this script again; `run --resume auto` continues from the newest checkpoint.",
        *[f"#SBATCH {option}" for option in header],
        "",
        "set -eu",
        "",
        "# Signals (docs/cluster.md): SIGUSR1 (--signal, before the time limit) goes to the step's tasks:",
        "# every rank checkpoints and exits 3, and this shell requeues the job. A SIGUSR1 sent to this shell",
        "# (--signal=B:USR1, scancel --batch -s USR1) is forwarded to the step. SIGTERM (scancel,",
        "# pre-emption, the hard limit) reaches every process: the ranks checkpoint and exit 3, and this shell",
        "# does not requeue (a cancellation is the user's; SLURM requeues a pre-empted job itself).",
        'stop=""',
        'step=""',
        "trap 'stop=USR1; echo \"batch shell: SIGUSR1; forwarding it to the job step\" >&2; "
        "if [ -n \"$step\" ]; then pkill -USR1 -P \"$step\" || true; fi' USR1",
        "trap 'stop=TERM; echo \"batch shell: SIGTERM; the ranks checkpoint; no requeue from here\" >&2' TERM",
        "",
    ]
    if cluster.setup:  # environment scripts (CANN's set_env.sh) often read unset variables: no `set -u` there
        lines += ["# cluster.setup", "set +u", "# shellcheck disable=SC1090,SC1091", "{",
                  *[f"    {line}" for line in cluster.setup], "}", "set -u", ""]
    lines += env_lines(backend)
    lines += [
        "",
        "# Rendezvous: the first host of the allocation; a port derived from the job id (the same on every rank).",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_ADDR",
        'export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"',
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s), '
        'master $MASTER_ADDR:$MASTER_PORT" >&2',
        "",
        "# The interpreter `launch` ran under (on shared storage, the same path on every node); export",
        "# PIPELINE_PYTHON before sbatch to use another.",
        f'PYTHON="${{PIPELINE_PYTHON:-{_double_quoted(options.python)[1:-1]}}}"',
        'if ! command -v "$PYTHON" > /dev/null; then',
        '    echo "error: python interpreter $PYTHON not found on $(hostname): export PIPELINE_PYTHON=<its path> or '
        'activate the environment in cluster.setup" >&2',
        f"    exit {int(ExitCode.FAILED)}",
        "fi",
        "# DeepSpeed's JIT-built ops belong to one environment (its torch, CUDA or CANN): keep them in it,",
        "# not in a home directory that every environment shares.",
        'TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$("$PYTHON" -c \'import sys; print(sys.prefix)\')/torch_extensions}"',
        "export TORCH_EXTENSIONS_DIR",
        "",
        "# The step runs in a background group so that the traps above run while it does (bash defers a trap",
        "# until its foreground command ends); the group outlives a TERM to note the step's exit code, which",
        "# `wait` cannot give reliably once a trapped signal has interrupted it.",
        'status="$(mktemp)"',
        "{ trap ':' TERM USR1; rc=0; " + " ".join(srun) + ' "$PYTHON" '
        + run_arguments(recipe_path, options.overrides, options.stages) + ' || rc="$?"; echo "$rc" > "$status"; } &',
        'step="$!"',
        'while kill -0 "$step" 2> /dev/null; do wait "$step" || true; done',
        'code="$(cat "$status" 2> /dev/null || true)"',
        'code="${code:-1}"',
        'rm -f "$status"',
        "",
        f'if [ "$code" -eq {int(ExitCode.REQUEUE)} ] && [ "$stop" != TERM ]; then',
        '    echo "stopped after a checkpoint (exit code 3): requeueing job $SLURM_JOB_ID" >&2',
        '    scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue failed: submit this script again" >&2',
        f'elif [ "$code" -eq {int(ExitCode.REQUEUE)} ]; then',
        '    echo "stopped after a checkpoint on SIGTERM: not requeued (sbatch this script again to continue)" >&2',
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def torchrun_lines(recipe: Recipe, recipe_path: str, options: LaunchOptions) -> str:
    cluster, backend = recipe.cluster, options.backend or recipe.backend
    host = shlex.quote(options.master_addr) if options.master_addr else MASTER_PLACEHOLDER
    endpoint = f"{host}:{options.master_port}" if options.master_addr else f"{host[:-1]}:{options.master_port}\""
    lines = [f"# {options.command or 'python -m pipeline launch ' + recipe_path + ' --scheduler torchrun'}",
             f"# {recipe.name}: run the exports, then node K's torchrun line, on each of the {cluster.nodes} node(s).",
             "# torchrun exits 1 (not 3) after a checkpoint on SIGTERM/SIGUSR1: rerun the same line to resume."]
    if not options.master_addr:
        lines.append("# MASTER_ADDR is not given (--master-addr): export MASTER_ADDR=<hostname of node 0> on every "
                     "node first")
    lines += env_lines(backend)
    for rank in range(cluster.nodes):
        words = ["torchrun", "--nnodes", str(cluster.nodes), "--nproc-per-node", str(cluster.procs_per_node),
                 "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                 "--rdzv-id", shlex.quote(recipe.name),
                 "--rdzv-conf", f"join_timeout={int(cluster.dist_timeout_minutes * 60)}",
                 "--max-restarts", "0", "--signals-to-handle", "SIGTERM,SIGUSR1",
                 "--shutdown-timeout", str(cluster.signal_seconds),
                 run_arguments(recipe_path, options.overrides, options.stages)]
        lines.append(" ".join(words) + f"    # node {rank}")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see docs/recipes.md)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys (passed on to `run`)")
    parser.add_argument("--scheduler", required=True, choices=("slurm", "torchrun"),
                        help="slurm: write a batch script (srun, one task per device); torchrun: print one torchrun "
                             "line per node")
    parser.add_argument("--nodes", type=int, help="default: cluster.nodes")
    parser.add_argument("--procs-per-node", type=int, help="processes (devices) per node; default: cluster.procs_per_node")
    parser.add_argument("--partition", help="default: cluster.partition")
    parser.add_argument("--time", help="SLURM time limit, e.g. 2-00:00:00; default: cluster.time")
    parser.add_argument("--account", help="default: cluster.account")
    parser.add_argument("--backend", choices=("cuda", "npu", "cpu"),
                        help="default: the recipe's backend (cpu: e.g. a sharding job on CPU nodes)")
    parser.add_argument("--stages", help="comma-separated subset of the recipe's stages the job runs (`run --stages`)")
    parser.add_argument("--master-addr", help="torchrun: hostname of node 0 (default: $MASTER_ADDR, which must be set)")
    parser.add_argument("--master-port", type=int, default=TORCHRUN_PORT, help="torchrun: rendezvous port (29500)")
    parser.add_argument("--out", help="slurm: write the script here (default: print it)")
    parser.add_argument("--submit", action="store_true", help="slurm: submit the script with sbatch")


def launch(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *cluster_overrides(args)]
    recipe = load_recipe(args.recipe, overrides)
    notes: list[str] = []
    validate(recipe, missing_paths=notes)
    from pipeline.model.budget import check_budgets  # torch: only once the recipe is valid
    from pipeline.model.memory_fit import check_plan

    check_budgets(recipe)
    check_plan(recipe)  # a job that would run out of memory on cluster.device is not queued
    for key in ("partition", "time", "account"):
        if getattr(args, key) is not None:
            setattr(recipe.cluster, key, getattr(args, key))
    backend = args.backend or recipe.backend
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    layout = check_job(recipe, backend, stages)
    for note in notes:
        print(f"note: {note}; `run` needs it", file=sys.stderr)
    for line in layout:
        print(line, file=sys.stderr)
    options = LaunchOptions(scheduler=args.scheduler, backend=backend, master_addr=args.master_addr,
                            master_port=args.master_port, overrides=overrides, stages=stages,
                            command=shlex.join(["python", "-m", "pipeline", "launch", *sys.argv[2:]])
                            if sys.argv[1:2] == ["launch"] else "")
    if args.scheduler == "torchrun":
        if args.submit or args.out:
            print("error: --out and --submit are for --scheduler slurm; torchrun lines are printed", file=sys.stderr)
            return ExitCode.BAD_INPUT
        print(torchrun_lines(recipe, args.recipe, options), end="")
        return ExitCode.OK
    script = slurm_script(recipe, args.recipe, options)
    if args.submit and shutil.which("sbatch") is None:
        print("error: --submit: sbatch is not on PATH (run this on a SLURM login node, or write the script with --out "
              "and submit it there with `sbatch FILE`)", file=sys.stderr)
        return ExitCode.FAILED
    if not args.out and not args.submit:
        print(script, end="")
        return ExitCode.OK
    out = Path(args.out or Path(recipe.run_dir) / f"{recipe.name}.sbatch")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(script)
    out.chmod(0o755)
    # SLURM opens the log before the script runs and does not create its directory.
    (Path(recipe.run_dir) / "logs").mkdir(parents=True, exist_ok=True)
    print(f"wrote {out}", file=sys.stderr)
    if args.submit:
        result = subprocess.run(["sbatch", str(out)], check=False)
        if result.returncode != 0:
            print(f"error: sbatch {out} exited with {result.returncode}", file=sys.stderr)
            return ExitCode.FAILED
    return ExitCode.OK
