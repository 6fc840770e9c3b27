"""The paper's benchmarks in their published layouts, written here from synthetic videos (nothing
downloaded): a few records of MVBench (all 20 task files, clip bounds, a frame-folder task),
VideoMME (parquet, subtitles, three durations, a missing video), MSVD-QA and ActivityNet-QA
(questions and answers apart, frame folders) and VCG (generic, temporal, consistency), beside a
tiny model directory. Used by tests/integration/test_benchmarks.py and tests/dist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

from pipeline.benchmarks.readers import MVBENCH_TASKS
from pipeline.data.media import PyAVDecoder
from pipeline.data.synthetic import SynthSettings, generate
from conftest import tiny_model_directory

OPTIONS = ["red", "green", "blue", "yellow"]
SRT = ('1\n00:00:00,000 --> 00:00:01,000\n<font color="white" size=".72c">The circle moves.</font>\n\n'
       '2\n00:00:01,000 --> 00:00:30,000\n<font color="white" size=".72c">It stops.</font>\n')


def frame_folder(video, folder, count: int = 12) -> None:
    """A video as a folder of numbered JPEG frames (MVBench's and ActivityNet's layout)."""
    data = video.read_bytes()
    frames = PyAVDecoder().read(data, list(range(min(count, PyAVDecoder().frame_count(data, str(video))))), str(video))
    folder.mkdir(parents=True)
    for index, frame in enumerate(frames, start=1):
        Image.fromarray(frame).save(folder / f"{index:05d}.jpg")


def write_benchmarks(root: Path) -> dict:
    """Every benchmark's smoke data under ``root`` and a tiny model directory; the recipe entries
    (eval.benchmarks) that read them, VideoMME's rows, the model's path."""
    generate(root / "synth", SynthSettings(seed=4, videos=3, images=0, multi_images=0, eval_questions=0, dpo_pairs=0,
                                           size=48, frames=16))
    videos = sorted((root / "synth" / "media" / "videos").glob("*.mp4"))

    mvbench = root / "MVBench"
    for index, (task, filename, folder, kind, bounded) in enumerate(MVBENCH_TASKS):
        record = {"video": f"clip_{index}" if kind == "frames" else f"clip_{index}.mp4",
                  "question": f"Which colour is shape {index}?", "candidates": OPTIONS[: 2 + index % 3],
                  "answer": OPTIONS[index % 2]}
        if bounded:
            record.update(start=0.2, end=1.6)
        target = mvbench / "video" / folder / record["video"]
        if kind == "frames":
            frame_folder(videos[0], target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(videos[index % len(videos)], target)
        (mvbench / "json").mkdir(parents=True, exist_ok=True)
        (mvbench / "json" / filename).write_text(json.dumps([record]))

    videomme = root / "Video-MME"
    rows = [{"video_id": f"00{i}", "duration": duration, "domain": "Knowledge", "sub_category": "Humanity",
             "videoID": f"vid{i}", "question_id": f"00{i}-1", "task_type": "Counting Problem",
             "question": f"How many shapes move in video {i}?", "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."],
             "answer": "BCDA"[i]} for i, duration in enumerate(["short", "medium", "long", "short"])]
    (videomme / "data").mkdir(parents=True)
    (videomme / "subtitle").mkdir()
    for i in range(3):  # vid3 has no video: counted as failed
        shutil.copy(videos[i], videomme / "data" / f"vid{i}.mp4")
    (videomme / "subtitle" / "vid0.srt").write_text(SRT)
    (videomme / "videomme").mkdir()
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), videomme / "videomme" / "test-00000-of-00001.parquet")

    qa = root / "qa"
    (qa / "msvd").mkdir(parents=True)
    for i, video in enumerate(videos):
        shutil.copy(video, qa / "msvd" / f"vid{i}.avi.mp4")
    (qa / "msvd_test_qa.json").write_text(json.dumps(
        [{"video_name": f"vid{i}.avi", "question": "what is moving?", "answer": "circle", "question_id": i}
         for i in range(3)]))
    frame_folder(videos[1], qa / "anet" / "v_abc")
    (qa / "test_q.json").write_text(json.dumps([{"video_name": "abc", "question_id": "v_abc_1",
                                                  "question": "what moves first?"}]))
    (qa / "test_a.json").write_text(json.dumps([{"answer": "the red circle", "type": 0, "question_id": "v_abc_1"}]))

    vcg = root / "vcg"
    (vcg / "Test_Videos").mkdir(parents=True)
    shutil.copy(videos[2], vcg / "Test_Videos" / "v_vcg.mkv.mp4")
    (vcg / "Benchmarking_QA").mkdir()
    (vcg / "Benchmarking_QA" / "generic_qa.json").write_text(json.dumps(
        [{"Q": "Describe the video.", "A": "Shapes move.", "video_name": "v_vcg.mkv"}]))
    (vcg / "Benchmarking_QA" / "temporal_qa.json").write_text(json.dumps(
        [{"Q": "What happens first?", "A": "A circle moves.", "video_name": "v_vcg.mkv"}]))
    (vcg / "Benchmarking_QA" / "consistency_qa.json").write_text(json.dumps(
        [{"Q1": "What moves?", "Q2": "Which object is moving?", "A": "A circle.", "video_name": "v_vcg.mkv"}]))

    model_dir = tiny_model_directory(root / "model")
    benchmarks = [
        {"name": "mvbench", "root": str(mvbench), "max_new_tokens": 4},
        {"name": "videomme", "root": str(videomme), "max_new_tokens": 4},
        {"name": "videomme", "root": str(videomme), "subtitles": True, "max_new_tokens": 4},
        {"name": "msvd_qa", "annotations": str(qa / "msvd_test_qa.json"), "videos": str(qa / "msvd"),
         "max_new_tokens": 4},
        {"name": "activitynet_qa", "annotations": str(qa / "test_q.json"), "answers": str(qa / "test_a.json"),
         "videos": str(qa / "anet"), "max_new_tokens": 4},
        {"name": "vcg", "root": str(vcg / "Benchmarking_QA"), "videos": str(vcg / "Test_Videos"), "max_new_tokens": 4},
    ]
    return {"root": root, "model": model_dir, "benchmarks": benchmarks, "rows": rows}
