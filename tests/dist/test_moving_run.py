"""A training stage moves between layouts mid-run, as a run moving from one cluster to another
does: 2 processes under ZeRO-3 for 4 steps, then 1 process under ZeRO-2 (another micro-batch size)
for 4 more, then 2 processes under ZeRO-3 to the end. Every step trains on the samples (by key)
and has the loss (fp32, 1e-5) of an uninterrupted 2-process run: SFT, and DPO with a precomputed
reference. Each segment is ended by killing rank 0 while it publishes the checkpoint after the one
it stops at, so the next segment resumes from the checkpoint named."""

import json
import shutil

import pytest
import torch

from conftest import pipeline_env, run_pipeline, saved_tensors, small_shards, training_recipe, write_recipe
from pipeline.checkpoint import FAULT_ENV
from pipeline.metrics import read_metrics
from pipeline.model.setup import save_tokenizers
from pipeline.model.tiny import tiny_config_for, tiny_tokenizer
from ppllava import PPLLaVAForConditionalGeneration

pytestmark = pytest.mark.dist

STEPS, SAVE_EVERY = 12, 4
# (processes, ZeRO stage, micro-batch size, the checkpoint the segment ends at)
SEGMENTS = [(2, 3, 1, 4), (1, 2, 2, 8), (2, 3, 1, 12)]


def step_samples(stage_dir, after: int, until: int) -> dict[int, list[str]]:
    """Per step in (after, until]: the sorted keys every rank trained on (record_samples)."""
    found: dict[int, list[str]] = {}
    for path in sorted((stage_dir / "samples").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if after < entry["step"] <= until:
                found.setdefault(entry["step"], []).extend(entry["keys"])
    return {step: sorted(keys) for step, keys in found.items()}


def straight_and_moved(root, recipe: dict, stage: str) -> tuple[dict, dict]:
    """(losses, samples) per step of an uninterrupted 2-process run and of the moved one."""
    recipe[stage].update(record_samples=True, save_every=SAVE_EVERY, max_steps=STEPS, log_every=1, zero_stage=3,
                         micro_batch_size=1)
    recipe["cluster"] = {"nodes": 1, "procs_per_node": 2, "dist_timeout_minutes": 3}
    runs = {}
    for name in ("straight", "moved"):
        recipe["run_dir"] = str(root / name)
        runs[name] = write_recipe(root / f"{name}.yaml", recipe)
    straight = run_pipeline("run", str(runs["straight"]), timeout=600)
    assert straight.returncode == 0, straight.stderr[-6000:]
    expected = ({m["step"]: m["loss"] for m in read_metrics(root / "straight" / stage / "metrics.jsonl")},
                step_samples(root / "straight" / stage, 0, STEPS))

    stage_dir, samples, after = root / "moved" / stage, {}, 0
    for index, (processes, zero, micro, until) in enumerate(SEGMENTS):
        layout = [f"cluster.procs_per_node={processes}", f"{stage}.zero_stage={zero}", f"{stage}.micro_batch_size={micro}"]
        last = until == STEPS
        env = None if last else pipeline_env(**{FAULT_ENV: f"before_rename:{until + SAVE_EVERY}"})
        result = run_pipeline("run", str(runs["moved"]), *(["--resume", "auto"] if index else []), *layout,
                              env=env, timeout=600)
        assert (result.returncode == 0) == last, result.stderr[-6000:]
        assert (stage_dir / "checkpoints" / "latest").read_text().strip() == f"step_{until}"
        if index:
            assert f"resuming step_{after} on another layout: world_size" in result.stderr, result.stderr[-4000:]
        samples.update(step_samples(stage_dir, after, until))
        shutil.rmtree(stage_dir / "samples")  # the killed tail (steps past `until`) is trained again next
        after = until
    losses = {m["step"]: m["loss"] for m in read_metrics(stage_dir / "metrics.jsonl")}
    return expected, (losses, samples)


def assert_same_training(expected, moved) -> None:
    (expected_losses, expected_samples), (losses, samples) = expected, moved
    assert sorted(losses) == list(range(1, STEPS + 1)) and sorted(samples) == sorted(expected_samples)
    assert samples == expected_samples
    assert len({key for keys in samples.values() for key in keys}) > 4  # the steps differ from each other
    assert [losses[s] for s in sorted(losses)] == pytest.approx(
        [expected_losses[s] for s in sorted(expected_losses)], abs=1e-5, rel=0)


def test_sft_moves_from_two_zero3_ranks_to_one_zero2_rank_and_back(tmp_path):
    manifest = small_shards(tmp_path / "data")
    recipe = training_recipe(tmp_path / "unused", manifest)
    expected, moved = straight_and_moved(tmp_path, recipe, "sft")
    assert_same_training(expected, moved)


def test_dpo_with_a_precomputed_reference_moves_the_same_way(tmp_path):
    manifest = small_shards(tmp_path / "data", dpo_pairs=9)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(3)
    PPLLaVAForConditionalGeneration(tiny_config_for(tokenizer)).save_pretrained(tmp_path / "start")
    save_tokenizers(tokenizer, tokenizer, tmp_path / "start")
    recipe = training_recipe(tmp_path / "unused", manifest)
    recipe.pop("sft")
    recipe["dpo"] = {"precision": "fp32", "global_batch_size": 4, "lr": 1e-3, "epochs": 6,
                     "init": str(tmp_path / "start"), "reference": "precomputed"}
    expected, moved = straight_and_moved(tmp_path, recipe, "dpo")
    assert_same_training(expected, moved)
    stored = json.loads((tmp_path / "moved" / "dpo" / "reference_logps.json").read_text())["logps"]
    assert len(stored) == 9  # computed once, by the first segment's two ranks, and found by the others


def test_lora_sft_in_bf16_with_checkpointing_moves_from_two_zero3_ranks_to_one_zero2_rank(tmp_path):
    """LoRA adapters (PEFT) under ZeRO-3 on 2 ranks, bf16, gradient checkpointing, continued on 1
    rank under ZeRO-2: the adapters train and the moved run exports a merged model."""
    manifest = small_shards(tmp_path / "data")
    recipe = training_recipe(tmp_path / "run", manifest, zero_stage=3, precision="bf16", max_steps=4, save_every=2,
                             micro_batch_size=1, lr=1e-2)
    recipe["sft"]["trainable"] = {"llm": False}
    recipe["sft"]["lora"] = {"rank": 4, "alpha": 8}
    recipe["model"]["gradient_checkpointing"] = True
    recipe["cluster"] = {"nodes": 1, "procs_per_node": 2, "dist_timeout_minutes": 3}
    recipe["export"] = {"dtype": "bf16"}
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    first = run_pipeline("run", str(path), env=pipeline_env(**{FAULT_ENV: "before_rename:4"}), timeout=600)
    assert first.returncode != 0
    moved = run_pipeline("run", str(path), "--resume", "auto", "cluster.procs_per_node=1", "sft.zero_stage=2",
                         timeout=600)
    assert moved.returncode == 0, moved.stderr[-6000:]
    assert "resuming step_2 on another layout: world_size 2 -> 1" in moved.stderr
    saved = saved_tensors(tmp_path / "run" / "sft" / "checkpoints" / "step_4")
    adapters_b = [name for name in saved if ".lora_B." in name]
    assert adapters_b and all(saved[name].abs().sum() > 0 for name in adapters_b)
    exported = PPLLaVAForConditionalGeneration.from_pretrained(tmp_path / "run" / "export")
    assert exported.dtype == torch.bfloat16 and not any(".lora_" in name for name in exported.state_dict())
