"""Two "nodes" on loopback: one process each, started as the per-node torchrun lines of
`python -m pipeline launch --scheduler torchrun` say (c10d rendezvous), training the tiny SFT
with ZeRO-3; a rank killed while writing a checkpoint brings the whole job down with no
half-written checkpoint named complete, and the job resumed continues with the same losses.
Tasks started as srun starts them (SLURM variables only) take SIGUSR1, checkpoint, exit 3 for
requeue, and the requeued job continues with the same losses. Ranks that see different run
directories refuse to start."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, pipeline_env, small_shards, training_recipe, write_recipe
from backends.distributed import free_port
from pipeline.checkpoint import FAULT_ENV
from pipeline.metrics import read_metrics

pytestmark = pytest.mark.dist

STEPS = 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return small_shards(tmp_path_factory.mktemp("multinode_data"))


def two_node_recipe(root, manifest):
    recipe = training_recipe(root / "run", manifest, max_steps=STEPS, save_every=2, zero_stage=3,
                             micro_batch_size=1, global_batch_size=4)
    recipe["cluster"] = {"nodes": 2, "procs_per_node": 1, "dist_timeout_minutes": 1}
    return write_recipe(root / "recipe.yaml", recipe)


def run_two_nodes(recipe, *args, env=None, timeout=400) -> list[int]:
    """One torchrun per node, as the generated per-node lines: --nnodes 2 --node-rank K, c10d."""
    port = free_port()
    nodes = []
    for rank in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", f"job{port}", "--signals-to-handle", "SIGTERM,SIGUSR1",
                   "-m", "pipeline", "run", str(recipe), "--resume", "auto", *args]
        nodes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env or pipeline_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    codes = []
    for node in nodes:
        node.communicate(timeout=max(1, deadline - time.monotonic()))
        codes.append(node.returncode)
    return codes


def test_two_nodes_train_fail_together_and_resume_exactly(tmp_path, manifest):
    straight = two_node_recipe(tmp_path / "straight", manifest)
    assert run_two_nodes(straight) == [0, 0]
    expected = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "straight/run/sft/metrics.jsonl")}
    assert sorted(expected) == [1, 2, 3, 4]

    recipe = two_node_recipe(tmp_path / "job", manifest)
    start = time.monotonic()
    codes = run_two_nodes(recipe, env=pipeline_env(**{FAULT_ENV: "before_rename:4"}))
    assert all(code != 0 for code in codes), codes  # rank 0 killed: both nodes fail, neither hangs
    assert time.monotonic() - start < 300
    checkpoints = tmp_path / "job/run/sft/checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_2"
    assert not (checkpoints / "step_4").exists()

    assert run_two_nodes(recipe) == [0, 0]  # the same job, relaunched: --resume auto
    after = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "job/run/sft/metrics.jsonl")}
    assert [after[s] for s in range(1, STEPS + 1)] == pytest.approx([expected[s] for s in range(1, STEPS + 1)], abs=1e-6)


def test_ranks_seeing_different_run_directories_refuse_to_start(tmp_path, manifest):
    recipe = two_node_recipe(tmp_path, manifest)
    port = free_port()
    ranks = []
    for rank in range(2):
        env = pipeline_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        ranks.append(subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(recipe),
                                       f"run_dir={tmp_path / f'node{rank}'}"], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2], outputs
    assert "is not the same directory on every rank (1 of 2 ranks see rank 0's files there" in outputs[0][1]
    assert "put run_dir on storage every node shares" in outputs[1][1]
    assert not os.path.exists(tmp_path / "node1" / "sft")


def srun_like(recipe, port: int, *args) -> list[subprocess.Popen]:
    """Two tasks as `srun --ntasks 2` starts them: SLURM's variables only, no torchrun."""
    tasks = []
    for rank in range(2):
        env = pipeline_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                           SLURM_TASKS_PER_NODE="2", SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID="4242",
                           MASTER_PORT=str(port))
        log = open(Path(recipe).parent / f"task{rank}-{port}.log", "w")  # a file: a full pipe would block the task
        tasks.append(subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(recipe), "--resume", "auto", *args],
                                      cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return tasks


def test_sigusr1_to_the_ranks_checkpoints_exits_for_requeue_and_the_requeued_job_continues(tmp_path, manifest):
    import signal

    straight = two_node_recipe(tmp_path / "straight", manifest)
    tasks = srun_like(straight, free_port(), "cluster.nodes=1", "cluster.procs_per_node=2")
    assert [task.wait(timeout=400) for task in tasks] == [0, 0]
    expected = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "straight/run/sft/metrics.jsonl")}

    recipe = two_node_recipe(tmp_path / "job", manifest)
    metrics = tmp_path / "job/run/sft/metrics.jsonl"
    tasks = srun_like(recipe, free_port(), "cluster.nodes=1", "cluster.procs_per_node=2")
    deadline = time.monotonic() + 300
    while not read_metrics(metrics) and time.monotonic() < deadline:
        assert all(task.poll() is None for task in tasks)
        time.sleep(0.05)
    for task in tasks:  # SLURM's --signal=USR1@... reaches every task of the step
        task.send_signal(signal.SIGUSR1)
    assert [task.wait(timeout=300) for task in tasks] == [3, 3], [p.read_text()[-3000:] for p in tmp_path.glob("job/*.log")]
    stopped_at = int((tmp_path / "job/run/sft/checkpoints/latest").read_text().strip().split("_")[1])
    assert 1 <= stopped_at < STEPS

    tasks = srun_like(recipe, free_port(), "cluster.nodes=1", "cluster.procs_per_node=2")  # the requeued job
    assert [task.wait(timeout=400) for task in tasks] == [0, 0]
    after = {m["step"]: m["loss"] for m in read_metrics(metrics)}
    assert [after[s] for s in range(1, STEPS + 1)] == pytest.approx([expected[s] for s in range(1, STEPS + 1)], abs=1e-6)
