"""LoRA SFT end to end (PEFT adapters on the tiny LLM, ZeRO-2, fp32): only the adapters and the
parts `trainable` names train, a killed run resumes with the uninterrupted losses, and export
merges the adapters into a plain PPLLaVA directory whose logits are the adapter model's, and
writes them alone in PEFT's format on request."""

import json
import signal

import pytest
import torch

from conftest import build_batch, pipeline_env, run_pipeline, saved_tensors, small_shards, training_recipe, write_recipe
from pipeline.checkpoint import FAULT_ENV
from pipeline.metrics import read_metrics
from ppllava import IMAGE, VIDEO, PPLLaVAConfig, PPLLaVAForConditionalGeneration
from ppllava.lora import add_lora, load_lora_config

pytestmark = pytest.mark.integration

STEPS = 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return small_shards(tmp_path_factory.mktemp("lora_data"))


def lora_recipe(tmp_path, manifest):
    recipe = training_recipe(tmp_path / "run", manifest, max_steps=STEPS, save_every=2, lr=1e-2)
    # the adapters alone: export.adapter can then carry everything that trained
    recipe["sft"]["trainable"] = {"llm": False, "projector": False, "clip_text": False, "clip_projections": False}
    recipe["sft"]["lora"] = {"rank": 4, "alpha": 8, "dropout": 0.0}
    recipe["export"] = {"dtype": "fp32", "adapter": True}
    return write_recipe(tmp_path / "recipe.yaml", recipe)


def losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")]


def test_lora_sft_trains_the_adapters_resumes_exactly_and_exports_merged(tmp_path, manifest):
    straight = run_pipeline("run", str(lora_recipe(tmp_path / "straight", manifest)))
    assert straight.returncode == 0, straight.stderr[-4000:]
    run_dir = tmp_path / "straight" / "run"
    checkpoints = run_dir / "sft" / "checkpoints"

    index = json.loads((checkpoints / f"step_{STEPS}" / "training_state" / "index.json").read_text())
    trained = sorted(name for name, entry in index["parameters"].items() if entry["trainable"])
    adapters = [name for name in trained if ".lora_" in name]
    assert len(adapters) == 2 * 7 * 2 and adapters == trained  # A and B on the 7 linear layers of 2 LLM layers
    early, late = saved_tensors(checkpoints / "step_2"), saved_tensors(checkpoints / f"step_{STEPS}")
    base = [name for name in late if name.startswith("language_model.") and ".lora_" not in name]
    assert base and all(torch.equal(early[name], late[name]) for name in base)  # the LLM's own weights stay
    assert all(late[name].abs().sum() > 0 for name in adapters if ".lora_B." in name)  # B starts at zero

    # resume: killed while publishing step 4, continued from step 2, the same losses
    resumed_dir = tmp_path / "resumed"
    recipe = lora_recipe(resumed_dir, manifest)
    killed = run_pipeline("run", str(recipe), env=pipeline_env(**{FAULT_ENV: f"before_rename:{STEPS}"}))
    assert killed.returncode == -signal.SIGKILL
    resumed = run_pipeline("run", str(recipe), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert losses(resumed_dir / "run") == pytest.approx(losses(run_dir), abs=1e-6)

    # export: a plain PPLLaVA directory (no adapter modules) computing what the adapter model computes
    exported = PPLLaVAForConditionalGeneration.from_pretrained(run_dir / "export", dtype=torch.float32).eval()
    assert not any(".lora_" in name for name in exported.state_dict())
    config = PPLLaVAConfig.from_pretrained(run_dir / "sft" / "model")
    adapted = PPLLaVAForConditionalGeneration._from_config(config, dtype=torch.float32)
    add_lora(adapted, load_lora_config(run_dir / "sft" / "model"))
    adapted.load_state_dict(late, strict=True)
    batch = build_batch(config, [(VIDEO, 4), (IMAGE, 3)], seed=2)
    with torch.no_grad():
        expected = adapted.eval()(**batch).logits
        difference = (exported(**batch).logits - expected).abs().max()
    assert difference < 1e-5

    # export.adapter: the adapters alone, which PEFT's own loader applies to the model they trained on
    from peft import PeftModel

    assert sorted(p.name for p in (run_dir / "export" / "adapter").iterdir()) == ["adapter_config.json",
                                                                                   "adapter_model.safetensors"]
    base = PPLLaVAForConditionalGeneration._from_config(config, dtype=torch.float32)
    base.load_state_dict({name.replace(".base_layer.", "."): tensor for name, tensor in late.items()
                          if ".lora_" not in name}, strict=True)
    with torch.no_grad():
        applied = PeftModel.from_pretrained(base, run_dir / "export" / "adapter").eval()(**batch).logits
    assert torch.equal(applied, expected)


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory):
    from pipeline.model.setup import save_tokenizers
    from pipeline.model.tiny import tiny_config_for, tiny_tokenizer

    root = tmp_path_factory.mktemp("lora_dpo")
    manifest = small_shards(root, dpo_pairs=8)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(3)
    PPLLaVAForConditionalGeneration(tiny_config_for(tokenizer)).save_pretrained(root / "start")
    save_tokenizers(tokenizer, tokenizer, root / "start")
    return root, manifest


def run_lora_dpo(root, manifest, name: str, reference: str) -> list[dict]:
    recipe = training_recipe(root / name, manifest)
    recipe.pop("sft")
    recipe["dpo"] = {"zero_stage": 2, "precision": "fp32", "global_batch_size": 4, "micro_batch_size": 2,
                     "lr": 1e-2, "max_steps": 4, "log_every": 1, "init": str(root / "start"), "reference": reference,
                     "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}}
    recipe["export"] = {"dtype": "fp32"}
    result = run_pipeline("run", str(write_recipe(root / f"{name}.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-4000:]
    return read_metrics(root / name / "dpo" / "metrics.jsonl")


def test_lora_dpo_reference_with_the_adapters_disabled_is_the_start_model(dpo_setup):
    """Live, the reference is the policy with its adapters off (no second copy); precomputed, the
    start model's log-probs from one pass before training: the same losses, and only adapters train."""
    root, manifest = dpo_setup
    live = run_lora_dpo(root, manifest, "live", "live")
    precomputed = run_lora_dpo(root, manifest, "precomputed", "precomputed")
    assert [m["step"] for m in live] == [1, 2, 3, 4]
    assert abs(live[0]["rewards/margins"]) < 1e-6  # step 1: the adapters are zero, the policy is the reference
    assert abs(live[-1]["rewards/margins"]) > 1e-3  # ...then they train
    assert [m["loss"] for m in live] == pytest.approx([m["loss"] for m in precomputed], abs=1e-5)
    index = json.loads((root / "live" / "dpo" / "checkpoints" / "step_4" / "training_state" / "index.json").read_text())
    trained = [name for name, entry in index["parameters"].items() if entry["trainable"]]
    assert trained and all(".lora_" in name for name in trained)
    exported = PPLLaVAForConditionalGeneration.from_pretrained(root / "live" / "export")
    assert not any(".lora_" in name for name in exported.state_dict())
