"""Two "nodes" on loopback: one process each, started as the per-node torchrun lines of
`python -m pipeline launch --scheduler torchrun` say (c10d rendezvous), training the tiny SFT
with ZeRO-3; a rank killed while writing a checkpoint brings the whole job down with no
half-written checkpoint named complete, and the job resumed continues with the same losses.
Ranks that see different run directories refuse to start."""

import os
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, pipeline_env, small_shards, training_recipe, write_recipe
from pipeline.checkpoint import FAULT_ENV
from pipeline.metrics import read_metrics
from backends.distributed import free_port

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
