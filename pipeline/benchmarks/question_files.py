"""Eval question files: JSON lists of multiple-choice or open-ended questions about media.

Multiple-choice records (MVBench style): {"video" | "image": path or, for images, a list of
paths, "question": str, "options" | "candidates": [str, ...], "answer": a letter "A".. or the
answer's text}; open-ended records: {"video" | "image": path, "question": str, "answer": str
(optional)}. A video may be a file, a GIF or a folder of frames, and may carry "start" / "end"
seconds (MVBench's bounded tasks; on a folder of frames also "fps", their rate). Media paths are
relative to a media root (default: the file's folder) and may not leave it; one of MVBench's own
task files (``<MVBench>/json/<task>.json``) reads its media from its task's folder as MVBench
publishes it (``<media root or MVBench/video>/<task folder>``, its frame folders at 3 fps), so
one media root serves all 20 tasks. ``read_task`` checks
every record before any model loads, and names the file, the record index and the reason of the
first bad one (RecordError). The paper's benchmarks in their own layouts: readers.py beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.benchmarks.prompts import LETTERS, mvbench_prompt
from pipeline.benchmarks.readers import MVBENCH_FRAME_FPS, MVBENCH_TASKS
from pipeline.data.cards import media_under_root
from pipeline.data.media import FRAME_SUFFIXES, frame_files
from pipeline.data.records import RecordError
from pipeline.data.sources import read_bounds
from pipeline.model.inference import Question

KINDS = ("multiple_choice", "open_ended")
# MVBench's task files by name: (task, video folder under its video/, media kind)
MVBENCH_FILES = {filename: (task, folder, kind) for task, filename, folder, kind, _ in MVBENCH_TASKS}


@dataclass
class Item:
    index: int                    # position in its file
    record: dict
    question: Question
    options: list[str]            # multiple choice only
    answer: int | str | None      # multiple choice: index of the right option; open-ended: reference or None


@dataclass
class Task:
    kind: str                     # multiple_choice | open_ended
    path: Path
    items: list[Item]

    @property
    def name(self) -> str:
        return self.path.stem



def _text(record: dict, key: str, file: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(file, where, f"'{key}' must be a non-empty string, got {value!r}")
    return value


def _media(record: dict, root: Path, file: str, where: str, folder_fps: float | None = None) -> Question:
    present = [key for key in ("video", "image") if key in record]
    if len(present) != 1:
        raise RecordError(file, where, "exactly one of 'video' or 'image' must be set")
    value = record[present[0]]
    names = value if present[0] == "image" and isinstance(value, list) else [value]
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise RecordError(file, where, f"'{present[0]}' must be a path{' or a list of paths' if present[0] == 'image' else ''}, "
                          f"got {value!r}")
    paths = []
    for name in names:
        try:
            path = media_under_root(root, name)
        except ValueError as error:
            raise RecordError(file, where, str(error)) from None
        folder = present[0] == "video" and path.is_dir()  # a video as a folder of frames
        if folder and not frame_files(path):
            raise RecordError(file, where, f"frame folder {name!r} under {root} holds no {'/'.join(FRAME_SUFFIXES)} files")
        if not folder and not path.is_file():
            raise RecordError(file, where, f"media file {name!r} not found under {root}")
        paths.append(path)
    question = _text(record, "question", file, where)
    asked = Question.from_media(question, videos=paths if present[0] == "video" else (),
                                images=paths if present[0] == "image" else ())
    if present[0] != "video":
        return asked
    bounds = read_bounds(record, file, where)
    fps = record.get("fps", folder_fps)
    if bounds is not None and paths[0].is_dir():  # frames of a folder are placed by their rate
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps <= 0:
            raise RecordError(file, where, f"'start' / 'end' on a folder of frames need its frame rate: 'fps' > 0, "
                                           f"got {fps!r}")
        return replace(asked, bounds=bounds, folder_fps=float(fps))
    return replace(asked, bounds=bounds)


def _answer_index(record: dict, options: list[str], file: str, where: str) -> int:
    answer = _text(record, "answer", file, where).strip()
    by_text = [i for i, option in enumerate(options) if option.strip() == answer]
    by_letter = [LETTERS.index(answer)] if len(answer) == 1 and answer in LETTERS[: len(options)] else []
    found = sorted(set(by_text + by_letter))
    if len(found) > 1:
        raise RecordError(file, where, f"answer {answer!r} is ambiguous: option {LETTERS[by_letter[0]]} by letter, "
                          f"option {LETTERS[by_text[0]]} by text")
    if not found:
        raise RecordError(file, where, f"answer {answer!r} is neither a letter A-{LETTERS[len(options) - 1]} nor the "
                          f"text of an option {options}")
    return found[0]


def _item(record, index: int, kind: str, root: Path, file: str, folder_fps: float | None = None) -> Item:
    where = f"record {index}"
    if not isinstance(record, dict):
        raise RecordError(file, where, f"expected an object, got {type(record).__name__}")
    question = _media(record, root, file, where, folder_fps)
    if kind == "open_ended":
        reference = record.get("answer")
        if reference is not None and not isinstance(reference, str):
            raise RecordError(file, where, f"'answer' must be a string when given, got {reference!r}")
        return Item(index, record, question, [], reference)
    keys = [key for key in ("options", "candidates") if key in record]
    if len(keys) != 1:
        raise RecordError(file, where, "exactly one of 'options' or 'candidates' must be set")
    options = record[keys[0]]
    if (not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS)
            or not all(isinstance(o, str) and o.strip() for o in options)):
        raise RecordError(file, where, f"'{keys[0]}' must be a list of 2 to {len(LETTERS)} non-empty strings, got {options!r}")
    if len({o.strip() for o in options}) != len(options):
        raise RecordError(file, where, f"'{keys[0]}' has duplicate options {options}")
    return Item(index, record, question, [o.strip() for o in options], _answer_index(record, options, file, where))


PROMPTS = ("mvbench", "plain")


def multiple_choice_prompt(item: Item, style: str = "mvbench") -> tuple[Question, list[str]]:
    """The question a model is asked about a multiple-choice item, and the answers scored after it.

    mvbench: "Question: {q}\\nOptions:\\n(A) ...\\n(B) ...\\nOnly give the best option." answered
    "Best option:(" + "A) {option}"; plain: the question alone, each option's text as the answer.
    """
    if style == "plain":
        return item.question, list(item.options)
    if style != "mvbench":
        raise ValueError(f"unknown multiple-choice prompt {style!r}; expected one of {PROMPTS}")
    prompt = mvbench_prompt(item.question.text, item.options)  # the authors' (pipeline/benchmarks/prompts.py)
    question = replace(item.question, text=prompt.text, answer_prefix=prompt.answer_prefix, guide=prompt.guide)
    return question, [f"{LETTERS[i]}) {option}" for i, option in enumerate(item.options)]  # after "Best option:("


def read_task(path: str | Path, kind: str, media_root: str | None = None, limit: int | None = None) -> Task:
    """A question file, every record checked (media present, answer resolvable); the first
    ``limit`` records when given. Raises RecordError naming the file, the record and the reason."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecordError(str(path), f"line {error.lineno}", f"not valid JSON: {error.msg}") from None
    if not isinstance(records, list) or not records:
        raise RecordError(str(path), "top level", "expected a non-empty JSON list of question records")
    root, folder_fps = media_folder(path, media_root)
    chosen = records[:limit] if limit else records
    return Task(kind, path, [_item(record, index, kind, root, str(path), folder_fps)
                             for index, record in enumerate(chosen)])


def media_folder(path: Path, media_root: str | None) -> tuple[Path, float | None]:
    """Where a question file's media names are looked up, and its frame folders' rate when known.
    An MVBench task file (its own name, in a folder named json) reads from its task's video folder
    under the media root, or under the MVBench folder's video/ when no media root is given."""
    task = MVBENCH_FILES.get(path.name) if path.parent.name == "json" else None
    if task is not None:
        _, folder, kind = task
        base = Path(media_root) if media_root else path.parent.parent / "video"
        if (base / folder).is_dir():
            return base / folder, MVBENCH_FRAME_FPS if kind == "frames" else None
    return (Path(media_root) if media_root else path.parent), None
