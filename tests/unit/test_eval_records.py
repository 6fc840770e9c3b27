"""Eval question files: every malformed record is named by file, index and reason; the eval
recipe section is checked before anything runs."""

import json

import pytest

from pipeline.benchmarks.question_files import read_task
from pipeline.data.records import RecordError
from pipeline.recipe import RecipeError, parse_recipe, validate
from stages.eval import inputs

pytestmark = pytest.mark.unit


@pytest.fixture
def media(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(b"not decoded here")
    (tmp_path / "b.jpg").write_bytes(b"not decoded here")
    (tmp_path / "c.jpg").write_bytes(b"not decoded here")
    return tmp_path


def write(path, records):
    path.write_text(json.dumps(records))
    return path


GOOD = {"video": "clips/a.mp4", "question": "Which way?", "options": ["left", "right", "up", "down"], "answer": "B"}


def test_good_records_resolve_answers_by_letter_or_text(media):
    records = [GOOD, {"image": "b.jpg", "question": "Colour?", "candidates": ["red", "blue"], "answer": "blue"},
               {"image": ["b.jpg", "c.jpg"], "question": "Which image?", "options": ["1", "2"], "answer": "A"}]
    task = read_task(write(media / "mc.json", records), "multiple_choice")
    assert task.name == "mc"
    assert [item.answer for item in task.items] == [1, 1, 0]
    assert [item.question.modality for item in task.items] == ["video", "image", "multi_image"]
    assert task.items[0].question.media == ((media / "clips" / "a.mp4").resolve(),)
    assert len(read_task(media / "mc.json", "multiple_choice", limit=2).items) == 2


@pytest.mark.parametrize("change, reason", [
    ({"answer": "E"}, "neither a letter A-D nor the text of an option"),
    ({"answer": "sideways"}, "neither a letter"),
    ({"options": ["left"]}, "'options' must be a list of 2 to 26 non-empty strings"),
    ({"options": ["left", "left"]}, "duplicate options"),
    ({"candidates": ["a", "b"]}, "exactly one of 'options' or 'candidates'"),
    ({"question": ""}, "'question' must be a non-empty string"),
    ({"video": "clips/missing.mp4"}, "media file 'clips/missing.mp4' not found"),
    ({"video": "../outside.mp4"}, "must be relative to the media root"),
    ({"image": "b.jpg"}, "exactly one of 'video' or 'image'"),
    ({"options": ["B", "A"], "answer": "A"}, "ambiguous"),
])
def test_a_malformed_record_names_file_index_and_reason(media, change, reason):
    path = write(media / "mc.json", [GOOD, {**GOOD, **change}])
    with pytest.raises(RecordError) as caught:
        read_task(path, "multiple_choice")
    assert caught.value.file == str(path)
    assert caught.value.location == "record 1"
    assert reason in caught.value.reason


def test_open_ended_records_need_no_options(media):
    path = write(media / "open.json", [{"video": "clips/a.mp4", "question": "Describe it."},
                                       {"image": "b.jpg", "question": "What is it?", "answer": "A ball."}])
    task = read_task(path, "open_ended")
    assert [item.answer for item in task.items] == [None, "A ball."]
    with pytest.raises(RecordError, match="record 0: 'answer' must be a string"):
        read_task(write(media / "bad.json", [{"video": "clips/a.mp4", "question": "Q", "answer": 3}]), "open_ended")


def test_not_a_list_of_records(media):
    (media / "broken.json").write_text("{ not json")
    with pytest.raises(RecordError, match="broken.json, line 1: not valid JSON"):
        read_task(media / "broken.json", "multiple_choice")


def eval_recipe(tmp_path, **section):
    return parse_recipe({"name": "e", "run_dir": str(tmp_path / "run"), "eval": section}, source="r.yaml")


def test_eval_section_is_checked_before_anything_runs(media, tmp_path):
    questions = str(write(media / "mc.json", [GOOD]))
    validate(eval_recipe(tmp_path, model_path=str(media), multiple_choice=[questions]))
    with pytest.raises(RecipeError, match="eval.model_path: not set, and there is no export section"):
        validate(eval_recipe(tmp_path, multiple_choice=[questions]))
    with pytest.raises(RecipeError, match="at least one question file"):
        validate(eval_recipe(tmp_path, model_path=str(media)))
    with pytest.raises(RecipeError, match=r"eval.video_kernel: expected three positive integers"):
        validate(eval_recipe(tmp_path, model_path=str(media), multiple_choice=[questions], video_kernel=[4, 3]))
    with pytest.raises(RecipeError, match=r"eval.multiple_choice\[0\]: .*nope.json does not exist"):
        validate(eval_recipe(tmp_path, model_path=str(media), multiple_choice=[str(media / "nope.json")]))


def test_changed_questions_change_the_fingerprint_inputs(media, tmp_path):
    (media / "config.json").write_text("{}")  # inputs() only lists the model directory's files
    questions = write(media / "mc.json", [GOOD])
    recipe = eval_recipe(tmp_path, model_path=str(media), multiple_choice=[str(questions)])
    before = inputs(recipe, 1)
    write(questions, [{**GOOD, "answer": "C"}])
    after = inputs(recipe, 1)
    assert before["files_sha256"] != after["files_sha256"]
    assert before["eval"] == after["eval"]
