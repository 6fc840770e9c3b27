"""The paper's benchmarks end to end on smoke data in their published layouts (made here from
synthetic videos): MVBench (20 task files, clip bounds, a frame-folder task), VideoMME (parquet,
subtitles, 32 / 64 frames by duration, a missing video), MSVD-QA and ActivityNet-QA (questions and
answers apart, frame folders), VCG (generic, temporal, consistency), through the eval stage and a
tiny model directory: prompts as the authors write them, answers read from the generations,
tables and the files GPT-assisted scoring reads."""

import json
import shutil

import pytest
from PIL import Image

import backends
from backends import DistributedContext
from benchmark_layout import write_benchmarks
from conftest import run_pipeline, write_recipe
from pipeline.benchmarks.prompts import (LETTERS, lenient_mvbench_letter, mvbench_check_ans, mvbench_prompt, qa_prompt,
                                         vcg_prompt, videomme_letter, videomme_prompt)
from pipeline.benchmarks.readers import MVBENCH_TASKS, read_mvbench, read_videomme
from pipeline.benchmarks.scoring import question_of
from pipeline.model.inference import load_model_dir
from pipeline.model.relevance_map import picture_size
from pipeline.recipe import RecipeError, parse_recipe, validate
from pipeline.recipe.eval_sections import BenchmarkSection
from pipeline.runner import StageContext
from stages import eval as eval_stage

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_benchmarks(tmp_path_factory.mktemp("benchmarks"))


def context_for(world, run_dir, benchmarks) -> StageContext:
    recipe = parse_recipe({"name": "b", "run_dir": str(run_dir), "backend": "cpu",
                           "eval": {"model_path": str(world["model"]), "benchmarks": benchmarks, "relevance_maps": 1}})
    validate(recipe)
    single = DistributedContext(0, 1, 0, 1, "127.0.0.1", 29500, "single")
    context = StageContext("eval", recipe, backends.CPU, single, "test", eval_stage.inputs(recipe, 1))
    context.directory.mkdir(parents=True)
    return context


def answers(out, name) -> list[dict]:
    return [json.loads(line) for line in (out / f"{name}.answers.jsonl").read_text().splitlines()]


def test_every_benchmark_end_to_end_on_smoke_data(world, tmp_path):
    context = context_for(world, tmp_path / "run", world["benchmarks"])
    summary = eval_stage.run(context)
    out = context.directory
    results = json.loads((out / "results.json").read_text())["benchmarks"]

    # MVBench: every task asked with the authors' prompt; the answer read from the generation
    mvbench = answers(out, "mvbench")
    assert [line["group"] for line in mvbench] == [task for task, *_ in MVBENCH_TASKS]
    for line in mvbench:
        assert "failed" not in line, line
        assert line["prompt"] == mvbench_prompt(line["question"], line["options"]).text
        option = line["options"][LETTERS.index(line["answer"])]
        assert line["correct"] == mvbench_check_ans(line["generated"], line["answer"], option) and line["frames"] == 8
        assert line["prediction"] == "(" + line["generated"]  # the authors' prediction string
        assert line["lenient_letter"] == lenient_mvbench_letter(line["generated"], len(line["options"]))
    assert len(results["mvbench"]["groups"]) == 20 and results["mvbench"]["overall"]["questions"] == 20
    correct = sum(line["correct"] for line in mvbench)
    overall = results["mvbench"]["overall"]
    assert overall["mean_group_accuracy"] == pytest.approx(correct / 20)
    assert overall["empty"] == sum(not line["generated"] for line in mvbench)
    assert overall["lenient_mean_group_accuracy"] == pytest.approx(sum(line["lenient_correct"] for line in mvbench) / 20)
    assert summary["mvbench"] == f"{100 * correct / 20:.1f} % (20 of 20 answered)"

    # VideoMME: 32 frames for short videos, 64 for medium and long; subtitles at the sampled frames
    # first; the missing video counted as failed, not dropped
    videomme = {line["videoID"]: line for line in answers(out, "videomme_subtitles")}
    assert [videomme[f"vid{i}"]["frames"] for i in range(4)] == [32, 64, 64, 32]
    row = world["rows"][0]
    assert videomme["vid0"]["prompt"] == videomme_prompt(row["question"], row["options"],
                                                         "The circle moves. It stops.").text
    assert videomme["vid1"]["prompt"] == videomme_prompt(world["rows"][1]["question"], row["options"]).text
    without = {line["videoID"]: line for line in answers(out, "videomme")}  # the paper's "w/o subs" column
    assert without["vid0"]["prompt"] == videomme_prompt(row["question"], row["options"]).text
    assert videomme["vid3"]["failed"].startswith("video not found") and not videomme["vid3"]["correct"]
    for line in (videomme[f"vid{i}"] for i in range(3)):
        assert line["prediction"] == videomme_letter(line["generated"])
    for label in ("videomme", "videomme_subtitles"):
        overall = results[label]["overall"]
        assert overall["questions"] == 4 and overall["failed"] == 1 and results[label]["frames"] == [32, 64]
        assert overall["failure_reasons"] == {"video not found": 1} and overall["asked"] == 3
        assert overall["accuracy"] == pytest.approx(overall["correct"] / overall["with_letter"]
                                                    if overall["with_letter"] else 0.0)
        assert set(results[label]["groups"]) == {"short", "medium", "long"}

    # Open-ended QA: the authors' prompt, answers for GPT scoring in their fields, scorer-free figures
    msvd = answers(out, "msvd_qa")
    assert [line["prompt"] for line in msvd] == [qa_prompt("what is moving?").text] * 3
    gpt = json.loads((out / "gpt" / "msvd_qa.json").read_text())
    assert [sorted(record) for record in gpt] == [["answer", "id", "pred", "question"]] * 3
    assert [record["id"] for record in gpt] == [0, 1, 2]  # integers, as the file has them (the authors' records)
    assert {"exact_match_accuracy", "contains_accuracy"} <= set(results["msvd_qa"]["overall"])
    anet = json.loads((out / "gpt" / "activitynet_qa.json").read_text())
    assert anet[0]["answer"] == "the red circle" and anet[0]["id"] == "v_abc_1"

    # VCG: the question alone; the consistency pair asked twice of the same video
    vcg = {line["group"]: line for line in answers(out, "vcg")}
    assert vcg["generic"]["prompt"] == vcg_prompt("Describe the video.").text
    consist = json.loads((out / "gpt" / "consist.json").read_text())
    assert consist[0]["Q1"] == "What moves?" and consist[0]["Q2"] == "Which object is moving?"
    assert {"pred1", "pred2", "A", "video_name"} <= set(consist[0])
    assert [len(json.loads((out / "gpt" / name).read_text())) for name in ("general.json", "temporal.json")] == [1, 1]
    assert results["vcg"]["overall"] == {"questions": 3, "asked": 3, "failed": 0, "failure_reasons": {}}

    # the first question of each benchmark: its relevance map
    for name in ("mvbench", "videomme", "videomme_subtitles", "msvd_qa", "activitynet_qa", "vcg"):
        first = answers(out, name)[0]
        assert Image.open(out / first["relevance_map"]).size == picture_size(first["frames"], first["frames"] // 2)
        assert all("relevance_map" not in line for line in answers(out, name)[1:])

    table = (out / "results.md").read_text()
    assert "**mean of tasks**" in table and "| long |" in table and "gpt/msvd_qa.json" in table
    assert "accuracy (authors') | lenient |" in table
    assert not (out / "partial").exists()  # the answers logged as they came are gone once results.json is


def test_a_benchmark_with_no_videos_does_not_stop_the_others_and_a_rerun_asks_only_the_rest(world, tmp_path):
    """MSVD-QA whose every video is missing beside MVBench: the stage writes both results, the QA
    benchmark with 0 answered and its failures by reason. A run stopped after MVBench's first
    answers are logged asks only the others the next time."""
    empty = tmp_path / "no_videos"
    empty.mkdir()
    msvd = {**world["benchmarks"][3], "videos": str(empty)}
    mvbench = world["benchmarks"][0]
    context = context_for(world, tmp_path / "run", [mvbench, msvd])
    recipe = {"name": "b", "run_dir": str(tmp_path / "run"), "backend": "cpu",
              "eval": {"model_path": str(world["model"]), "benchmarks": [mvbench, msvd], "relevance_maps": 1}}
    result = run_pipeline("run", str(write_recipe(tmp_path / "eval.yaml", recipe)), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((context.directory / "COMPLETE").read_text())["summary"]
    results = json.loads((context.directory / "results.json").read_text())["benchmarks"]
    assert results["msvd_qa"]["overall"]["asked"] == 0 and results["msvd_qa"]["overall"]["failed"] == 3
    assert results["msvd_qa"]["overall"]["failure_reasons"] == {"video not found": 3}
    assert summary["msvd_qa"] == "0 of 3 answered" and summary["mvbench"].endswith("(20 of 20 answered)")
    assert "| answers | 3 | 0 |" in (context.directory / "results.md").read_text()
    full = answers(context.directory, "mvbench")

    # the same stage stopped after 5 answers were logged: the next run asks the other 15 only
    resumed = context_for(world, tmp_path / "resumed", [mvbench])
    folder = resumed.directory / "partial"
    folder.mkdir()
    (folder / "FINGERPRINT").write_text(resumed.fingerprint)
    logged = [{**line, "generated": "logged earlier"} for line in full[:5]]
    (folder / "mvbench.rank_00000.jsonl").write_text("".join(json.dumps(line) + "\n" for line in logged) + '{"cut')
    asked = []
    generate_batch = eval_stage.InferenceModel.generate_batch

    def counting(self, questions, max_new_tokens=64):
        asked.extend(questions)
        return generate_batch(self, questions, max_new_tokens)

    eval_stage.InferenceModel.generate_batch = counting
    try:
        eval_stage.run(resumed)
    finally:
        eval_stage.InferenceModel.generate_batch = generate_batch
    again = answers(resumed.directory, "mvbench")
    assert len(asked) == 15 and [line["key"] for line in again] == [line["key"] for line in full]
    assert [line["generated"] for line in again[:5]] == ["logged earlier"] * 5 and again[5:] == full[5:]

    # answers logged under another fingerprint (other settings) are not used
    other = context_for(world, tmp_path / "other", [mvbench])
    (other.directory / "partial").mkdir()
    (other.directory / "partial" / "FINGERPRINT").write_text("not this one")
    (other.directory / "partial" / "mvbench.rank_00000.jsonl").write_text(json.dumps(logged[0]) + "\n")
    eval_stage.run(other)
    assert answers(other.directory, "mvbench") == full


def test_a_malformed_record_names_its_file_and_index_before_the_model_loads(world, tmp_path):
    broken = tmp_path / "MVBench"
    shutil.copytree(world["benchmarks"][0]["root"], broken)
    records = json.loads((broken / "json" / "object_shuffle.json").read_text())
    records[0]["answer"] = "purple"
    (broken / "json" / "object_shuffle.json").write_text(json.dumps(records))
    context = context_for(world, tmp_path / "run", [{"name": "mvbench", "root": str(broken)}])
    with pytest.raises(RecipeError, match=r"object_shuffle.json, record 0: answer 'purple' is not one of"):
        eval_stage.run(context)
    with pytest.raises(RecipeError, match=r"eval.benchmarks\[0\].videos: msvd_qa needs it"):
        validate(parse_recipe({"name": "b", "run_dir": str(tmp_path), "eval": {
            "benchmarks": [{"name": "msvd_qa", "annotations": world["benchmarks"][3]["annotations"]}]}}))


def test_batched_generation_answers_as_one_question_at_a_time(world):
    """Questions of different lengths, frame counts (VideoMME's 32 and 64) and answer prefixes in
    one left-padded batch: the same answers as asked one by one."""
    model = load_model_dir(world["model"])
    entry = BenchmarkSection("videomme", root=world["benchmarks"][1]["root"], subtitles=True, max_new_tokens=12)
    items = [item for item in read_videomme(entry.root) if not item.missing]
    mvbench = BenchmarkSection("mvbench", root=world["benchmarks"][0]["root"])
    questions = [question_of(model, item, entry) for item in items] + [
        question_of(model, item, mvbench) for item in read_mvbench(mvbench.root)[:3]]
    assert {q.frames for q in questions} == {8, 32, 64}
    one_by_one = [model.generate(question, 12) for question in questions]
    assert model.generate_batch(questions, 12) == one_by_one


def test_an_mvbench_folder_with_some_tasks_asks_those_and_names_the_others(world, tmp_path):
    partial = tmp_path / "MVBench"
    shutil.copytree(world["benchmarks"][0]["root"], partial)
    for _, filename, *_ in MVBENCH_TASKS[2:]:
        (partial / "json" / filename).unlink()
    context = context_for(world, tmp_path / "run", [{"name": "mvbench", "root": str(partial)}])
    summary = eval_stage.run(context)
    results = json.loads((context.directory / "results.json").read_text())["benchmarks"]["mvbench"]
    assert list(results["groups"]) == [task for task, *_ in MVBENCH_TASKS[:2]]
    assert results["absent_tasks"] == [task for task, *_ in MVBENCH_TASKS[2:]]
    assert summary["mvbench"].endswith("(2 of 2 answered)")
    assert "18 of the 20 tasks not asked" in (context.directory / "results.md").read_text()


def test_benchmark_frames_are_the_authors_whatever_the_model_directory_says(world):
    """The model directory samples segment middles; a benchmark question reads the frames of the
    authors' eval arithmetic unless its entry says segments."""
    import torch

    from pipeline.data.media import frame_positions, read_video
    from ppllava.processing import frames_to_pixels

    model = load_model_dir(world["model"])
    assert model.processor.settings.frame_scheme == "segments"
    item = next(item for item in read_videomme(world["benchmarks"][1]["root"]) if not item.missing)
    data, key, decoder = item.media.read_bytes(), str(item.media), model.processor.video_decoder
    size = model.config.vision_config.image_size
    for scheme in ("authors", "segments"):
        entry = BenchmarkSection("videomme", root=world["benchmarks"][1]["root"], num_frames=8, frame_sampling=scheme)
        pixels, _ = model.pixels(question_of(model, item, entry))
        expected = frames_to_pixels(list(read_video(data, 8, False, key, video_decoder=decoder, scheme=scheme)), size)
        assert torch.equal(pixels, expected), scheme
    assert frame_positions(data, 8, False, key, video_decoder=decoder, scheme="authors") != \
        frame_positions(data, 8, False, key, video_decoder=decoder, scheme="segments")
