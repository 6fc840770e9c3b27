"""The SFT stage from real checkpoint layouts written here first: LLaVA-NeXT (llava-hf) + CLIP
converted on the fly, and a PPLLaVA directory; a model whose loss is NaN stops the run."""

import pytest
import torch

from conftest import run_pipeline, small_shards, tiny_model, tiny_tokenizer, training_recipe, write_recipe
from pipeline.metrics import read_metrics
from pipeline.model.setup import save_tokenizers
from pipeline.model.tiny import tiny_config_for
from test_checkpoints import write_clip_checkpoint, write_llava_hf_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return small_shards(tmp_path_factory.mktemp("sources_data"))


def special_ids(tokenizer) -> dict:
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def test_sft_from_llava_next_and_clip_checkpoints(tmp_path, manifest):
    tokenizer = tiny_tokenizer()
    llava_dir, clip_dir = tmp_path / "llava", tmp_path / "clip"
    write_llava_hf_checkpoint(llava_dir, image_token_index=tokenizer.convert_tokens_to_ids("<image>"), **special_ids(tokenizer))
    write_clip_checkpoint(clip_dir, **special_ids(tokenizer))
    tokenizer.save_pretrained(llava_dir)
    tokenizer.save_pretrained(clip_dir)

    recipe = training_recipe(tmp_path / "run", manifest, max_steps=3, zero_stage=3)  # converted whole, then partitioned
    recipe["model"] = {"source": "llava_next", "llava_next_path": str(llava_dir), "clip_path": str(clip_dir),
                       "config_overrides": {"clip_keep_positions": 4, "num_frames": 8}}
    result = run_pipeline("run", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-4000:]
    history = read_metrics(tmp_path / "run" / "sft" / "metrics.jsonl")
    assert [m["step"] for m in history] == [1, 2, 3] and all(0 < m["loss"] < 20 for m in history)
    assert "converted" in result.stderr
    assert (tmp_path / "run/sft/model/clip_tokenizer/tokenizer.json").exists()


def write_pretrained(directory, poison: bool = False) -> None:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(5)
    model = type(tiny_model())(tiny_config_for(tokenizer))
    if poison:  # one NaN in the LM head: every logit row, so every loss, is NaN
        with torch.no_grad():
            model.language_model.lm_head.weight[7, 3] = float("nan")
    model.save_pretrained(directory)
    save_tokenizers(tokenizer, tokenizer, directory)


def test_sft_from_a_pretrained_directory(tmp_path, manifest):
    write_pretrained(tmp_path / "model")
    recipe = training_recipe(tmp_path / "run", manifest, max_steps=2)
    recipe["model"] = {"source": "pretrained", "pretrained_path": str(tmp_path / "model")}
    result = run_pipeline("run", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert result.returncode == 0, result.stderr[-4000:]
    assert [m["step"] for m in read_metrics(tmp_path / "run/sft/metrics.jsonl")] == [1, 2]


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, manifest):
    write_pretrained(tmp_path / "model", poison=True)
    recipe = training_recipe(tmp_path / "run", manifest, max_steps=4, save_every=1)
    recipe["model"] = {"source": "pretrained", "pretrained_path": str(tmp_path / "model")}
    recipe["sft"]["max_nonfinite_in_a_row"] = 3
    result = run_pipeline("run", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert result.returncode == 1
    for count in (1, 2, 3):
        assert "non-finite loss on some rank, micro-batch" in result.stderr and f"({count} in a row)" in result.stderr
    assert "error: 3 non-finite losses in a row (sft.max_nonfinite_in_a_row)" in result.stderr
    assert not (tmp_path / "run/sft/COMPLETE").exists()
    # step 1's two micro-batches were both left out (a step of zero gradient); step 2's first made 3 in a row
    assert (tmp_path / "run/sft/checkpoints/latest").read_text().strip() == "step_1"
    assert "the last good checkpoint is" in result.stderr and "step_1" in result.stderr
