"""The memory plan (pipeline/model/memory.py, `python -m pipeline plan`): its activation count
against a real forward, its ZeRO accounting, the 7B recipes planned in seconds, the verdict and
the smallest change that fits, and the commands that print it."""

import time

import pytest
import torch

from conftest import REPO_ROOT, build_batch, run_pipeline, pipeline_env
from pipeline.devices import DEVICES
from pipeline.model.memory import plan_stage
from pipeline.model.memory_fit import plan_report, smallest_change, verdict
from pipeline.model.meta_forward import meta_forward, meta_model
from pipeline.model.setup import set_trained_parts
from pipeline.recipe import RecipeError, load_recipe, parse_recipe
from pipeline.recipe.training_sections import LoraSection
from ppllava import VIDEO, PPLLaVAConfig, PPLLaVAForConditionalGeneration

GIB = 2**30


def real_saved_bytes(model, batch) -> int:
    """Bytes of every storage autograd saves in a real forward (parameters not counted)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    return sum(seen.values())


@pytest.mark.parametrize("lora", [None, LoraSection(rank=4, alpha=8, dropout=0.1)], ids=["full", "lora"])
def test_the_meta_count_of_saved_activations_is_a_real_forwards(lora):
    """The plan's meta forward saves what the real model saves for a micro-batch of one video and a
    row of the same length, to 0.1 % (the real one also saves the splice's few index tensors; its
    CLIP prompt is at the full CLIP context and its attention has as many key/value heads as query
    heads: the two places the plan takes the worst case)."""
    config = PPLLaVAConfig.tiny(text_config={"vocab_size": 512, "num_key_value_heads": 4})
    parts = dict(vision=False, projector=True, clip_text=True, llm=lora is None)
    model = PPLLaVAForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    set_trained_parts(model, parts, lora)
    batch = build_batch(config, [(VIDEO, config.num_frames)], text_len=40)
    length = config.clip_context_length
    batch["clip_input_ids"] = torch.randint(1, 100, (1, length))
    batch["clip_input_ids"][0, -1] = config.clip_text_config.eos_token_id
    batch["clip_attention_mask"] = torch.ones(1, length, dtype=torch.long)
    real = real_saved_bytes(model.train(), batch)

    saved = meta_forward(meta_model(config, parts, lora), config, torch.float32, videos=1, rows=1,
                          tokens=batch["input_ids"].shape[1], dpo=False)
    assert saved.before + saved.in_layers + saved.head == pytest.approx(real, rel=1e-3)
    assert saved.layers == 2 and saved.head >= batch["input_ids"].shape[1] * 512 * 4  # the fp32 log-softmax


def tiny_recipe(**sft) -> dict:
    settings = {"zero_stage": 2, "precision": "bf16", "global_batch_size": 8, "micro_batch_size": 1}
    settings.update(sft)
    return {"name": "plan", "run_dir": "/tmp/plan", "backend": "cuda", "model": {"source": "tiny"},
            "cluster": {"nodes": 1, "procs_per_node": 4}, "data": {"manifest": "/nonexistent/manifest.json"},
            "sft": settings}


def lines(plan) -> dict[str, int]:
    return {line.label: line.bytes for line in plan.lines}


def test_zero_stages_divide_what_the_zero_paper_says():
    """ZeRO-2 divides optimizer states and gradients by the world, ZeRO-3 the weights as well;
    offloading moves the optimizer states to the host; LoRA trains a small fraction."""
    plans = {stage: plan_stage(parse_recipe(tiny_recipe(zero_stage=stage)), "sft") for stage in (0, 2, 3)}
    zero0, zero2, zero3 = (lines(plans[stage]) for stage in (0, 2, 3))
    assert zero3["weights"] * 4 == pytest.approx(zero2["weights"], abs=4)
    assert zero2["optimizer states"] == pytest.approx(zero3["optimizer states"], abs=4)
    assert zero2["gradients"] * 4 == pytest.approx(zero0["gradients"], abs=8)
    assert "reduce bucket" in zero2 and "reduce bucket" not in zero0 and "ZeRO-3 gathered parameters" in zero3

    offloaded = plan_stage(parse_recipe(tiny_recipe(offload_optimizer=True)), "sft")
    assert lines(offloaded)["optimizer states"] == 0
    assert any("offloaded optimizer" in line.label and line.bytes > 0 for line in offloaded.host)

    lora = plan_stage(parse_recipe(tiny_recipe(lora={"rank": 2}, trainable={"llm": False})), "sft")
    assert lines(lora)["optimizer states"] < zero2["optimizer states"] / 2


@pytest.mark.parametrize("name, device", [("sft_gpu", "a100-80g"), ("sft_npu", "910b-64g"),
                                          ("sft_lora_gpu", "a100-40g"), ("sft_lora_npu", "910b-64g"),
                                          ("dpo_lora_gpu", "a100-40g")])
def test_the_7b_recipes_are_planned_in_seconds_and_fit_their_devices(name, device, monkeypatch, tmp_path):
    """The real recipes, without their checkpoints here: the PPLLaVA defaults (Vicuna-7B + CLIP
    ViT-L/14-336) stand in, 32 frames, the recipes' own context, batch and ZeRO layout."""
    monkeypatch.setenv("MODEL_ROOT", str(tmp_path))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    recipe = load_recipe(REPO_ROOT / "recipes" / f"{name}.yaml")
    assert recipe.cluster.device == device
    start = time.perf_counter()
    text, problems = plan_report(recipe)
    assert time.perf_counter() - start < 30
    assert problems == []
    assert f"{device}" in text and "fits" in text and "PPLLaVA defaults" in text
    stage = "dpo" if name.startswith("dpo") else "sft"
    plan = plan_stage(recipe, stage)
    total = sum(p.numel() for p in meta_model(PPLLaVAConfig(), {}, None).parameters())
    assert 7.0e9 < total < 7.3e9
    assert 5 * GIB < plan.total < DEVICES[device].memory


def test_a_plan_that_does_not_fit_names_the_smallest_change_that_does(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_ROOT", str(tmp_path))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    recipe = load_recipe(REPO_ROOT / "recipes" / "sft_gpu.yaml", ["cluster.nodes=1", "sft.micro_batch_size=8"])
    small = DEVICES["rtx4090-24g"]
    fits, judged = verdict(plan_stage(recipe, "sft"), small)
    assert not fits and "short" in judged
    assert smallest_change(recipe, "sft", small) == "fits with sft.micro_batch_size=1"
    # without checkpointing, one change is not enough: the least disruptive ones together
    unchecked = load_recipe(REPO_ROOT / "recipes" / "sft_gpu.yaml",
                            ["cluster.nodes=1", "sft.micro_batch_size=8", "model.gradient_checkpointing=false"])
    assert smallest_change(unchecked, "sft", small) == \
        "fits with model.gradient_checkpointing=true sft.micro_batch_size=1"
    # full fine-tuning of a 7B model on one 24 GB device: only LoRA
    alone = load_recipe(REPO_ROOT / "recipes" / "sft_gpu.yaml", ["cluster.nodes=1", "cluster.procs_per_node=1",
                                                                 "sft.micro_batch_size=1"])
    assert smallest_change(alone, "sft", small) == "fits with sft.lora={}"
    # a 32k context on one device: nothing within the recipe's memory settings
    long = load_recipe(REPO_ROOT / "recipes" / "sft_gpu.yaml", [
        "cluster.nodes=1", "cluster.procs_per_node=1", "data.max_length=32000",
        "model.config_overrides={text_config: {max_position_embeddings: 32768}}"])
    assert smallest_change(long, "sft", small).startswith("does not fit with any of sft.micro_batch_size=1 "
                                                          "sft.offload_optimizer=true sft.lora={}")


def test_cluster_device_must_be_known():
    with pytest.raises(RecipeError, match="cluster.device: unknown device 'a100'.*a100-40g"):
        recipe = parse_recipe({**tiny_recipe(), "cluster": {"device": "a100"}})
        from pipeline.recipe import validate

        validate(recipe)


def test_plan_and_validate_commands(tmp_path):
    env = pipeline_env(MODEL_ROOT=str(tmp_path), DATA_ROOT=str(tmp_path))
    planned = run_pipeline("plan", "recipes/sft_gpu.yaml", "cluster.nodes=1", "--device", "rtx4090-24g",
                           "--device", "a100-80g", env=env)
    assert planned.returncode == 2, planned.stderr[-2000:]
    assert "rtx4090-24g" in planned.stdout and "a100-80g" in planned.stdout and "peak" in planned.stdout
    assert "error: sft on rtx4090-24g:" in planned.stderr and "fits with sft.micro_batch_size=1" in planned.stderr

    checked = run_pipeline("validate", "recipes/sft_lora_gpu.yaml", env=env)
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "a100-40g" in checked.stdout and "fits:" in checked.stdout and "valid." in checked.stdout

    refused = run_pipeline("validate", "recipes/sft_gpu.yaml", "cluster.device=rtx4090-24g", "cluster.nodes=1",
                           "sft.micro_batch_size=8", env=env)
    assert refused.returncode == 2
    assert "sft on rtx4090-24g: does not fit" in refused.stderr
