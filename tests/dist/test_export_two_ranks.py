"""Export of a checkpoint written by 2 ranks under ZeRO-3: `run` launches both ranks, rank 0 exports
while rank 1 waits, and the exported weights equal DeepSpeed's own merge of the two shards."""

import json

import pytest
import torch

from conftest import pipeline_env, run_pipeline, saved_tensors, small_shards, training_recipe, write_recipe
from ppllava import PPLLaVAForConditionalGeneration

pytestmark = pytest.mark.dist


def test_a_two_rank_zero3_checkpoint_exports_whole(tmp_path):
    manifest = small_shards(tmp_path / "data")
    recipe = training_recipe(tmp_path / "run", manifest, zero_stage=3, max_steps=2, global_batch_size=2,
                             micro_batch_size=1)
    recipe["cluster"] = {"nodes": 1, "procs_per_node": 2, "dist_timeout_minutes": 3}
    recipe["export"] = {"dtype": "fp32", "max_shard_size": "300KB"}
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    result = run_pipeline("run", str(path), timeout=600, env=pipeline_env(HF_HOME=str(tmp_path / "hf")))
    assert result.returncode == 0, result.stderr[-6000:]

    step = tmp_path / "run" / "sft" / "checkpoints" / "step_2"
    assert json.loads((step / "trainer_state.json").read_text())["world_size"] == 2
    parts = [torch.load(step / "training_state" / f"part_0000{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert len(parts[0]) > 10 and len(parts[1]) > 10 and not set(parts[0]) & set(parts[1])  # each rank wrote half
    merged = saved_tensors(step)
    export = tmp_path / "run" / "export"
    exported = PPLLaVAForConditionalGeneration.from_pretrained(export).state_dict()
    assert set(exported) == set(merged)
    assert [k for k in merged if not torch.equal(exported[k], merged[k])] == []
    assert (export / "model.safetensors.index.json").is_file() and (export / "COMPLETE").is_file()
    assert "stage export: done" in result.stderr
