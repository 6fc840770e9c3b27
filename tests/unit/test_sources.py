"""Annotation readers: good records, and malformed ones named by file, record and reason."""

import json

import pytest

from pipeline.data.records import RecordError, Sample
from pipeline.data.sources import read_dpo, read_llava, read_videochat2, strict

pytestmark = pytest.mark.unit


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_llava_records_of_every_modality(tmp_path):
    path = write(tmp_path, "llava.json", [
        {"id": "a", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "b", "images": ["1.jpg", "2.jpg"], "conversations": [{"from": "human", "value": "<image> <image> Same?"}, {"from": "gpt", "value": "No."}]},
        {"id": "c", "video": "v.mp4", "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Rain."},
                                                       {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "A city."}]},
        {"id": "d", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ])
    samples = list(strict(read_llava(path, dataset="set")))
    assert [(s.key, s.modality, s.media) for s in samples] == [
        ("set/a", "image", ["x.jpg"]), ("set/b", "multi_image", ["1.jpg", "2.jpg"]), ("set/c", "video", ["v.mp4"]), ("set/d", "text", [])]
    assert samples[2].turns[0].content == "<image>\nDescribe."  # placeholder added in front
    assert [t.role for t in samples[2].turns] == ["user", "assistant", "user", "assistant"]
    assert Sample.from_json(samples[1].to_json()) == samples[1]


@pytest.mark.parametrize("record,reason", [
    ({"image": "x.jpg", "video": "v.mp4", "conversations": []}, "only one of image/images/video"),
    ({"image": "x.jpg", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, "alternate"),
    ({"image": "x.jpg", "conversations": [{"from": "human", "value": "<image>"}]}, "at least one human and one gpt"),
    ({"images": ["1.jpg", "2.jpg"], "conversations": [{"from": "human", "value": "<image> two?"}, {"from": "gpt", "value": "y"}]}, "placeholders"),
    ({"image": "x.jpg", "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "y"}]}, "'value' must be a non-empty string"),
    ({"image": 3, "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "y"}]}, "must be a path"),
])
def test_malformed_llava_records_are_named(tmp_path, record, reason):
    good = {"image": "ok.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = write(tmp_path, "bad.json", [good, record])
    results = list(read_llava(path))
    assert isinstance(results[0], Sample) and isinstance(results[1], RecordError)
    assert str(path) in str(results[1]) and "record 1" in str(results[1]) and reason in str(results[1])
    with pytest.raises(RecordError, match="record 1"):
        list(strict(read_llava(path)))


def test_not_json_at_all(tmp_path):
    with pytest.raises(RecordError, match="line 1: not valid JSON"):
        list(read_llava(write(tmp_path, "broken.json", "{oops")))


def test_videochat2_qa(tmp_path):
    path = write(tmp_path, "vc2.json", [
        {"video": "clip.mp4", "QA": [{"i": "Watch carefully.", "q": "What moves?", "a": "A ball."},
                                     {"i": "", "q": "Which way?", "a": "Left."}]},
        {"image": "pic.jpg", "QA": [{"q": "Colour?", "a": "Red."}]},
        {"video": "x.mp4", "image": "y.jpg", "QA": [{"q": "?", "a": "!"}]},
        {"video": "x.mp4", "QA": []},
    ])
    results = list(read_videochat2(path, dataset="vc2"))
    first, second = results[0], results[1]
    assert first.modality == "video" and first.media == ["clip.mp4"]
    # The first QA's instruction is the system text (the authors'); the turns hold only q and a.
    assert first.system == "Watch carefully."
    assert [t.content for t in first.turns] == ["<image>\nWhat moves?", "A ball.", "Which way?", "Left."]
    assert second.modality == "image" and second.turns[0].content == "<image>\nColour?" and second.system == ""
    assert "record 2: exactly one of 'video', 'image' or 'multi-image'" in str(results[2])
    assert "record 3: 'QA' must be a non-empty list" in str(results[3])


def test_videochat2_multi_image_and_bounds(tmp_path):
    path = write(tmp_path, "m4.json", [
        {"multi-image": ["a.jpg", "b.jpg"], "QA": [{"i": "", "q": "<image>\n<image>\nSame?", "a": "No."}]},
        {"multi-image": ["a.jpg"], "QA": [{"q": "?", "a": "!"}]},
        {"video": "long.mp4", "start": 12, "end": 20.5, "QA": [{"q": "What happens?", "a": "A jump."}]},
        {"video": "long.mp4", "start": 20, "end": 10, "QA": [{"q": "?", "a": "!"}]},
    ])
    multi, single, bounded, backwards = list(read_videochat2(path, dataset="m4"))
    assert multi.modality == "multi_image" and multi.media == ["a.jpg", "b.jpg"] and multi.system == ""
    assert multi.turns[0].content == "<image>\n<image>\nSame?"
    assert "'multi-image' must be a list of at least two paths" in str(single)
    assert bounded.bounds == [12.0, 20.5] and bounded.media == ["long.mp4"]
    assert "0 <= start < end" in str(backwards)


def test_dpo_jsonl_with_line_numbers(tmp_path):
    lines = [
        json.dumps({"id": "p1", "video": "v.mp4", "prompt": "What happens?", "chosen": "A dog runs.", "rejected": "A cat sleeps."}),
        "",
        "{not json",
        json.dumps({"video": "v.mp4", "prompt": "Q", "chosen": "same", "rejected": "same"}),
        json.dumps({"video": "v.mp4", "prompt": "Q", "chosen": "x"}),
    ]
    results = list(read_dpo(write(tmp_path, "dpo.jsonl", "\n".join(lines)), dataset="hound"))
    assert results[0].key == "hound/p1" and results[0].chosen == "A dog runs."
    assert "line 3: not valid JSON" in str(results[1])
    assert "line 4: 'chosen' and 'rejected' are identical" in str(results[2])
    assert "line 5: 'rejected' must be a non-empty string" in str(results[3])
