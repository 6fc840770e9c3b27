"""DPO under 2-process ZeRO-3 (gloo): the reference pass split over the ranks (one rank has more
pairs than the other) gives every pair's log-probs, and a live ZeRO-3 reference gives the same
losses."""

import json

import pytest
import torch

from conftest import run_pipeline, small_shards, training_recipe, write_recipe
from pipeline.metrics import read_metrics
from pipeline.model.setup import save_tokenizers
from pipeline.model.tiny import tiny_config_for, tiny_tokenizer
from ppllava import PPLLaVAForConditionalGeneration

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_dist")
    manifest = small_shards(root, dpo_pairs=9)  # dpo shards of 4, 4 and 1 pairs: rank 0 gets 5, rank 1 gets 4
    tokenizer = tiny_tokenizer()
    torch.manual_seed(3)
    PPLLaVAForConditionalGeneration(tiny_config_for(tokenizer)).save_pretrained(root / "start")
    save_tokenizers(tokenizer, tokenizer, root / "start")
    return root, manifest


def run_dpo(root, manifest, name: str, reference: str):
    recipe = training_recipe(root / name, manifest)
    recipe.pop("sft")
    recipe["cluster"] = {"nodes": 1, "procs_per_node": 2, "dist_timeout_minutes": 3}
    recipe["dpo"] = {"zero_stage": 3, "precision": "fp32", "global_batch_size": 4, "micro_batch_size": 1,
                     "lr": 1e-3, "epochs": 2, "max_steps": 3, "log_every": 1, "save_every": 100,
                     "init": str(root / "start"), "reference": reference}
    result = run_pipeline("run", str(write_recipe(root / f"{name}.yaml", recipe)), timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    return read_metrics(root / name / "dpo" / "metrics.jsonl")


def test_two_rank_zero3_dpo_with_precomputed_and_live_references(setup):
    root, manifest = setup
    precomputed = run_dpo(root, manifest, "precomputed", "precomputed")
    stored = json.loads((root / "precomputed" / "dpo" / "reference_logps.json").read_text())["logps"]
    assert len(stored) == 9, "every pair once, from both ranks"
    assert [m["step"] for m in precomputed] == [1, 2, 3]
    assert abs(precomputed[0]["rewards/margins"]) < 1e-4, "step 1: the policy is the reference"
    live = run_dpo(root, manifest, "live", "live")
    assert [m["loss"] for m in live] == pytest.approx([m["loss"] for m in precomputed], abs=2e-4)
