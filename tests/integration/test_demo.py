"""`python -m pipeline run recipes/demo_cpu.yaml`: synth -> shard -> sft -> dpo -> export -> eval end
to end on CPU, the files it leaves, a loss that falls, every modality's held-out questions
answered well above chance (and above the starting model), `chat` naming the right option on
held-out videos, and a second run that trains nothing.

The demo trains for 600 steps; the test trains the same recipe for STEPS of them (about 96 %
against 26 % untrained, measured; the assertions ask for much less)."""

import json
from pathlib import Path

import pytest

from conftest import run_pipeline
from pipeline.data.synthetic import EVAL_CHANCE, EVAL_FILES
from pipeline.metrics import read_metrics
from pipeline.recipe import load_recipe

pytestmark = pytest.mark.integration

DEMO = "recipes/demo_cpu.yaml"
STEPS = 300
SAVE_EVERY = 40
SHORTER = (f"sft.max_steps={STEPS}", f"sft.save_every={SAVE_EVERY}", "sft.keep_last=2", "sft.log_every=10")
KEPT = STEPS // SAVE_EVERY * SAVE_EVERY   # keep_last 2: this checkpoint and the final one
MARGIN = 0.4                              # over chance, on every modality (the demo reaches ~0.75)
QUESTIONS = 3 * 64


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    result = run_pipeline("run", DEMO, f"run_dir={run_dir}", *SHORTER, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    return run_dir, result


def relative_files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_the_demo_leaves_the_expected_files(demo):
    run_dir, _ = demo
    steps = STEPS
    files = relative_files(run_dir)
    expected = {
        "recipe.yaml", "synth/COMPLETE", "synth/video_qa.json", "synth/cards/synthetic_video.yaml",
        "synth/cards/synthetic_image.yaml", "synth/cards/synthetic_multi_image.yaml",
        "shard/COMPLETE", "shard/manifest.json",
        "sft/COMPLETE", "sft/metrics.jsonl",
        "sft/model/config.json", "sft/model/tokenizer.json", "sft/model/clip_tokenizer/tokenizer.json",
        "sft/checkpoints/latest", f"sft/checkpoints/step_{steps}/trainer_state.json",
        f"sft/checkpoints/step_{steps}/recipe.yaml", f"sft/checkpoints/step_{steps}/rank_00000.pt",
        f"sft/checkpoints/step_{steps}/training_state/index.json",
        f"sft/checkpoints/step_{steps}/training_state/part_00000.pt",
        f"sft/checkpoints/step_{KEPT}/trainer_state.json",
        "synth/model/config.json", "synth/model/model.safetensors", "synth/model/clip_tokenizer/tokenizer.json",
        "dpo/COMPLETE", "dpo/metrics.jsonl", "dpo/reference_logps.json", "dpo/init/model.safetensors",
        "dpo/checkpoints/latest", "dpo/checkpoints/step_4/trainer_state.json",
        "export/COMPLETE", "export/config.json", "export/model.safetensors", "export/README.md",
        "export/generation_config.json", "export/processor_config.json", "export/clip_tokenizer/tokenizer.json",
        "eval/COMPLETE", "eval/results.json", "eval/results.md", *(f"synth/{name}" for name in EVAL_FILES.values()),
    }
    assert expected <= files, sorted(expected - files)
    assert not any(f.startswith(f"sft/checkpoints/step_{KEPT - SAVE_EVERY}/") for f in files), "keep_last 2 prunes"
    assert not any(".tmp" in f for f in files)
    assert any(f.startswith("sft/tensorboard/events.out.tfevents") for f in files)
    for modality in ("video", "image", "multi_image"):
        assert any(f.startswith(f"shard/{modality}/") and f.endswith(".tar") for f in files), modality
    assert (run_dir / "sft" / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"
    state = json.loads((run_dir / "sft/checkpoints" / f"step_{steps}" / "trainer_state.json").read_text())
    assert state["step"] == steps and state["world_size"] == 1
    resolved = load_recipe(run_dir / "recipe.yaml")
    assert resolved.run_dir == str(run_dir) and resolved.sft.global_batch_size == 16


def test_the_loss_falls_and_every_metric_is_logged(demo):
    run_dir, result = demo
    history = read_metrics(run_dir / "sft" / "metrics.jsonl")
    assert [m["step"] for m in history] == list(range(10, STEPS + 1, 10))  # log_every 10
    tenth = len(history) // 10
    first = sum(m["loss"] for m in history[:tenth]) / tenth
    last = sum(m["loss"] for m in history[-tenth:]) / tenth
    assert last < 0.7 * first, (first, last)
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "loader_skipped", "truncated",
                "nonfinite_skipped", "visual_tokens/video", "visual_tokens/image", "visual_tokens/multi_image"):
        assert key in history[-1], key
    # every call ran the CPU row's kernels (the references) within their limits
    assert (history[-1]["kernel_fallbacks/attention"], history[-1]["kernel_fallbacks/rms_norm"]) == (0, 0)
    assert history[-1]["visual_tokens/video"] == 16  # 8 frames of 6x6 patches, kernel (2,3,3) -> 4x2x2
    assert history[-1]["lr"] < history[len(history) // 2]["lr"] < history[0]["lr"]  # cosine decay after the warmup
    assert f"run demo_cpu finished: {run_dir}" in result.stdout
    assert f" -> {history[-1]['loss']:.4f}, checkpoint" in result.stdout  # the summary: first step's loss -> last
    # the run ends with the eval table and the export's path
    assert "| task | kind | questions | accuracy | untrained |" in result.stdout
    assert f"| **overall** | multiple choice | {QUESTIONS} |" in result.stdout
    assert f"export {run_dir / 'export'}" in result.stdout
    dpo = read_metrics(run_dir / "dpo" / "metrics.jsonl")
    assert [m["step"] for m in dpo] == [1, 2, 3, 4] and all("rewards/margins" in m for m in dpo)


def test_every_modality_is_learned_far_above_chance_and_the_untrained_model(demo):
    """64 held-out questions per modality, four options each (chance 25 %): the model SFT started
    from (pretrained CLIP, random LLM) sits near chance, the trained one far above it on each."""
    run_dir, _ = demo
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["overall"]["questions"] == QUESTIONS
    for name in (Path(file).stem for file in EVAL_FILES.values()):
        task = results["multiple_choice"][name]
        assert task["questions"] == 64, name
        assert task["accuracy"] >= EVAL_CHANCE + MARGIN, (name, task)
        assert task["accuracy"] >= task["untrained_accuracy"] + MARGIN - 0.1, (name, task)
    assert abs(results["overall"]["untrained_accuracy"] - EVAL_CHANCE) < 0.1, results["overall"]


def test_chat_names_the_right_colour_on_held_out_videos(demo):
    """The exported model, through `pipeline chat`, on the first held-out videos: the answer must
    name the right option's colour (and no other option's)."""
    run_dir, _ = demo
    export = run_dir / "export"
    for item in json.loads((run_dir / "synth" / EVAL_FILES["video"]).read_text())[:3]:
        colours = [option.rstrip(".").split()[-1] for option in item["options"]]
        right = colours["ABCD".index(item["answer"])]
        chat = run_pipeline("chat", str(export), "--video", str(run_dir / "synth" / "media" / item["video"]),
                            "--backend", "cpu", item["question"], timeout=300)
        assert chat.returncode == 0, chat.stderr[-3000:]
        named = [colour for colour in colours if colour in chat.stdout.split(".")[0].split()]
        assert named == [right], (item, chat.stdout)


def test_a_second_run_skips_every_stage_and_status_reports_the_run(demo):
    run_dir, _ = demo
    metrics_before = (run_dir / "sft" / "metrics.jsonl").read_text()
    checkpoint = run_dir / "sft" / "checkpoints" / f"step_{STEPS}" / "trainer_state.json"
    stamp = checkpoint.stat().st_mtime_ns
    again = run_pipeline("run", DEMO, f"run_dir={run_dir}", *SHORTER, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    for stage in ("synth", "shard", "sft", "dpo", "export", "eval"):
        assert f"stage {stage}: skipped (complete, inputs unchanged" in again.stderr
        assert f"stage {stage}: starting" not in again.stderr
    assert (run_dir / "sft" / "metrics.jsonl").read_text() == metrics_before
    assert checkpoint.stat().st_mtime_ns == stamp

    status = run_pipeline("status", str(run_dir), timeout=60)
    assert status.returncode == 0
    assert "sft    complete" in status.stdout and f"latest checkpoint: step_{STEPS} (kept: step_{KEPT}, step_{STEPS})" in status.stdout
    assert f'"step": {STEPS}' in status.stdout


def test_a_changed_training_key_reruns_sft_and_the_stages_after_it_and_keeps_the_old_outputs(demo):
    run_dir, _ = demo
    changed = run_pipeline("run", DEMO, f"run_dir={run_dir}", *SHORTER[1:3], "sft.max_steps=3", "sft.log_every=1",
                           timeout=300)
    assert changed.returncode == 0, changed.stderr[-4000:]
    assert "stage synth: skipped" in changed.stderr and "stage shard: skipped" in changed.stderr
    for stage in ("sft", "dpo", "export", "eval"):
        assert f"stage {stage}: starting" in changed.stderr, stage
    kept = [p for p in run_dir.iterdir() if p.name.startswith("sft.replaced-")]
    assert len(kept) == 1 and (kept[0] / "checkpoints" / f"step_{STEPS}" / "trainer_state.json").exists()
    assert [m["step"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")] == [1, 2, 3]


def test_dry_run_builds_everything_and_runs_one_batch(tmp_path):
    run_dir = tmp_path / "run"
    result = run_pipeline("run", DEMO, f"run_dir={run_dir}", "synth.videos=8", "synth.images=4",
                          "synth.multi_images=4", "synth.clip_pretrain_steps=5", "--dry-run", timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "dry run: loss " in result.stdout
    assert not (run_dir / "sft" / "COMPLETE").exists() and not (run_dir / "sft" / "checkpoints").exists()


def test_explain_draws_the_questions_relevance_on_the_shape_it_asks_about(demo, tmp_path):
    """`explain` on the demo's model (its CLIP pretrained on the shapes): wherever the triangle or
    the circle is, the hottest patch of the map lies on the shape the question names."""
    import numpy as np
    from PIL import Image

    from pipeline.data.synthetic import RADIUS, Shape, draw_shapes, encode_mp4
    from pipeline.model.inference import Question, load_model_dir
    from pipeline.model.relevance_map import picture_size, relevance_map
    from pipeline.model.tiny_clip import patch_cover

    run_dir, _ = demo
    model = load_model_dir(run_dir / "export")
    size, patch = model.config.vision_config.image_size, model.config.vision_config.patch_size
    for corner, (tx, ty, cx, cy) in enumerate([(12, 12, 36, 36), (36, 12, 12, 36), (12, 36, 36, 12), (36, 36, 12, 12)]):
        shapes = [Shape("triangle", "red", tx, ty), Shape("circle", "blue", cx, cy)]
        video = tmp_path / f"still_{corner}.mp4"
        video.write_bytes(encode_mp4(np.stack([draw_shapes(shapes, size, RADIUS * size)] * 16), 8))
        covers = patch_cover(shapes, size, patch).reshape(2, size // patch, size // patch)
        for asked, cover in zip(("triangle", "circle"), covers):
            result = relevance_map(model, Question.from_media(f"What colour is the {asked}?", videos=[video]))
            _, row, column = result.hottest
            assert cover[row, column], (corner, asked, result.hottest)

    picture = tmp_path / "triangle.png"
    drawn = run_pipeline("explain", str(run_dir / "export"), "--video", str(tmp_path / "still_0.mp4"),
                         "What colour is the triangle?", "--out", str(picture))
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    assert "most relevant patch: frame" in drawn.stdout
    assert Image.open(picture).size == picture_size(len(result.frames), len(result.pooled))
