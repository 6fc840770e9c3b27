"""Exact resume of the SFT stage: SIGTERM -> checkpoint -> exit 3 -> --resume auto gives the same
per-step losses as an uninterrupted run; kill -9 while a checkpoint is written loses nothing."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, pipeline_env, run_pipeline, small_shards, training_recipe, write_recipe
from pipeline.checkpoint import FAULT_ENV
from pipeline.metrics import read_metrics

pytestmark = pytest.mark.integration

STEPS = 8


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return small_shards(tmp_path_factory.mktemp("resume_data"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, manifest):
    """Losses of an uninterrupted run of STEPS steps."""
    root = tmp_path_factory.mktemp("straight")
    recipe = write_recipe(root / "recipe.yaml", training_recipe(root / "run", manifest, max_steps=STEPS))
    result = run_pipeline("run", str(recipe))
    assert result.returncode == 0, result.stderr[-4000:]
    return losses(root / "run")


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")}


def run_until_signalled(recipe, run_dir, after_step: int, sig=signal.SIGTERM) -> subprocess.CompletedProcess:
    """Start `run`, send ``sig`` once ``after_step`` steps are logged, wait for it to exit."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(recipe)], cwd=REPO_ROOT,
                               env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while max(losses(run_dir), default=0) < after_step:
        assert process.poll() is None, f"run ended before the signal: {process.communicate()[1][-4000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("sig, resume", [(signal.SIGTERM, "auto"), (signal.SIGUSR1, "step_2")],
                         ids=["SIGTERM-resume-auto", "SIGUSR1-resume-older-path"])
def test_a_signal_checkpoints_and_resume_reproduces_every_loss(tmp_path, manifest, straight, sig, resume):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "sft" / "checkpoints"
    recipe = write_recipe(tmp_path / "recipe.yaml", training_recipe(run_dir, manifest, max_steps=STEPS, save_every=2))
    stopped = run_until_signalled(recipe, run_dir, after_step=3, sig=sig)
    assert stopped.returncode == 3, stopped.stderr[-4000:]
    stopped_at = int((checkpoints / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped_at < STEPS, "the signal must stop the run before its end (slow machine?)"
    assert not (run_dir / "sft" / "COMPLETE").exists()
    assert f"{sig.name} received: checkpointing at the next step boundary" in stopped.stderr

    refused = run_pipeline("run", str(recipe))
    assert refused.returncode == 2 and "pass --resume auto" in refused.stderr

    # auto: the newest checkpoint; a path: an older one, and the newer ones are set aside
    resume_from = checkpoints / f"step_{stopped_at}" if resume == "auto" else checkpoints / resume
    resumed = run_pipeline("run", str(recipe), "--resume", resume if resume == "auto" else str(resume_from))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {resume_from} at step {int(resume_from.name[5:])}" in resumed.stderr
    if resume != "auto":
        abandoned = [p for p in checkpoints.parent.iterdir() if p.name.startswith("checkpoints.abandoned-")]
        assert len(abandoned) == 1 and (abandoned[0] / f"step_{stopped_at}" / "trainer_state.json").exists()
    after = losses(run_dir)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert after[step] == pytest.approx(straight[step], abs=1e-6, rel=0), f"step {step}"
    assert (run_dir / "sft" / "COMPLETE").exists()


def test_kill_during_checkpoint_keeps_the_previous_one(tmp_path, manifest, straight):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", training_recipe(run_dir, manifest, max_steps=STEPS, save_every=3))
    killed = run_pipeline("run", str(recipe), env=pipeline_env(**{FAULT_ENV: "before_rename:6"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    checkpoints = run_dir / "sft" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_3"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_3", "step_6.tmp"]
    state = json.loads((checkpoints / "step_3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 1

    resumed = run_pipeline("run", str(recipe), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "removing the incomplete checkpoint" in resumed.stderr
    after = losses(run_dir)
    assert [after[s] for s in range(1, STEPS + 1)] == pytest.approx([straight[s] for s in range(1, STEPS + 1)], abs=1e-6)
    # keep_last 3 of step_3, step_6, step_8 (the end); no partial directory left
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_3", "step_6", "step_8"]


def test_resume_refuses_a_changed_recipe_but_allows_a_new_lr(tmp_path, manifest):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", training_recipe(run_dir, manifest, max_steps=STEPS, save_every=2))
    killed = run_pipeline("run", str(recipe), env=pipeline_env(**{FAULT_ENV: "before_rename:4"}))
    assert killed.returncode == -signal.SIGKILL
    more_processes = run_pipeline("run", str(recipe), "--resume", "auto", "cluster.procs_per_node=2", "sft.micro_batch_size=1")
    assert more_processes.returncode == 2
    assert "was written by 1 processes but this run has 2" in more_processes.stderr
    changed = run_pipeline("run", str(recipe), "--resume", "auto", "sft.weight_decay=0.1", "data.max_length=400")
    assert changed.returncode == 2
    assert "different settings: data.max_length, sft.weight_decay" in changed.stderr
    new_lr = run_pipeline("run", str(recipe), "--resume", "auto", "sft.lr=1e-4", "sft.max_steps=5")
    assert new_lr.returncode == 0, new_lr.stderr[-4000:]
    assert "resuming with changed sft.lr, sft.max_steps" in new_lr.stderr
    logged = read_metrics(run_dir / "sft" / "metrics.jsonl")
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5]
    assert logged[2]["lr"] < 1e-4 and logged[1]["lr"] > 1e-3  # the new peak applies from the resumed step on
