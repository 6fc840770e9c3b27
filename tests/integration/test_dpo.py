"""The DPO stage end to end on synthetic video pairs: SFT -> DPO through `python -m pipeline run`,
only the LLM trains, precomputed and live references agree, ZeRO-3 with a live reference, exact
resume with the SFT stage's machinery."""

import json
import math
import signal

import pytest
import torch

from conftest import pipeline_env, run_pipeline, small_shards, training_recipe, write_recipe
from pipeline.checkpoint import FAULT_ENV
from pipeline.metrics import read_metrics
from pipeline.model.consolidate import consolidated_model
from ppllava import PPLLaVAForConditionalGeneration

pytestmark = pytest.mark.integration

TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


def dpo_section(**overrides) -> dict:
    section = {"zero_stage": 2, "precision": "fp32", "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3,
               "epochs": 4, "max_steps": 6, "log_every": 1, "save_every": 100, "beta": 0.1}
    section.update(overrides)
    return section


@pytest.fixture(scope="module")
def sft_then_dpo(tmp_path_factory):
    """SFT for 2 steps, then DPO (precomputed reference) for 3 steps, in one recipe."""
    root = tmp_path_factory.mktemp("dpo")
    manifest = small_shards(root, dpo_pairs=8)
    recipe = training_recipe(root / "run", manifest, max_steps=2)
    recipe["dpo"] = dpo_section()
    result = run_pipeline("run", str(write_recipe(root / "recipe.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-6000:]
    return root, manifest, result


def test_dpo_trains_the_llm_only_from_the_sft_checkpoint(sft_then_dpo):
    root, _, result = sft_then_dpo
    run_dir = root / "run"
    history = read_metrics(run_dir / "dpo" / "metrics.jsonl")
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5, 6]
    for name in TRL_METRICS:
        assert name in history[0], name
    # the policy learns to prefer the chosen answers: accuracy above its step-0 value, margins grow
    # (chosen and rejected differ by one colour word, so the first steps move the margin little)
    assert history[-1]["rewards/accuracies"] > history[0]["rewards/accuracies"]
    assert history[-1]["rewards/margins"] > max(history[1]["rewards/margins"], history[0]["rewards/margins"], 0)
    # step 1 runs the start model: the policy equals the reference, so every reward is 0 and the
    # loss is log 2 (up to batch-padding numerics)
    assert history[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and abs(history[0]["rewards/margins"]) < 1e-3
    reference = json.loads((run_dir / "dpo" / "reference_logps.json").read_text())["logps"]
    assert len(reference) == 8 and all(len(v) == 2 and v[0] < 0 and v[1] < 0 for v in reference.values())
    assert "stage dpo: done" in result.stderr

    start = PPLLaVAForConditionalGeneration.from_pretrained(run_dir / "dpo" / "init").state_dict()
    trained = consolidated_model(run_dir / "dpo" / "checkpoints" / "step_6", run_dir / "dpo" / "model").state_dict()
    changed = {name for name in start if not torch.equal(start[name], trained[name])}
    assert changed and all(name.startswith("language_model.") for name in changed), sorted(changed)[:5]
    sft = consolidated_model(run_dir / "sft" / "checkpoints" / "step_2", run_dir / "sft" / "model").state_dict()
    assert all(torch.equal(sft[name], start[name]) for name in start), "dpo/init is the SFT stage's final model"


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_live_reference_gives_the_precomputed_losses_and_stays_frozen(sft_then_dpo, tmp_path, zero_stage):
    root, manifest, _ = sft_then_dpo
    precomputed = read_metrics(root / "run" / "dpo" / "metrics.jsonl")
    recipe = training_recipe(tmp_path / "run", manifest)
    recipe.pop("sft")
    recipe["dpo"] = dpo_section(reference="live", init=str(root / "run" / "dpo" / "init"), zero_stage=zero_stage)
    result = run_pipeline("run", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-6000:]
    live = read_metrics(tmp_path / "run" / "dpo" / "metrics.jsonl")
    assert [m["loss"] for m in live] == pytest.approx([m["loss"] for m in precomputed], abs=2e-4)
    assert "reference: live, unchanged" in result.stdout
    assert not (tmp_path / "run" / "dpo" / "reference_logps.json").exists()


def test_random_frames_with_a_live_reference_the_authors_setting(sft_then_dpo, tmp_path):
    root, manifest, _ = sft_then_dpo
    recipe = training_recipe(tmp_path / "run", manifest)
    recipe.pop("sft")
    recipe["dpo"] = dpo_section(reference="live", frames="random", init=str(root / "run" / "dpo" / "init"), max_steps=2)
    result = run_pipeline("run", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-6000:]
    first = read_metrics(tmp_path / "run" / "dpo" / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference on the same random frames
    recipe["dpo"]["reference"] = "precomputed"
    refused = run_pipeline("validate", str(write_recipe(tmp_path / "bad.yaml", recipe)))
    assert refused.returncode == 2 and "dpo.frames: 'random'" in refused.stderr


def test_the_sft_term_adds_the_chosen_answers_nll(sft_then_dpo, tmp_path):
    """dpo.sft_weight: loss = DPO + weight x NLL per chosen answer token of the global batch."""
    root, manifest, _ = sft_then_dpo
    recipe = training_recipe(tmp_path / "run", manifest)
    recipe.pop("sft")
    recipe["dpo"] = dpo_section(init=str(root / "run" / "dpo" / "init"), max_steps=1, sft_weight=0.5)
    result = run_pipeline("run", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-6000:]
    first = read_metrics(tmp_path / "run" / "dpo" / "metrics.jsonl")[0]
    # policy = reference at the first step: the DPO part is log 2; the NLL of the chosen answers is positive
    assert first["sft_nll"] > 0
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["sft_nll"], rel=0.05)


@pytest.mark.parametrize("reference", ["intact", "truncated", "edited"])
def test_dpo_resumes_exactly_after_a_kill(sft_then_dpo, tmp_path, reference):
    """Also with the stored reference log-probs damaged meanwhile: found (their sha256 is stored
    with them), computed again with a warning, and the losses are the same."""
    root, manifest, _ = sft_then_dpo
    straight = read_metrics(root / "run" / "dpo" / "metrics.jsonl")
    recipe = training_recipe(tmp_path / "run", manifest)
    recipe.pop("sft")
    recipe["dpo"] = dpo_section(init=str(root / "run" / "dpo" / "init"), save_every=1)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    killed = run_pipeline("run", str(path), env=pipeline_env(**{FAULT_ENV: "before_rename:2"}))
    assert killed.returncode == -signal.SIGKILL
    stored = tmp_path / "run" / "dpo" / "reference_logps.json"
    if reference == "truncated":
        stored.write_text(stored.read_text()[:-40])
    elif reference == "edited":  # valid JSON, one log-prob changed: only the sha256 can tell
        data = json.loads(stored.read_text())
        key = sorted(data["logps"])[0]
        data["logps"][key] = [value + 1.0 for value in data["logps"][key]]  # (chosen, rejected)
        stored.write_text(json.dumps(data))
    resumed = run_pipeline("run", str(path), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert "resumed from" in resumed.stderr and "step 1" in resumed.stderr
    recomputed = f"{stored} is damaged" in resumed.stderr and "computing the reference log-probs again" in resumed.stderr
    assert recomputed == (reference != "intact"), resumed.stderr[-3000:]
    after = read_metrics(tmp_path / "run" / "dpo" / "metrics.jsonl")
    assert [m["step"] for m in after] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in after] == pytest.approx([m["loss"] for m in straight], abs=1e-6)
