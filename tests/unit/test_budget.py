"""Each stage's LLM context against its visual tokens: what `validate` prints and where it stops."""

import json

import pytest

from conftest import REPO_ROOT, write_recipe
from pipeline.__main__ import main
from pipeline.exit_codes import ExitCode
from pipeline.model.budget import check_budgets, recipe_budgets
from pipeline.recipe import RecipeError, parse_recipe
from ppllava import PPLLaVAConfig

pytestmark = pytest.mark.unit


def test_validate_prints_the_paper_recipe_token_budget(capsys):
    assert main(["validate", str(REPO_ROOT / "recipes/sft_gpu.yaml")]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "sft context 4096 tokens (data.max_length)" in out
    assert "32 frames of 336px, kernel (2, 3, 3): 1024 visual tokens, 3072 left for text" in out
    assert "up to 336 visual tokens" in out and "64 visual tokens per image" in out


def test_validate_fails_when_a_video_cannot_fit_and_says_why(capsys):
    code = main(["validate", str(REPO_ROOT / "recipes/dpo_gpu.yaml"), "data.max_length=1024"])
    captured = capsys.readouterr()
    assert code == ExitCode.BAD_INPUT
    assert "1024 visual tokens, 0 left for text  <- does not fit" in captured.out  # the numbers come first
    assert "dpo: a video of 32 frames is 1024 visual tokens" in captured.err and "raise data.max_length" in captured.err


def test_run_refuses_the_same_recipe_before_any_device_work(capsys, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "r", "run_dir": str(tmp_path / "run"), "backend": "cpu",
                                               "data": {"manifest": str(manifest), "max_length": 20},
                                               "sft": {"global_batch_size": 1}})
    assert main(["run", str(recipe)]) == ExitCode.BAD_INPUT
    assert "sft: a video of 8 frames is 16 visual tokens" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def budgets_of(data: dict) -> dict:
    return {b.stage: b for b in recipe_budgets(parse_recipe(data, [], "r.yaml"))}


def test_eval_counts_its_own_frames_and_kernel(tmp_path):
    model = tmp_path / "model"
    PPLLaVAConfig(text_config={"model_type": "llama", "max_position_embeddings": 4096}).save_pretrained(model)
    data = {"name": "e", "run_dir": str(tmp_path / "run"),
            "eval": {"model_path": str(model), "multiple_choice": ["q.json"], "num_frames": 64, "video_kernel": [4, 3, 3]}}
    budget = budgets_of(data)["eval"]
    assert (budget.num_frames, budget.video, budget.context) == (64, 1024, 4096)  # Table 8: 64 frames, same tokens
    assert budget.context_key == "the LLM's max_position_embeddings" and budget.model == str(model)
    data["eval"]["video_kernel"] = [2, 3, 3]
    assert budgets_of(data)["eval"].video == 2048


def test_a_context_longer_than_the_llm_is_refused(tmp_path):
    model = tmp_path / "model"
    PPLLaVAConfig.tiny().save_pretrained(model)  # a 512-position LLM
    data = {"name": "p", "run_dir": str(tmp_path / "run"), "model": {"source": "pretrained", "pretrained_path": str(model)},
            "data": {"manifest": "m.json", "max_length": 1024}, "sft": {"global_batch_size": 1}}
    recipe = parse_recipe(data, [], "r.yaml")
    with pytest.raises(RecipeError, match=r"data.max_length=1024 is longer than the LLM's own context .*=512\)"):
        check_budgets(recipe)
    check_budgets(parse_recipe(data, ["data.max_length=512"], "r.yaml"))


def test_a_llava_next_source_is_read_from_its_config_files(tmp_path):
    from transformers import CLIPConfig, LlavaNextConfig

    llava, clip = tmp_path / "llava", tmp_path / "clip"
    vision = {"image_size": 336, "patch_size": 14, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4}
    LlavaNextConfig(vision_config={"model_type": "clip_vision_model", **vision},
                    text_config={"model_type": "llama", "max_position_embeddings": 4096}).save_pretrained(llava)
    CLIPConfig(vision_config=vision, text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                  "num_attention_heads": 4}).save_pretrained(clip)
    data = {"name": "l", "run_dir": str(tmp_path / "run"),
            "model": {"source": "llava_next", "llava_next_path": str(llava), "clip_path": str(clip),
                      "config_overrides": {"num_frames": 16}},
            "data": {"manifest": "m.json", "max_length": 4096}, "sft": {"global_batch_size": 1}}
    budget = budgets_of(data)["sft"]
    assert budget.model == str(llava) and budget.llm_context == 4096 and (budget.num_frames, budget.video) == (16, 512)
    assert json.loads((llava / "config.json").read_text())["model_type"] == "llava_next"


def test_a_missing_pretrained_path_is_the_error_not_a_budget_from_default_shapes(capsys, tmp_path):
    """validate on a recipe whose model.pretrained_path no stage writes and is not there: the path
    is reported, first and alone, not the budget the PPLLaVA defaults fail (the demo's 512 context)."""
    missing = tmp_path / "no_model"
    code = main(["validate", str(REPO_ROOT / "recipes/demo_cpu.yaml"), f"model.pretrained_path={missing}"])
    err = capsys.readouterr().err
    assert code == ExitCode.BAD_INPUT
    assert err.startswith(f"error: {REPO_ROOT / 'recipes/demo_cpu.yaml'}: model.pretrained_path: {missing} does not "
                          f"exist, and no stage of the recipe writes it")
    assert "a video of 32 frames" not in err
    # the synth stage's own model (not there yet, written by this recipe) is judged as the tiny model
    assert main(["validate", str(REPO_ROOT / "recipes/demo_cpu.yaml")]) == ExitCode.OK
