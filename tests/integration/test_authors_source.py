"""`model.source: authors`: a checkpoint in the authors' released layout (written here, tiny)
trained by SFT and DPO, exported, evaluated and chatted with through `python -m pipeline`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from authors_layout import write_authors_checkpoint
from conftest import run_pipeline, tiny_config_for, tiny_tokenizer, write_recipe
from pipeline.data.sharding import ShardSettings, run_shard
from pipeline.data.synthetic import SynthSettings, generate
from pipeline.metrics import read_metrics
from pipeline.model.consolidate import consolidated_model
from ppllava import PPLLaVAForConditionalGeneration

pytestmark = pytest.mark.integration

TRAINING = {"zero_stage": 2, "precision": "fp32", "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3,
            "epochs": 10, "log_every": 1, "save_every": 100}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors")
    generate(root / "synth", SynthSettings(seed=4, videos=8, images=6, multi_images=4, eval_questions=3, dpo_pairs=8,
                                           size=48, frames=8))
    run_shard([str(p) for p in sorted((root / "synth" / "cards").glob("*.yaml"))], root / "shards",
              ShardSettings(max_samples_per_shard=4, num_frames=8))
    tokenizer = tiny_tokenizer()
    released = root / "released"
    tensors = write_authors_checkpoint(released, tiny_config_for(tokenizer), depth=2, tokenizer=tokenizer)
    return {"root": root, "released": released, "tensors": tensors, "manifest": root / "shards" / "manifest.json",
            "questions": root / "synth" / "eval_video.json", "media": root / "synth" / "media"}


def recipe_for(world, run_dir, **stages) -> dict:
    return {"name": "authors", "run_dir": str(run_dir), "backend": "cpu", "seed": 0,
            "model": {"source": "authors", "authors_path": str(world["released"])},
            "data": {"manifest": str(world["manifest"]), "num_workers": 1, "max_length": 512, "template": "plain_v1"},
            **stages}


def test_sft_dpo_export_eval_and_chat_from_a_released_checkpoint(world, tmp_path):
    run_dir = tmp_path / "run"
    # SFT under ZeRO-3: the release is converted whole in host memory, DeepSpeed partitions it
    recipe = recipe_for(world, run_dir, sft={**TRAINING, "max_steps": 3, "zero_stage": 3}, dpo={**TRAINING, "max_steps": 2},
                        export={"dtype": "fp32"},
                        eval={"multiple_choice": [str(world["questions"])], "media_root": str(world["media"]),
                              "limit": 2, "baseline": True})
    result = run_pipeline("run", str(write_recipe(tmp_path / "recipe.yaml", recipe)), timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "read the authors' checkpoint" in result.stderr
    assert [m["step"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")] == [1, 2, 3]
    assert [m["step"] for m in read_metrics(run_dir / "dpo" / "metrics.jsonl")] == [1, 2]

    exported = PPLLaVAForConditionalGeneration.from_pretrained(str(run_dir / "export"))
    assert exported.config.bt_adapter_depth == 2 and exported.config.video_kernel == [2, 3, 3]
    theirs = world["tensors"]
    adapter = "vision_tower.vision_model.btadapter_S_layers."
    # SFT trained the adapter layer that reaches the features (CLIP layer 1's side), not the one past them
    assert not torch.equal(exported.bt_adapter.spatial_layers[0].mlp.fc1.weight, theirs[adapter + "0.mlp.fc1.weight"])
    assert torch.equal(exported.bt_adapter.spatial_layers[1].mlp.fc1.weight, theirs[adapter + "1.mlp.fc1.weight"])
    # the vision tower stayed frozen
    assert torch.equal(exported.vision_tower.encoder.layers[0].mlp.fc1.weight,
                       theirs["vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"])

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    entry = results["multiple_choice"]["eval_video"]
    assert entry["questions"] == 2 and "untrained_accuracy" in entry

    video = world["media"] / json.loads(world["questions"].read_text())[0]["video"]
    chat = run_pipeline("chat", str(run_dir / "export"), "--video", str(video), "--max-new-tokens", "4",
                        "--backend", "cpu", "Which way does the circle move?", timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()


def test_dpo_from_the_released_model_trains_the_llm_only(world, tmp_path):
    run_dir = tmp_path / "run"
    recipe = recipe_for(world, run_dir, dpo={**TRAINING, "max_steps": 2, "init": "model"})
    result = run_pipeline("run", str(write_recipe(tmp_path / "recipe.yaml", recipe)), timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    init = PPLLaVAForConditionalGeneration.from_pretrained(str(run_dir / "dpo" / "init"))
    assert init.config.bt_adapter_depth == 2
    settings = json.loads((run_dir / "dpo" / "init" / "processor_config.json").read_text())
    assert settings["template"] == "plain_v1" and settings["frame_sampling"] == "authors"
    assert (run_dir / "dpo" / "init" / "clip_tokenizer" / "tokenizer.json").is_file()
    checkpoint = run_dir / "dpo" / "checkpoints" / "step_2"
    assert checkpoint.is_dir()
    trained = consolidated_model(checkpoint, run_dir / "dpo" / "model").state_dict()
    changed = {name for name, tensor in init.state_dict().items() if not torch.equal(tensor, trained[name])}
    assert changed and all(name.startswith("language_model.") for name in changed), sorted(changed)[:5]


def test_the_converter_command_writes_a_model_directory_chat_reads(world, tmp_path):
    out = tmp_path / "converted"
    from ppllava.convert import main

    main(["authors", str(world["released"]), str(out)])
    assert (out / "processor_config.json").is_file() and (out / "clip_tokenizer").is_dir()
    weights = load_file(out / "model.safetensors")
    assert "bt_adapter.temporal_layers.0.temporal_fc.weight" in weights
    video = world["media"] / json.loads(world["questions"].read_text())[0]["video"]
    chat = run_pipeline("chat", str(out), "--video", str(video), "--max-new-tokens", "4", "--backend", "cpu",
                        "What colour is the circle?", timeout=120)
    assert chat.returncode == 0, chat.stderr
    refused = run_pipeline("chat", str(world["released"]), "--video", str(video), "--backend", "cpu", "Q", timeout=120)
    assert refused.returncode == 2 and "python -m ppllava.convert authors" in refused.stderr
    with pytest.raises(SystemExit, match="not a local directory"):
        main(["authors", str(world["released"]), str(tmp_path / "x"), "--clip-tokenizer", str(tmp_path / "nowhere")])
