"""Each benchmark's published layout -> ``BenchmarkQuestion``s (docs/eval.md says where each comes
from; nothing is downloaded).

    mvbench         ROOT/json/<task>.json (20 tasks: MVBENCH_TASKS; a folder with some of them
                    runs those, ``absent_mvbench_tasks`` names the others), videos under
                    ROOT/video/<task's folder>/; bounded tasks carry start/end seconds; Episodic
                    Reasoning's videos are folders of frames at 3 fps
    videomme        ROOT/videomme/*.parquet (as published; or the same rows as .json / .jsonl),
                    videos ROOT/data/<videoID>.mp4, subtitles ROOT/subtitle/<videoID>.srt
    msvd_qa,        one JSON list of {question, answer, video_name | video | video_id,
    msrvtt_qa       question_id | id} and a folder of videos. The official releases name videos by
                    an integer video_id: MSVD-QA's maps vid<N> to a YouTube clip through
                    youtube_mapping.txt (beside the questions or the videos) -> YouTubeClips/<clip>.avi;
                    MSR-VTT-QA's are video<N>.mp4 (the authors' own files: <N>.mp4, also found)
    activitynet_qa  Video-ChatGPT's test_q.json and test_a.json (matched by position), videos or
                    frame folders named v_<video_name>
    vcg             Video-ChatGPT's generic_qa.json, temporal_qa.json, consistency_qa.json
                    ({Q, A} or {Q1, Q2, A}, video_name) and its Test_Videos folder

Every record is checked before a model loads: a malformed one raises RecordError naming the file,
the record and the reason. A video that is not there does not stop the reader: the question is
kept with ``missing`` set, so the eval reports it and counts it wrong, never dropping it from the
denominator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.benchmarks.prompts import LETTERS
from pipeline.data.records import RecordError
from pipeline.data.sources import read_bounds

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".gif")
# MVBench's tasks as the authors' script defines them: (task, annotation file, video folder under
# ROOT/video, media kind, whether the records' start/end bound the clip).
MVBENCH_TASKS = (
    ("Action Sequence", "action_sequence.json", "star/Charades_v1_480", "video", True),
    ("Action Prediction", "action_prediction.json", "star/Charades_v1_480", "video", True),
    ("Action Antonym", "action_antonym.json", "ssv2_video", "video", False),
    ("Fine-grained Action", "fine_grained_action.json", "Moments_in_Time_Raw/videos", "video", False),
    ("Unexpected Action", "unexpected_action.json", "FunQA_test/test", "video", False),
    ("Object Existence", "object_existence.json", "clevrer/video_validation", "video", False),
    ("Object Interaction", "object_interaction.json", "star/Charades_v1_480", "video", True),
    ("Object Shuffle", "object_shuffle.json", "perception/videos", "video", False),
    ("Moving Direction", "moving_direction.json", "clevrer/video_validation", "video", False),
    ("Action Localization", "action_localization.json", "sta/sta_video", "video", True),
    ("Scene Transition", "scene_transition.json", "scene_qa/video", "video", False),
    ("Action Count", "action_count.json", "perception/videos", "video", False),
    ("Moving Count", "moving_count.json", "clevrer/video_validation", "video", False),
    ("Moving Attribute", "moving_attribute.json", "clevrer/video_validation", "video", False),
    ("State Change", "state_change.json", "perception/videos", "video", False),
    ("Fine-grained Pose", "fine_grained_pose.json", "nturgbd", "video", False),
    ("Character Order", "character_order.json", "perception/videos", "video", False),
    ("Egocentric Navigation", "egocentric_navigation.json", "vlnqa", "video", False),
    ("Episodic Reasoning", "episodic_reasoning.json", "tvqa/frames_fps3_hq", "frames", True),
    ("Counterfactual Inference", "counterfactual_inference.json", "clevrer/video_validation", "video", False),
)
MVBENCH_FRAME_FPS = 3.0           # Episodic Reasoning's frame folders (TVQA frames at 3 fps)
VIDEOMME_FRAMES = {"short": 32, "medium": 64, "long": 64}   # the authors' per-duration frame counts
QA_BENCHMARKS = ("msvd_qa", "msrvtt_qa", "activitynet_qa")
VCG_TASKS = (("generic", "generic_qa.json"), ("temporal", "temporal_qa.json"), ("consistency", "consistency_qa.json"))


@dataclass
class BenchmarkQuestion:
    benchmark: str                # mvbench | videomme | msvd_qa | msrvtt_qa | activitynet_qa | vcg
    group: str                    # MVBench task, VideoMME duration, the QA dataset, VCG's task
    key: str                      # unique within the benchmark
    media: Path                   # a video file or a folder of frames
    question: str                 # as the benchmark writes it
    answer: str                   # multiple choice: the right letter; open-ended: the reference
    options: list[str] = field(default_factory=list)     # multiple choice
    bounds: list[float] | None = None                    # (start, end) seconds of the clip asked about
    frames: int | None = None                            # frames to sample (None: the eval's)
    folder_fps: float | None = None                      # a frame folder's frame rate (for bounds)
    subtitles: Path | None = None                        # VideoMME: the video's .srt, when used
    second_question: str | None = None                   # VCG consistency: the paraphrase
    fields: dict = field(default_factory=dict)           # what the answer files carry besides

    @property
    def missing(self) -> bool:
        return not self.media.exists()


class BenchmarkError(ValueError):
    """A benchmark's layout is not what its reader expects (a file or folder is not there)."""


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchmarkError(f"{path} does not exist") from None
    except json.JSONDecodeError as error:
        raise RecordError(str(path), f"line {error.lineno}", f"not valid JSON: {error.msg}") from None


def _records(path: Path) -> list:
    records = _load_json(path)
    if not isinstance(records, list) or not records:
        raise RecordError(str(path), "top level", "expected a non-empty JSON list of records")
    return records


def _text(record, key: str, file: Path, index: int) -> str:
    if not isinstance(record, dict):
        raise RecordError(str(file), f"record {index}", f"expected an object, got {type(record).__name__}")
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key in ("answer", "A"):
        value = str(value)  # numeric answers (MSVD-QA's counts, MVBench's counting tasks)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(str(file), f"record {index}", f"'{key}' must be a non-empty string, got {value!r}")
    return value.strip()


def _first_of(record: dict, keys: tuple[str, ...], file: Path, index: int) -> str:
    for key in keys:
        if record.get(key) not in (None, ""):
            return str(record[key])
    raise RecordError(str(file), f"record {index}", f"needs one of {', '.join(keys)}")


def resolve_video(directory: Path, name: str) -> Path:
    """``directory/name``, a file or a folder of frames; a name without its suffix gets the first
    of VIDEO_SUFFIXES that exists (the path as named when none does: reported missing)."""
    path = directory / name
    if path.exists():
        return path
    for suffix in VIDEO_SUFFIXES:
        if path.with_name(path.name + suffix).exists():
            return path.with_name(path.name + suffix)
    return path


def annotation_files(entry) -> list[Path]:
    """The files holding an ``eval.benchmarks`` entry's questions and answers (not its videos): what
    the eval stage's fingerprint hashes, so edited questions re-run it."""
    if entry.name == "mvbench":
        return [Path(entry.root) / "json" / filename for _, filename, *_ in _present_mvbench_tasks(Path(entry.root))]
    if entry.name == "videomme":
        return [_videomme_rows(Path(entry.root), read=False)[0]]
    if entry.name == "vcg":
        return [Path(entry.root) / filename for _, filename in VCG_TASKS]
    mapping = _mapping_file(Path(entry.annotations), Path(entry.videos)) if entry.name == "msvd_qa" else None
    return [Path(entry.annotations)] + ([Path(entry.answers)] if entry.answers else []) + ([mapping] if mapping else [])


def _present_mvbench_tasks(root: Path) -> list[tuple]:
    present = [task for task in MVBENCH_TASKS if (root / "json" / task[1]).is_file()]
    if not present:
        raise BenchmarkError(f"{root / 'json'} holds none of MVBench's {len(MVBENCH_TASKS)} task files "
                             f"({MVBENCH_TASKS[0][1]}, ...): expected MVBench's json folder")
    return present


def absent_mvbench_tasks(root: str | Path) -> list[str]:
    """The MVBench tasks whose annotation file is not in ``root``/json (their questions are not asked)."""
    return [task for task, filename, *_ in MVBENCH_TASKS if not (Path(root) / "json" / filename).is_file()]


def read_mvbench(root: str | Path, limit: int | None = None) -> list[BenchmarkQuestion]:
    """The questions of the tasks whose annotation file is there (``absent_mvbench_tasks``: the others)."""
    root, found = Path(root), []
    for task, filename, folder, kind, bounded in _present_mvbench_tasks(root):
        file = root / "json" / filename
        for index, record in enumerate(_records(file)[:limit]):
            question = _text(record, "question", file, index)
            options = record.get("candidates")
            if isinstance(options, list):  # counting tasks may write numbers
                options = [str(o) if isinstance(o, (int, float)) and not isinstance(o, bool) else o for o in options]
            if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS) or not all(
                    isinstance(o, str) for o in options):
                raise RecordError(str(file), f"record {index}", f"'candidates' must be a list of 2 to {len(LETTERS)} "
                                                                f"strings, got {options!r}")
            answer = _text(record, "answer", file, index)
            if answer not in options:
                raise RecordError(str(file), f"record {index}", f"answer {answer!r} is not one of its candidates {options}")
            video = _text(record, "video", file, index)
            found.append(BenchmarkQuestion(
                "mvbench", task, f"{task}/{index}", resolve_video(root / "video" / folder, video), question,
                LETTERS[options.index(answer)], list(options),
                bounds=read_bounds(record, str(file), f"record {index}") if bounded else None,
                folder_fps=MVBENCH_FRAME_FPS if kind == "frames" else None,
                fields={"video": video, "task": task}))
    return found


def _videomme_rows(root: Path, read: bool = True) -> tuple[Path, list[dict]]:
    folder = root / "videomme"
    files = sorted(folder.glob("*.parquet")) or sorted(folder.glob("*.json")) + sorted(folder.glob("*.jsonl"))
    if not files:
        raise BenchmarkError(f"{folder} holds no .parquet, .json or .jsonl file of VideoMME questions")
    file = files[0]
    if not read:
        return file, []
    if file.suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError:
            raise BenchmarkError(f"{file}: reading parquet needs pyarrow (pip install pyarrow, or the project's "
                                 f"[benchmarks] extra)") from None
        return file, pyarrow.parquet.read_table(file).to_pylist()
    if file.suffix == ".jsonl":
        return file, [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return file, _records(file)


def read_videomme(root: str | Path, limit: int | None = None, subtitles: bool = False) -> list[BenchmarkQuestion]:
    """``limit``: the first N questions of each duration."""
    root = Path(root)
    file, rows = _videomme_rows(root)
    found, per_duration = [], {}
    for index, row in enumerate(rows):
        duration = _text(row, "duration", file, index)
        if duration not in VIDEOMME_FRAMES:
            raise RecordError(str(file), f"record {index}", f"duration {duration!r} is not one of {list(VIDEOMME_FRAMES)}")
        per_duration[duration] = per_duration.get(duration, 0) + 1
        if limit is not None and per_duration[duration] > limit:
            continue
        options = row.get("options")
        if not isinstance(options, list) or not 2 <= len(options) <= 4 or not all(isinstance(o, str) for o in options):
            raise RecordError(str(file), f"record {index}", f"'options' must be a list of 2 to 4 strings, got {options!r}")
        answer = _text(row, "answer", file, index)
        if answer not in LETTERS[:len(options)]:
            raise RecordError(str(file), f"record {index}", f"answer {answer!r} is not a letter of its options")
        video_id = _text(row, "videoID", file, index)
        srt = root / "subtitle" / f"{video_id}.srt"
        found.append(BenchmarkQuestion(
            "videomme", duration, str(row.get("question_id") or index), resolve_video(root / "data", video_id),
            _text(row, "question", file, index), answer, list(options), frames=VIDEOMME_FRAMES[duration],
            subtitles=srt if subtitles and srt.is_file() else None,
            fields={k: row.get(k) for k in ("video_id", "videoID", "duration", "domain", "sub_category", "task_type",
                                             "question_id")}))
    return found


def read_qa(benchmark: str, annotations: str | Path, videos: str | Path, answers: str | Path | None = None,
            limit: int | None = None) -> list[BenchmarkQuestion]:
    """MSVD-QA / MSRVTT-QA: one file of questions with their answers; ActivityNet-QA: the
    questions and, in ``answers``, the answers in the same order."""
    file, videos = Path(annotations), Path(videos)
    records = _records(file)
    references = _records(Path(answers)) if answers else None
    if references is not None and len(references) != len(records):
        raise RecordError(str(answers), "top level", f"{len(references)} answers for the {len(records)} questions of "
                                                     f"{file}: they are matched by position")
    found, mapping = [], None
    for index, record in enumerate(records[:limit]):
        question = _text(record, "question", file, index)
        answer = (_text(references[index], "answer", Path(answers), index) if references is not None
                  else _text(record, "answer", file, index))
        if any(record.get(k) not in (None, "") for k in ("video_name", "video")):
            name = _first_of(record, ("video_name", "video"), file, index)
        else:
            if benchmark == "msvd_qa" and mapping is None:
                mapping = _youtube_mapping(file, videos)
            name = _numbered_video(benchmark, _first_of(record, ("video_id",), file, index), file, index, videos,
                                   mapping)
        if benchmark == "activitynet_qa" and not name.startswith("v_"):
            name = f"v_{name}"
        # the id as the file has it (MSVD's and MSRVTT's are integers): the judge files carry it so
        identity = next((record[k] for k in ("question_id", "id") if record.get(k) not in (None, "")), index)
        found.append(BenchmarkQuestion(benchmark, benchmark, str(identity), resolve_video(videos, name), question,
                                       answer, fields={"id": identity, "video": name}))
    return found


MSVD_MAPPING = "youtube_mapping.txt"


def _mapping_places(annotations: Path, videos: Path) -> list[Path]:
    """Where MSVD-QA's youtube_mapping.txt may lie: beside the questions file, in the videos
    folder, or in a folder above either."""
    return list(dict.fromkeys([annotations.parent, annotations.parent.parent, videos, videos.parent]))


def _mapping_file(annotations: Path, videos: Path) -> Path | None:
    return next((folder / MSVD_MAPPING for folder in _mapping_places(annotations, videos)
                 if (folder / MSVD_MAPPING).is_file()), None)


def _youtube_mapping(annotations: Path, videos: Path) -> dict[str, str]:
    """MSVD-QA's youtube_mapping.txt ("<clip> vid<N>" per line) as {"vid<N>": clip}."""
    path = _mapping_file(annotations, videos)
    if path is None:
        raise BenchmarkError(f"{annotations} names its videos by an integer video_id (MSVD-QA's release); the "
                             f"{MSVD_MAPPING} that maps them to YouTube clips is in none of "
                             f"{', '.join(str(folder) for folder in _mapping_places(annotations, videos))}")
    mapping = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2:
                raise RecordError(str(path), f"line {number}", f"expected '<clip> vid<N>', got {line!r}")
            mapping[parts[1]] = parts[0]
    return mapping


def _numbered_video(benchmark: str, video_id: str, file: Path, index: int, videos: Path,
                    mapping: dict[str, str] | None) -> str:
    """The video an integer video_id names in the official releases (``mapping``: MSVD's)."""
    if benchmark == "msvd_qa":
        clip = mapping.get(f"vid{video_id}")
        if clip is None:
            raise RecordError(str(file), f"record {index}", f"video_id {video_id}: no vid{video_id} in {MSVD_MAPPING}")
        return clip
    if benchmark == "msrvtt_qa":  # the release's video<N>.mp4; the authors' own copies are <N>.mp4
        names = [f"video{video_id}", str(video_id)]
        return next((name for name in names if resolve_video(videos, name).exists()), names[0])
    return str(video_id)


def read_vcg(root: str | Path, videos: str | Path, limit: int | None = None) -> list[BenchmarkQuestion]:
    root, videos, found = Path(root), Path(videos), []
    for task, filename in VCG_TASKS:
        file = root / filename
        for index, record in enumerate(_records(file)[:limit]):
            name = _text(record, "video_name", file, index)
            consistency = task == "consistency"
            found.append(BenchmarkQuestion(
                "vcg", task, f"{task}/{index}", resolve_video(videos, name),
                _text(record, "Q1" if consistency else "Q", file, index), _text(record, "A", file, index),
                second_question=_text(record, "Q2", file, index) if consistency else None,
                fields={"video_name": name}))
    return found
