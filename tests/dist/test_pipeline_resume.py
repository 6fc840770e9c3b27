"""`run` on a recipe asking for 2 local processes: the pipeline launches both ranks itself (gloo,
ZeRO-2); SIGTERM to the job checkpoints on every rank and exits 3; --resume auto continues with
exactly the losses an uninterrupted 2-process run has, also when the newest checkpoint holds a
damaged file of the other rank (rank 0 checks, both ranks fall back to the same older one)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO_ROOT, pipeline_env, run_pipeline, small_shards, training_recipe, write_recipe
from pipeline.metrics import read_metrics

pytestmark = pytest.mark.dist

STEPS = 8


def two_process_recipe(root, manifest):
    recipe = training_recipe(root / "run", manifest, max_steps=STEPS)
    recipe["cluster"] = {"nodes": 1, "procs_per_node": 2, "dist_timeout_minutes": 3}
    return write_recipe(root / "recipe.yaml", recipe)


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return small_shards(tmp_path_factory.mktemp("dist_data"))


def test_two_processes_resume_exactly_after_sigterm(tmp_path, manifest):
    straight_recipe = two_process_recipe(tmp_path / "straight", manifest)
    straight = run_pipeline("run", str(straight_recipe), timeout=600)
    assert straight.returncode == 0, straight.stderr[-6000:]
    expected = losses(tmp_path / "straight" / "run")
    assert sorted(expected) == list(range(1, STEPS + 1))
    state = json.loads((tmp_path / "straight/run/sft/checkpoints" / f"step_{STEPS}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    rank_files = {p.name for p in (tmp_path / "straight/run/sft/checkpoints" / f"step_{STEPS}").glob("rank_*.pt")}
    assert rank_files == {"rank_00000.pt", "rank_00001.pt"}

    run_dir = tmp_path / "stopped" / "run"
    recipe = two_process_recipe(tmp_path / "stopped", manifest)
    job = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(recipe)], cwd=REPO_ROOT, env=pipeline_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while max(losses(run_dir), default=0) < 2:
        assert job.poll() is None, job.communicate()[1][-6000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler would: it forwards to both ranks
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 3, stderr[-6000:]
    stopped_at = int((run_dir / "sft/checkpoints/latest").read_text().strip().split("_")[1])
    assert 2 <= stopped_at < STEPS

    resumed = run_pipeline("run", str(recipe), "--resume", "auto", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    after = losses(run_dir)
    assert sorted(after) == list(range(1, STEPS + 1))
    assert [after[s] for s in sorted(after)] == pytest.approx([expected[s] for s in sorted(expected)], abs=1e-6, rel=0)


def test_a_failing_rank_stops_the_whole_job(tmp_path, manifest):
    """One rank dies (killed during its checkpoint write): the launcher stops the other rank and
    the job exits non-zero instead of hanging in a collective; the last checkpoint stays usable."""
    recipe = two_process_recipe(tmp_path, manifest)
    data = yaml.safe_load(recipe.read_text())
    data["sft"]["save_every"] = 3
    recipe.write_text(yaml.safe_dump(data))
    start = time.monotonic()
    result = run_pipeline("run", str(recipe), timeout=600, env=pipeline_env(PIPELINE_TEST_FAULT="before_rename:6"))
    assert result.returncode not in (0, 3), result.stderr[-4000:]
    assert time.monotonic() - start < 180
    assert (tmp_path / "run/sft/checkpoints/latest").read_text().strip() == "step_3"


def test_two_processes_fall_back_together_from_a_checkpoint_damaged_in_rank_1s_file(tmp_path, manifest):
    straight_recipe = two_process_recipe(tmp_path / "straight", manifest)
    assert run_pipeline("run", str(straight_recipe), timeout=600).returncode == 0
    expected = losses(tmp_path / "straight" / "run")

    recipe = two_process_recipe(tmp_path / "killed", manifest)
    data = yaml.safe_load(recipe.read_text())
    data["sft"]["save_every"] = 2
    recipe.write_text(yaml.safe_dump(data))
    killed = run_pipeline("run", str(recipe), timeout=600, env=pipeline_env(PIPELINE_TEST_FAULT="before_rename:6"))
    assert killed.returncode not in (0, 3), killed.stderr[-4000:]
    checkpoints = tmp_path / "killed" / "run" / "sft" / "checkpoints"
    damaged = checkpoints / "step_4" / "rank_00001.pt"
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0x01
    damaged.write_bytes(bytes(content))

    resumed = run_pipeline("run", str(recipe), "--resume", "auto", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert "step_4 is damaged: rank_00001.pt is corrupted" in resumed.stderr
    assert "resuming from step_2 instead, so steps 3 to 4 are trained again" in resumed.stderr
    after = losses(tmp_path / "killed" / "run")
    assert [after[s] for s in sorted(after)] == pytest.approx([expected[s] for s in sorted(expected)], abs=1e-6, rel=0)
