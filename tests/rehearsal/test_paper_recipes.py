"""The rehearsal tier: every shipped cluster recipe rehearsed on this CPU with `run --rehearse`, as a
user would before queueing it, over data and model files laid out like the real ones
(tests/paper_layout.py): 32 frames of 10 s 30 fps clips at 336 px and more, real image sizes,
multi-turn LLaVA and VideoChat2 conversations, multi-image sets, DPO pairs; the configs of CLIP
ViT-L/14-336 (legacy text ids, 77 -> 248 positions) and llava-v1.6-vicuna-7b (vocabulary 32064,
<image> 32000), with CLIP's real tokenizer. Only the model's width and depth are shrunk."""

import json
from pathlib import Path

import pytest
import torch

from clip_vocabulary import END_OF_TEXT
from conftest import pipeline_env, run_pipeline
from paper_layout import IMAGE_TOKEN, VICUNA_VOCAB, write_data_root, write_model_root
from pipeline.data.collate import ProcessorSettings, SampleProcessor
from pipeline.data.sources import read_llava, read_videochat2, strict
from pipeline.metrics import read_metrics
from pipeline.model.setup import load_directory_tokenizers
from ppllava import PPLLaVAForConditionalGeneration

pytestmark = pytest.mark.rehearsal


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    return {"root": root, "env": pipeline_env(MODEL_ROOT=str(write_model_root(root / "models")),
                                              DATA_ROOT=str(write_data_root(root / "data")))}


def rehearse(roots, recipe: str, *overrides: str):
    run_dir = roots["root"] / recipe.split(".")[0]
    result = run_pipeline("run", f"recipes/{recipe}", f"run_dir={run_dir}", *overrides, "--rehearse",
                          env=roots["env"], timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    return run_dir / "rehearsal", result.stdout


@pytest.fixture(scope="module")
def sft(roots):
    return rehearse(roots, "sft_gpu.yaml")


def test_sft_recipe_rehearses_refusing_exactly_what_the_cluster_run_would_and_every_modality_trained(sft):
    """Refused: the JPEG saved as .mp4, which decord (the GPU nodes' decoder, data.decoder auto)
    cannot open, though PyAV reads it. Accepted: the rotation-tagged phone clip (both decoders
    read it portrait). Said: LLaVA-665k's text-only record, sharded but never drawn by weights
    without text."""
    rehearsal, report = sft
    manifest = json.loads((rehearsal / "shard/manifest.json").read_text())
    assert manifest["records"] == 8 + 6 + 3  # the first 8 records of each card
    (refused,) = manifest["rejected"]
    assert refused["key"] == "videochat2_it/5" and "decord: cannot open video" in refused["reason"]
    assert "refused 1" in report and "refused videochat2_it/5: " in report
    assert "sharded, never drawn: 1 text sample(s)" in report
    history = read_metrics(rehearsal / "sft/metrics.jsonl")
    assert len(history) == 3 and all(m["loader_skipped"] == 0 and m["truncated"] == 0 for m in history)
    seen = {key for m in history for key in m if key.startswith("visual_tokens/")}
    assert seen == {"visual_tokens/video", "visual_tokens/image", "visual_tokens/multi_image"}
    assert all(m["visual_tokens/video"] == 1024 for m in history if "visual_tokens/video" in m)
    assert "shard   17 records read" in report
    config = json.loads((rehearsal / "export/config.json").read_text())
    assert (config["text_config"]["vocab_size"], config["image_token_index"]) == (VICUNA_VOCAB, IMAGE_TOKEN)
    assert (config["clip_text_config"]["eos_token_id"], config["clip_text_config"]["max_position_embeddings"]) == (2, 248)
    assert (config["vision_config"]["image_size"], config["vision_config"]["patch_size"], config["num_frames"]) == (336, 14, 32)
    assert config["text_config"]["hidden_size"] == 64  # shrunk: width and depth only


def test_the_clip_feature_is_the_end_token_state_of_real_prompts(sft, roots):
    rehearsal, _ = sft
    export = rehearsal / "export"
    model = PPLLaVAForConditionalGeneration.from_pretrained(export).eval()
    tokenizer, clip_tokenizer = load_directory_tokenizers(export)
    processor = SampleProcessor(model.config, tokenizer, clip_tokenizer, ProcessorSettings(max_length=4096))
    data = roots["root"] / "data"
    samples = list(strict(read_videochat2(data / "videochat2_it/video_train.json", "v")))[:2]
    samples += list(strict(read_llava(data / "llava_v1_5/llava_v1_5_mix665k.json", "i")))[:2]
    roots_of = {"v": data / "videochat2_it/videos", "i": data / "llava_v1_5/images"}
    processed = [processor(s, [(roots_of[s.dataset] / m).read_bytes() for m in s.media]) for s in samples]
    batch = processor.collate(processed).inputs
    ids, mask = batch["clip_input_ids"], batch["clip_attention_mask"]
    with torch.no_grad():
        features = model.clip_text.end_token_states(ids, mask)
        hidden = model.clip_text(input_ids=ids, attention_mask=mask).last_hidden_state
    ends = [row.tolist().index(END_OF_TEXT) for row in ids]  # CLIP's end token, not the config's legacy id 2
    assert len(set(ends)) > 1  # prompts of different lengths, so a wrong position would show
    torch.testing.assert_close(features, torch.stack([hidden[row, end] for row, end in enumerate(ends)]))


def test_dpo_and_eval_recipes_rehearse_from_the_sft_rehearsal(sft, roots):
    sft_rehearsal, _ = sft
    dpo, report = rehearse(roots, "dpo_gpu.yaml", f"dpo.init={sft_rehearsal / 'export'}")
    manifest = json.loads((dpo / "shard/manifest.json").read_text())
    assert manifest["rejected"] == [] and manifest["counts"] == {"dpo": 4}
    history = read_metrics(dpo / "dpo/metrics.jsonl")
    assert len(history) == 3 and all(m["loader_skipped"] == 0 and m["truncated"] == 0 for m in history)
    assert "dpo     3 steps" in report
    evaluated, report = rehearse(roots, "eval_gpu.yaml", f"eval.model_path={dpo / 'export'}")
    results = json.loads((evaluated / "eval/results.json").read_text())
    assert results["overall"]["questions"] == 4 and results["num_frames"] == 32
    assert "action_sequence: 2 questions answered" in report


def test_a_rehearsal_without_the_model_it_starts_from_says_what_to_do(roots):
    result = run_pipeline("run", "recipes/dpo_gpu.yaml", f"run_dir={roots['root'] / 'nothing'}", "--rehearse",
                          env=roots["env"], timeout=300)
    assert result.returncode == 2 and "dpo.init" in result.stderr
    assert "point dpo.init at that rehearsal's export" in result.stderr  # not a bare "does not exist"


def test_the_authors_sft_recipe_rehearses_over_their_layout(roots):
    """recipes/sft_authors_multi_image_gpu.yaml: every set of the authors' image+video+multi-image SFT,
    in their QA layout, LLaVA-Hound's videos as frame folders, at their natural sizes."""
    rehearsal, report = rehearse(roots, "sft_authors_multi_image_gpu.yaml")
    manifest = json.loads((rehearsal / "shard/manifest.json").read_text())
    assert manifest["rejected"] == []
    assert manifest["counts"] == {"image": 3, "video": 2 + 5, "multi_image": 2}
    history = read_metrics(rehearsal / "sft/metrics.jsonl")
    seen = {key for m in history for key in m if key.startswith("visual_tokens/")}
    assert seen == {"visual_tokens/video", "visual_tokens/image", "visual_tokens/multi_image"}
    assert all(m["loader_skipped"] == 0 and m["truncated"] == 0 for m in history)
    # their BT-Adapter, at rehearsal depth: one layer reaching the features, one past them
    assert json.loads((rehearsal / "models/sft/config.json").read_text())["bt_adapter_depth"] == 2


REPO = Path(__file__).resolve().parents[2]
# What each cluster run would refuse of tests/paper_layout.py's data: the JPEG saved as .mp4 that
# decord (GPU nodes, data.decoder auto) cannot open, in every recipe that shards videochat2_it; and
# what it would shard but never draw (LLaVA-665k's text-only record, where data.weights has no text).
JPEG_AS_MP4 = "videochat2_it/5"
ONE_STEP = ("--rehearse-steps", "1")
EVERY_OTHER_RECIPE = {
    # recipe: (overrides, refused at shard time, sharded but never drawn)
    # The NPU twins train one step: their GPU twins' three already train every modality on this
    # data, and what differs (backend row, layout, memory plan) shows in the first step.
    "sft_npu": (ONE_STEP, {JPEG_AS_MP4}, {"text": 1}),
    "sft_lora_gpu": ((), {JPEG_AS_MP4}, {"text": 1}),
    "sft_lora_npu": (ONE_STEP, {JPEG_AS_MP4}, {"text": 1}),
    "full_npu": (ONE_STEP, {JPEG_AS_MP4}, {"text": 1}),
    "sft_authors_gpu": ((), set(), {}),
    "dpo_npu": (("dpo.init={sft_export}", *ONE_STEP), set(), {}),
    "dpo_lora_gpu": (("dpo.init={sft_export}",), set(), {}),
    "dpo_authors_release_gpu": ((), set(), {}),
    "eval_benchmarks_gpu": (("eval.model_path={sft_export}",), set(), {}),
}
REHEARSED_ABOVE = {"sft_gpu", "dpo_gpu", "eval_gpu", "sft_authors_multi_image_gpu"}
CPU_RECIPES = {"demo_cpu", "ablation_cpu"}  # synthetic data, run whole (tests/integration/test_demo.py)


def test_every_shipped_cluster_recipe_is_rehearsed_here():
    shipped = {path.stem for path in (REPO / "recipes").glob("*.yaml")}
    assert shipped - CPU_RECIPES == REHEARSED_ABOVE | set(EVERY_OTHER_RECIPE)


@pytest.mark.parametrize("name", sorted(EVERY_OTHER_RECIPE))
def test_every_other_recipe_reports_exactly_what_its_cluster_run_would_refuse(name, sft, roots):
    overrides, refused, undrawn = EVERY_OTHER_RECIPE[name]
    sft_export = sft[0] / "export"
    rehearsal, report = rehearse(roots, f"{name}.yaml", *(o.format(sft_export=sft_export) for o in overrides))
    manifest_path = rehearsal / "shard/manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        assert {item["key"] for item in manifest["rejected"]} == refused
        assert f"refused {len(refused)}" in report
        for key in refused:
            assert f"refused {key}: " in report and "decord: cannot open video" in report
    for stream, count in undrawn.items():
        assert f"sharded, never drawn: {count} {stream} sample(s)" in report
    if not undrawn:
        assert "never drawn" not in report
    trained = [stage for stage in ("sft", "dpo") if (rehearsal / stage / "metrics.jsonl").is_file()]
    for stage in trained:  # nothing more refused or cut once training reads the shards
        history = read_metrics(rehearsal / stage / "metrics.jsonl")
        assert [m["step"] for m in history] == list(range(1, len(history) + 1)) and 0 < len(history) <= 3, stage
        assert all(m["loader_skipped"] == 0 and m["truncated"] == 0 for m in history), stage
        assert all(m["kernel_fallbacks/attention"] == 0 for m in history)
    results_path = rehearsal / "eval/results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        for benchmark, scores in results["benchmarks"].items():
            overall = scores["overall"]
            assert overall["failed"] == 0 and overall["asked"] == overall["questions"] > 0, benchmark
        assert set(results["benchmarks"]) == {"mvbench", "videomme", "videomme_subtitles", "msvd_qa", "msrvtt_qa",
                                              "activitynet_qa", "vcg"}
    assert trained or results_path.is_file()
