"""Eval stage and chat command on a tiny model directory (save_pretrained + tokenizers +
processor_config.json, the export layout) and real synthetic videos and images."""

import json

import pytest
import torch

import backends
from backends import DistributedContext
from pipeline.__main__ import main
from pipeline.data.collate import ProcessorSettings, SampleProcessor
from pipeline.data.records import RecordError, Sample, Turn
from pipeline.data.synthetic import SynthSettings, generate
from pipeline.model.inference import InferenceError, Question, load_model_dir
from pipeline.recipe import RecipeError, parse_recipe, validate
from pipeline.runner import StageContext
from ppllava import VIDEO
from ppllava.processing import visual_token_count
from stages import eval as eval_stage
from conftest import run_pipeline, tiny_model_directory, write_recipe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic media and questions, a tiny model directory, an open-ended file."""
    root = tmp_path_factory.mktemp("eval")
    generate(root / "synth", SynthSettings(seed=3, videos=5, images=2, multi_images=0, eval_questions=5, dpo_pairs=0,
                                           size=48, frames=8))
    model_dir = tiny_model_directory(root / "model")
    questions = json.loads((root / "synth" / "eval_video.json").read_text())
    open_ended = [{"video": q["video"], "question": q["question"], "answer": q["options"][0]}
                  for q in questions[:3]] + [{"image": "images/image_0000.jpg", "question": "What colour is the circle?"}]
    (root / "open_qa.json").write_text(json.dumps(open_ended))
    return {"root": root, "model": model_dir, "media": root / "synth" / "media", "questions": questions,
            "mc": root / "synth" / "eval_video.json", "open": root / "open_qa.json"}


def eval_context(world, run_dir, **section) -> StageContext:
    recipe = parse_recipe({"name": "e", "run_dir": str(run_dir), "backend": "cpu",
                           "eval": {"model_path": str(world["model"]), "media_root": str(world["media"]), **section}})
    validate(recipe)
    single = DistributedContext(0, 1, 0, 1, "127.0.0.1", 29500, "single")
    context = StageContext("eval", recipe, backends.CPU, single, "test", eval_stage.inputs(recipe, 1))
    context.directory.mkdir(parents=True)
    return context


def reference_loglikelihood(model, question, video, option) -> float:
    """log p(option | video, question) through the training data path and a plain forward."""
    processor = SampleProcessor(model.config, model.tokenizer, model.clip_tokenizer,
                                ProcessorSettings(training=False))
    sample = Sample("ref", "video", [str(video)], [Turn("user", f"<image>\n{question}"), Turn("assistant", option)])
    batch = processor.collate([processor(sample, [video.read_bytes()])]).inputs
    labels = batch.pop("labels")[0]
    with torch.no_grad():
        logprobs = model.model(**batch).logits[0].float().log_softmax(-1)
    scored = [i for i in range(1, len(labels)) if labels[i] != -100]
    return sum(float(logprobs[i - 1, labels[i]]) for i in scored) / len(scored)


def test_eval_stage_scores_every_question_by_likelihood(world, tmp_path, capsys):
    # prompt: plain (the question alone, each option's text the answer), so that the training data
    # path below computes the same likelihoods independently; the mvbench prompt is the next test's.
    context = eval_context(world, tmp_path / "run", multiple_choice=[str(world["mc"])], open_ended=[str(world["open"])],
                           max_new_tokens=6, prompt="plain")
    summary = eval_stage.run(context)
    out = context.directory
    results = json.loads((out / "results.json").read_text())
    task = results["multiple_choice"]["eval_video"]
    assert task["questions"] == len(world["questions"]) == 5
    assert 0 <= task["accuracy"] <= 1 and 0 <= task["accuracy_by_sum"] <= 1
    assert results["overall"]["questions"] == 5 and summary["questions"] == 5
    assert results["open_ended"]["open_qa"]["questions"] == 4
    assert "| eval_video | multiple choice | 5 |" in (out / "results.md").read_text()
    assert "| eval_video | multiple choice | 5 |" in capsys.readouterr().out

    # The prediction is the argmax of log-likelihoods computed independently, for every question.
    choices = [json.loads(line) for line in (out / "eval_video.choices.jsonl").read_text().splitlines()]
    assert len(choices) == 5
    model = load_model_dir(world["model"])
    for line, record in zip(choices, world["questions"]):
        reference = [reference_loglikelihood(model, record["question"], world["media"] / record["video"], option)
                     for option in record["options"]]
        assert line["logprob_mean"] == pytest.approx(reference, abs=1e-4)
        assert line["prediction"] == "ABCD"[max(range(4), key=reference.__getitem__)]
        assert line["correct"] == (line["prediction"] == record["answer"])

    answers = [json.loads(line) for line in (out / "open_qa.jsonl").read_text().splitlines()]
    assert [a["question"] for a in answers] == [q["question"] for q in json.loads(world["open"].read_text())]
    assert [a["reference"] for a in answers][-1] is None
    assert all(isinstance(a["prediction"], str) for a in answers)


def test_the_mvbench_prompt_scores_lettered_options_after_best_option(world, tmp_path):
    from pipeline.benchmarks.question_files import multiple_choice_prompt, read_task

    context = eval_context(world, tmp_path / "run", multiple_choice=[str(world["mc"])], limit=2)
    eval_stage.run(context)
    choices = [json.loads(line) for line in (context.directory / "eval_video.choices.jsonl").read_text().splitlines()]
    model = load_model_dir(world["model"])
    task = read_task(world["mc"], "multiple_choice", str(world["media"]), limit=2)
    for line, item in zip(choices, task.items):
        question, answers = multiple_choice_prompt(item)
        assert answers[0].startswith("A) ") and question.answer_prefix == "Best option:("
        scores = model.answer_loglikelihoods(question, answers)
        assert line["logprob_mean"] == pytest.approx([s.mean for s in scores], abs=1e-5)
        plain = model.answer_loglikelihoods(item.question, item.options)
        assert [s.mean for s in scores] != pytest.approx([s.mean for s in plain], abs=1e-3)


def test_a_malformed_record_stops_eval_before_the_model_loads(world, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([world["questions"][0], {**world["questions"][1], "answer": "F"}]))
    context = eval_context(world, tmp_path / "run", multiple_choice=[str(bad)])
    with pytest.raises(RecipeError, match=r"eval.multiple_choice\[0\]: .*bad.json, record 1: answer 'F' is neither"):
        eval_stage.run(context)


def test_frames_and_video_kernel_overrides_change_the_visual_tokens(world):
    video = world["media"] / world["questions"][0]["video"]
    question = Question.from_media("Which way does it move?", videos=[video])
    default = load_model_dir(world["model"])
    config = default.config
    for frames, kernel, expected in [(None, None, visual_token_count(config, VIDEO, 8)),              # 4x2x2 = 16
                                     (16, None, visual_token_count(config, VIDEO, 16)),               # 8x2x2 = 32
                                     (16, (4, 3, 3), visual_token_count(config, VIDEO, 16, (4, 3, 3)))]:  # 16
        model = load_model_dir(world["model"], num_frames=frames, video_kernel=kernel)
        inputs = model.prompt_inputs(question)
        assert inputs["pixel_values"].shape[0] == (frames or 8)
        assert int((inputs["input_ids"] == model.image_token).sum()) == expected
        with torch.no_grad():
            model.model(**inputs)  # the pooled tokens fill exactly the image-token slots
    assert [visual_token_count(config, VIDEO, 8), visual_token_count(config, VIDEO, 16)] == [16, 32]


def test_multi_image_question_and_clear_errors(world):
    model = load_model_dir(world["model"])
    images = [world["media"] / "images" / f"image_000{i}.jpg" for i in range(2)]
    question = Question.from_media("Which image has the circle?", images=images)
    assert question.modality == "multi_image"
    scores = model.answer_loglikelihoods(question, ["Image 1.", "Image 2.", "Neither."], batch_size=2)
    assert len(scores) == 3 and all(s.tokens > 0 and s.mean < 0 for s in scores)
    with pytest.raises(InferenceError, match="media file not found"):
        model.prompt_inputs(Question.from_media("Q", videos=[world["root"] / "missing.mp4"]))
    with pytest.raises(InferenceError, match="does not exist"):
        load_model_dir(world["root"] / "no_model")


def test_chat_streams_an_answer_about_a_video_and_an_image(world, capsys):
    video = world["media"] / world["questions"][0]["video"]
    result = run_pipeline("chat", str(world["model"]), "--video", str(video), "--frames", "16", "--video-kernel", "4",
                          "3", "3", "--max-new-tokens", "6", "--backend", "cpu", "Which way does the red circle move?",
                          timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "video: 16 frames, video kernel 4x3x3 -> 16 visual tokens" in result.stderr
    image = world["media"] / "images" / "image_0000.jpg"
    result = run_pipeline("chat", str(world["model"]), "--image", str(image), "--max-new-tokens", "6", "--backend", "cpu",
                          "What colour is the circle?", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert main(["chat", str(world["root"] / "no_model"), "--image", str(image), "--backend", "cpu", "Q"]) == 2
    assert "does not exist: expected an export" in capsys.readouterr().err
    assert main(["chat", str(world["model"]), "--video", str(world["root"] / "nope.mp4"), "Q"]) == 2
    assert "media file not found" in capsys.readouterr().err


def test_eval_runs_from_a_recipe_and_is_skipped_when_unchanged(world, tmp_path):
    recipe = write_recipe(tmp_path / "eval.yaml", {
        "name": "eval_only", "run_dir": str(tmp_path / "run"), "backend": "cpu",
        "eval": {"model_path": str(world["model"]), "multiple_choice": [str(world["mc"])],
                 "media_root": str(world["media"]), "limit": 2}})
    first = run_pipeline("run", str(recipe), timeout=300)
    assert first.returncode == 0, first.stderr
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["multiple_choice"]["eval_video"]["questions"] == 2
    assert "| eval_video | multiple choice | 2 |" in first.stdout
    second = run_pipeline("run", str(recipe), timeout=300)
    assert second.returncode == 0 and "stage eval: skipped" in second.stderr


def test_questions_on_frame_folders_and_bounded_clips(world, tmp_path):
    """MVBench's layouts: a video as a folder of {:0>5}.jpg frames, and start/end seconds of a clip."""
    from pipeline.data.media import read_video
    from pipeline.benchmarks.question_files import read_task
    from pipeline.data.synthetic import encode_jpeg

    video = world["media"] / world["questions"][0]["video"]
    folder = tmp_path / "media" / "episode_0"
    folder.mkdir(parents=True)
    for index, frame in enumerate(read_video(video.read_bytes(), 12, training=False, key="v")):
        (folder / f"{index + 1:0>5}.jpg").write_bytes(encode_jpeg(frame))
    (tmp_path / "media" / "clip.mp4").write_bytes(video.read_bytes())
    record = {"question": "Which way does the red circle move?", "options": ["left", "right"], "answer": "A"}
    questions = [{"video": "episode_0", **record}, {"video": "clip.mp4", "start": 0.2, "end": 0.8, **record},
                 {"video": "clip.mp4", **record}]
    (tmp_path / "mc.json").write_text(json.dumps(questions))
    task = read_task(tmp_path / "mc.json", "multiple_choice", str(tmp_path / "media"))
    folder_item, bounded, whole = task.items
    assert bounded.question.bounds == [0.2, 0.8] and whole.question.bounds is None
    model = load_model_dir(world["model"])
    pixels = [model.pixels(item.question)[0] for item in task.items]
    assert pixels[0].shape[0] == pixels[1].shape[0] == model.num_frames
    assert not torch.equal(pixels[1], pixels[2])  # the bounded clip's frames are other frames
    assert all(len(model.answer_loglikelihoods(item.question, item.options)) == 2 for item in task.items)
    (tmp_path / "media" / "empty").mkdir()
    (tmp_path / "bad.json").write_text(json.dumps([{"video": "empty", **record}]))
    with pytest.raises(RecordError, match="holds no .jpg"):
        read_task(tmp_path / "bad.json", "multiple_choice", str(tmp_path / "media"))
