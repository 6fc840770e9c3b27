"""`python -m pipeline status RUN_DIR`: what is done in a run directory and where training stopped:
each stage's COMPLETE marker, its checkpoints (the latest, those kept, each one's files checked
against its files.json, partial ones an interrupted writer left) and its last metrics line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.checkpoint import CheckpointError, checkpoint_state, complete_checkpoints, latest_checkpoint
from pipeline.exit_codes import ExitCode
from pipeline.layout import METRICS, RECIPE_FILE, checkpoints_dir
from pipeline.metrics import read_metrics
from pipeline.recipe import STAGE_ORDER, RecipeError, load_recipe
from pipeline.runner import read_complete


def print_status(run_dir: Path) -> int:
    """Print the run directory's state; the exit code (2: not a run directory)."""
    if not run_dir.is_dir():
        print(f"error: {run_dir} is not a run directory", file=sys.stderr)
        return ExitCode.BAD_INPUT
    try:  # the run's resolved recipe says whether its checkpoints record sha256 (else: check them all)
        recipe = load_recipe(run_dir / RECIPE_FILE)
    except (OSError, RecipeError):
        recipe = None
    print(f"run directory {run_dir}" + (f" (recipe: {RECIPE_FILE})" if (run_dir / RECIPE_FILE).exists() else ""))
    for stage in STAGE_ORDER:
        directory = run_dir / stage
        if not directory.is_dir():
            continue
        try:
            done = read_complete(directory)
        except ValueError as error:  # json.JSONDecodeError
            print(f"  {stage:<7}COMPLETE marker unreadable: {error}")
            continue
        state = f"complete ({done['finished']}, {done['wall_seconds']}s)" if done else "not complete"
        print(f"  {stage:<7}{state}")
        checkpoints = checkpoints_dir(directory)
        if checkpoints.is_dir():
            try:
                latest = latest_checkpoint(checkpoints)
            except CheckpointError as error:
                print(f"         {error}")
                latest = None
            kept = complete_checkpoints(checkpoints)
            print(f"         latest checkpoint: {latest.name if latest else 'none'} "
                  f"(kept: {', '.join(p.name for p in kept) or 'none'})")
            hashes = getattr(getattr(recipe, stage, None), "verify_checkpoints", "hash") == "hash"
            for path in kept:  # sizes (and sha256, as the run records them) against each one's files.json
                print(f"           {path.name}: {checkpoint_state(path, hashes)}")
            for path in sorted(checkpoints.glob("step_*.tmp")):
                print(f"           {path.name}: partial (its writer was interrupted; removed at the next start)")
        history = read_metrics(directory / METRICS)
        if history:
            print(f"         last metrics: {json.dumps(history[-1])}")
    return ExitCode.OK
