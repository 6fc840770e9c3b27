"""The batch script `launch --scheduler slurm` writes, submitted with sbatch to a real one-node
SLURM (slurm_cluster.py): a 2-process CPU training job with 4 loader workers per rank, signalled
with scancel as a user, the time limit or pre-emption would.

    completion            the job runs to the end (the losses every other job is compared with)
    scancel (SIGTERM)     every process gets it, loader workers included: the ranks checkpoint
                          within a step, exit 3, the job stays cancelled; submitted again, it
                          resumes with identical losses
    USR1 (time limit)     the ranks checkpoint, exit 3, the script requeues; the restarted job
                          finishes with identical losses
    a rank dies           srun --kill-on-bad-exit ends the other one at once: the job fails fast
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import run_pipeline, small_shards, training_recipe, write_recipe
from pipeline.metrics import read_metrics
from slurm_cluster import slurm  # noqa: F401  (the fixture)

pytestmark = pytest.mark.cluster

STEPS = 24
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Enough samples of every modality for 2 ranks x 4 loader workers (each slot needs some)."""
    return small_shards(tmp_path_factory.mktemp("cluster_data"), seed=3, videos=24, images=16, multi_images=16)


def batch_script(root: Path, manifest: Path, **sft) -> Path:
    recipe = training_recipe(root / "run", manifest, max_steps=STEPS, **sft)
    recipe["data"]["num_workers"] = 4
    recipe["cluster"] = {"nodes": 1, "procs_per_node": 2, "dist_timeout_minutes": 3, "signal_seconds": 60}
    path = write_recipe(root / "recipe.yaml", recipe)
    script = root / "job.sh"
    result = run_pipeline("launch", str(path), "--scheduler", "slurm", "--out", str(script), timeout=120)
    assert result.returncode == 0, result.stderr
    return script


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")}


def job_log(root: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((root / "run" / "logs").glob("*.out")))


def signal_after(slurm, job: str, run_dir: Path, step: int, *scancel: str) -> int:
    """Once ``step`` steps are logged, `scancel` the job (SIGTERM, or the signal in ``scancel``);
    returns the last step logged before the signal."""
    deadline = time.monotonic() + 300
    while max(losses(run_dir), default=0) < step:
        assert slurm.job(job)["JobState"] not in ENDED, f"job {job} ended before the signal"
        assert time.monotonic() < deadline, "no training step within 5 minutes"
        time.sleep(0.05)
    logged = max(losses(run_dir))
    slurm.run("scancel", *scancel, job)
    return logged


@pytest.fixture(scope="module")
def straight(tmp_path_factory, manifest, slurm):
    root = tmp_path_factory.mktemp("straight")
    job = slurm.submit(batch_script(root, manifest))
    state = slurm.wait_for(job, ENDED)
    assert state["JobState"] == "COMPLETED", job_log(root)[-4000:]
    found = losses(root / "run")
    assert sorted(found) == list(range(1, STEPS + 1))
    return found


def test_scancel_checkpoints_within_a_step_keeps_the_job_cancelled_and_it_resumes_exactly(slurm, manifest, straight,
                                                                                          tmp_path):
    script = batch_script(tmp_path, manifest)
    job = slurm.submit(script)
    logged = signal_after(slurm, job, tmp_path / "run", 3)
    state = slurm.wait_for(job, ENDED)
    log = job_log(tmp_path)
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", log[-4000:]
    assert "DataLoader worker" not in log and "Traceback" not in log
    assert log.count("SIGTERM received: checkpointing") == 2  # one per rank, none from the 8 workers
    assert "not requeued" in log
    latest = (tmp_path / "run" / "sft" / "checkpoints" / "latest").read_text().strip()
    # the step in flight when the signal came is `logged + 1`; the log may trail the training by one
    assert int(latest.split("_")[1]) <= logged + 2, (latest, logged)

    again = slurm.submit(script)
    assert slurm.wait_for(again, ENDED)["JobState"] == "COMPLETED", job_log(tmp_path)[-4000:]
    after = losses(tmp_path / "run")
    assert [after[s] for s in range(1, STEPS + 1)] == pytest.approx([straight[s] for s in range(1, STEPS + 1)],
                                                                    abs=1e-6, rel=0)


def test_usr1_checkpoints_requeues_and_the_restarted_job_finishes_with_identical_losses(slurm, manifest, straight,
                                                                                        tmp_path):
    job = slurm.submit(batch_script(tmp_path, manifest))
    signal_after(slurm, job, tmp_path / "run", 3, "--signal=USR1")
    state = slurm.wait_for(job, ENDED, timeout=600)
    log = job_log(tmp_path)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-4000:]
    assert "requeueing job" in log and "SIGUSR1 received" in log
    after = losses(tmp_path / "run")
    assert [after[s] for s in range(1, STEPS + 1)] == pytest.approx([straight[s] for s in range(1, STEPS + 1)],
                                                                    abs=1e-6, rel=0)


def test_a_rank_that_dies_fails_the_whole_job_at_once(slurm, manifest, tmp_path):
    """Rank 0 is killed while it publishes the step-2 checkpoint; rank 1 would otherwise wait in a
    collective for cluster.dist_timeout_minutes (3 min here)."""
    job = slurm.submit(batch_script(tmp_path, manifest, save_every=2), env={"PIPELINE_TEST_FAULT": "before_rename:2"})
    started = time.monotonic()
    state = slurm.wait_for(job, ENDED)
    assert state["JobState"] == "FAILED", job_log(tmp_path)[-4000:]
    assert time.monotonic() - started < 150, "the surviving rank waited for its collective timeout"
