"""Benchmarks in the layouts they are published in: MSVD-QA's official test_qa.json (integer
video_id) with youtube_mapping.txt, MSR-VTT-QA's video<N>.mp4, the authors' derived files, and an
MVBench folder with only some of its 20 task files."""

import json

import pytest

from pipeline.benchmarks.readers import (MVBENCH_TASKS, BenchmarkError, absent_mvbench_tasks, annotation_files,
                                         read_mvbench, read_qa)
from pipeline.data.records import RecordError
from pipeline.recipe.eval_sections import BenchmarkSection

pytestmark = pytest.mark.unit


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def test_msvd_qa_official_release_maps_video_ids_to_youtube_clips(tmp_path):
    clips = tmp_path / "MSVD" / "YouTubeClips"
    clips.mkdir(parents=True)
    (clips / "-4wsuPCjDBc_5_15.avi").write_bytes(b"x")
    (tmp_path / "MSVD" / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n-7KMZQEsJW4_205_208 vid2\n")
    questions = write(tmp_path / "MSVD" / "MSVD-QA" / "test_qa.json", [
        {"answer": "dog", "id": 30933, "question": "what is playing?", "video_id": 1},
        {"answer": "man", "id": 30934, "question": "who is cooking?", "video_id": 2}])
    first, second = read_qa("msvd_qa", questions, clips)
    assert first.media == clips / "-4wsuPCjDBc_5_15.avi" and not first.missing
    assert second.media == clips / "-7KMZQEsJW4_205_208" and second.missing  # named, reported missing
    assert first.fields == {"id": 30933, "video": "-4wsuPCjDBc_5_15"} and first.key == "30933"
    entry = BenchmarkSection("msvd_qa", annotations=str(questions), videos=str(clips))
    assert annotation_files(entry) == [questions, tmp_path / "MSVD" / "youtube_mapping.txt"]  # fingerprinted too

    write(questions, [{"answer": "dog", "id": 1, "question": "what?", "video_id": 9}])
    with pytest.raises(RecordError, match="video_id 9: no vid9 in youtube_mapping.txt"):
        read_qa("msvd_qa", questions, clips)
    (tmp_path / "MSVD" / "youtube_mapping.txt").unlink()
    with pytest.raises(BenchmarkError, match="integer video_id .* youtube_mapping.txt .* is in none of"):
        read_qa("msvd_qa", questions, clips)


def test_msvd_qa_authors_derived_file_keeps_working(tmp_path):
    clips = tmp_path / "YouTubeClips"
    clips.mkdir()
    (clips / "-4wsuPCjDBc_5_15.avi").write_bytes(b"x")
    questions = write(tmp_path / "new_test_qa.json", [
        {"video_name": "-4wsuPCjDBc_5_15", "question": "what is playing?", "answer": "dog", "question_id": 0}])
    (item,) = read_qa("msvd_qa", questions, clips)
    assert item.media == clips / "-4wsuPCjDBc_5_15.avi" and item.fields["id"] == 0


def test_msrvtt_qa_names_videos_video_n(tmp_path):
    videos = tmp_path / "video"
    videos.mkdir()
    (videos / "video7010.mp4").write_bytes(b"x")
    (videos / "7011.mp4").write_bytes(b"x")  # the authors' own copies are <N>.mp4
    questions = write(tmp_path / "test_qa.json", [
        {"answer": "man", "category_id": 0, "id": 158581, "question": "who is talking?", "video_id": 7010},
        {"answer": "car", "category_id": 1, "id": 158582, "question": "what moves?", "video_id": 7011},
        {"answer": "dog", "category_id": 1, "id": 158583, "question": "what runs?", "video_id": 7012}])
    first, second, third = read_qa("msrvtt_qa", questions, videos)
    assert first.media == videos / "video7010.mp4" and second.media == videos / "7011.mp4"
    assert third.missing and third.media == videos / "video7012"
    assert [item.fields["id"] for item in (first, second, third)] == [158581, 158582, 158583]


def test_an_mvbench_folder_with_some_task_files_runs_those(tmp_path):
    for task, filename, *_ in MVBENCH_TASKS[:3]:
        write(tmp_path / "json" / filename, [{"video": "a.mp4", "question": f"{task}?", "candidates": ["x", "y"],
                                              "answer": "y", "start": 0, "end": 1}])
    asked = read_mvbench(tmp_path)
    assert [item.group for item in asked] == [task for task, *_ in MVBENCH_TASKS[:3]]
    assert absent_mvbench_tasks(tmp_path) == [task for task, *_ in MVBENCH_TASKS[3:]]
    with pytest.raises(BenchmarkError, match="holds none of MVBench's 20 task files"):
        read_mvbench(tmp_path / "elsewhere")


def test_mvbench_task_files_as_question_files_read_each_tasks_own_folder(tmp_path):
    """eval.multiple_choice over MVBench's json/*.json: bare names under each task's folder, one
    media root (MVBench/video) for all tasks, Episodic Reasoning's frame folders at 3 fps."""
    from PIL import Image

    from pipeline.benchmarks.question_files import read_task

    mvbench = tmp_path / "mvbench"
    clip = mvbench / "video" / "star" / "Charades_v1_480" / "56551.mp4"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"x")
    frames = mvbench / "video" / "tvqa" / "frames_fps3_hq" / "castle_s01e01_seg02_clip_00"
    frames.mkdir(parents=True)
    for number in range(1, 10):
        Image.new("RGB", (4, 4)).save(frames / f"{number:05d}.jpg")
    sequence = write(mvbench / "json" / "action_sequence.json", [
        {"video": "56551.mp4", "question": "What did the person do first?", "candidates": ["Sat.", "Ran."],
         "answer": "Ran.", "start": 1.0, "end": 2.5}])
    episodic = write(mvbench / "json" / "episodic_reasoning.json", [
        {"video": "castle_s01e01_seg02_clip_00", "question": "Why?", "candidates": ["A", "B"], "answer": "A",
         "start": 0.5, "end": 2.0}])
    for media_root in (str(mvbench / "video"), None):
        (item,) = read_task(sequence, "multiple_choice", media_root).items
        assert item.question.media == (clip,) and item.question.bounds == [1.0, 2.5]
        (item,) = read_task(episodic, "multiple_choice", media_root).items
        assert item.question.media == (frames,) and item.question.folder_fps == 3.0
    other = write(tmp_path / "mine" / "questions.json", [
        {"video": "56551.mp4", "question": "q?", "candidates": ["a", "b"], "answer": "a"}])
    with pytest.raises(RecordError, match="media file '56551.mp4' not found under"):
        read_task(other, "multiple_choice")  # not MVBench's: the file's folder, as before
