"""Annotation readers: LLaVA conversations JSON, VideoChat2 QA JSON, DPO pairs JSONL.

Each reader yields records in file order. A malformed record is yielded as a
:class:`RecordError` *value* in its place (naming the file, the record index or JSONL line, and
the reason), so the shard stage can reject it and go on; :func:`strict` turns the first one into
an exception. A file that is not JSON at all raises at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from pipeline.data.records import IMAGE_PLACEHOLDER, PreferencePair, RecordError, Sample, Turn

Record = TypeVar("Record", Sample, PreferencePair)
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _load_json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RecordError(str(path), f"line {error.lineno}", f"not valid JSON: {error.msg}") from None
    if not isinstance(data, list):
        raise RecordError(str(path), "top level", f"expected a JSON list of records, got {type(data).__name__}")
    return data


def _text(record: dict, key: str, file: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(file, where, f"'{key}' must be a non-empty string, got {value!r}")
    return value


def read_bounds(record: dict, file: str, where: str) -> list[float] | None:
    """A record's optional ``start`` / ``end`` (seconds) bounding a clip of a longer video."""
    if "start" not in record and "end" not in record:
        return None
    start, end = record.get("start"), record.get("end")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (start, end)) or not 0 <= start < end:
        raise RecordError(file, where, f"'start' and 'end' must be seconds with 0 <= start < end, got {start!r}, {end!r}")
    return [float(start), float(end)]


def _with_placeholders(turns: list[Turn], count: int, file: str, where: str) -> list[Turn]:
    """Exactly ``count`` placeholders, all in the first user turn (added in front when absent)."""
    found = [turn.content.count(IMAGE_PLACEHOLDER) for turn in turns]
    if sum(found) == 0 and count:
        turns[0] = Turn("user", (IMAGE_PLACEHOLDER + "\n") * count + turns[0].content)
    elif sum(found) != count or found[0] != count:
        raise RecordError(file, where, f"{count} visual input(s) but {IMAGE_PLACEHOLDER} placeholders per turn are {found} "
                          f"(all must be in the first user turn)")
    return turns


def _llava_record(record: Any, file: str, index: int, dataset: str) -> Sample:
    where = f"record {index}"
    if not isinstance(record, dict):
        raise RecordError(file, where, f"expected an object, got {type(record).__name__}")
    present = [key for key in ("image", "images", "video") if record.get(key) not in (None, [], "")]
    if len(present) > 1:
        raise RecordError(file, where, f"only one of image/images/video may be set, found {present}")
    if not present:
        modality, media = "text", []
    elif present[0] == "video":
        modality, media = "video", [_text(record, "video", file, where)]
    elif present[0] == "image" and isinstance(record["image"], str):
        modality, media = "image", [record["image"]]
    else:
        media = record[present[0]]
        if isinstance(media, str):
            media = [media]
        if not isinstance(media, list) or not all(isinstance(m, str) and m for m in media):
            raise RecordError(file, where, f"'{present[0]}' must be a path or a list of paths, got {media!r}")
        modality = "image" if len(media) == 1 else "multi_image"
    conversation = record.get("conversations")
    if not isinstance(conversation, list) or len(conversation) < 2:
        raise RecordError(file, where, "'conversations' must be a list of at least one human and one gpt turn")
    turns = []
    for position, turn in enumerate(conversation):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in LLAVA_ROLES:
            raise RecordError(file, f"{where}, turn {position}", f"'from' must be one of {sorted(LLAVA_ROLES)}, got {speaker!r}")
        expected = "user" if position % 2 == 0 else "assistant"
        if LLAVA_ROLES[speaker] != expected:
            raise RecordError(file, f"{where}, turn {position}", f"turns must alternate human/gpt starting with human; got {speaker!r}")
        turns.append(Turn(expected, _text(turn, "value", file, f"{where}, turn {position}")))
    if len(turns) % 2:
        raise RecordError(file, where, "the conversation ends with a human turn that has no answer")
    placeholders = len(media) if modality != "video" else 1
    turns = _with_placeholders(turns, placeholders, file, where)
    key = str(record.get("id", index))
    return Sample(f"{dataset}/{key}", modality, media, turns, dataset)


def _each(path: Path, parse: Callable[[Any, str, int, str], Record], dataset: str) -> Iterator[Record | RecordError]:
    for index, record in enumerate(_load_json_list(path)):
        try:
            yield parse(record, str(path), index, dataset)
        except RecordError as error:
            yield error


def strict(records: Iterator[Record | RecordError]) -> Iterator[Record]:
    """Records of a reader, raising the first malformed one."""
    for record in records:
        if isinstance(record, RecordError):
            raise record
        yield record


def read_llava(path: str | Path, dataset: str = "") -> Iterator[Sample | RecordError]:
    """LLaVA-style ``[{"id", "image"|"images"|"video", "conversations": [{"from", "value"}]}]``."""
    return _each(Path(path), _llava_record, dataset)


def _videochat2_record(record: Any, file: str, index: int, dataset: str) -> Sample:
    where = f"record {index}"
    if not isinstance(record, dict):
        raise RecordError(file, where, f"expected an object, got {type(record).__name__}")
    present = [key for key in ("video", "image", "multi-image") if key in record]
    if len(present) != 1:
        raise RecordError(file, where, "exactly one of 'video', 'image' or 'multi-image' must be set")
    if present[0] == "multi-image":  # the authors' converted M4-Instruct: a list of image paths
        media = record["multi-image"]
        if not isinstance(media, list) or len(media) < 2 or not all(isinstance(m, str) and m for m in media):
            raise RecordError(file, where, f"'multi-image' must be a list of at least two paths, got {media!r}")
        modality = "multi_image"
    else:
        modality = present[0]
        media = [_text(record, modality, file, where)]
    qa = record.get("QA")
    if not isinstance(qa, list) or not qa:
        raise RecordError(file, where, "'QA' must be a non-empty list of {i, q, a}")
    turns, instructions = [], []
    for position, item in enumerate(qa):
        at = f"{where}, QA {position}"
        if not isinstance(item, dict):
            raise RecordError(file, at, f"expected an object, got {type(item).__name__}")
        instruction = item.get("i") or ""
        if not isinstance(instruction, str):
            raise RecordError(file, at, f"'i' must be a string, got {instruction!r}")
        instructions.append(instruction.strip())
        turns.append(Turn("user", _text(item, "q", file, at)))
        turns.append(Turn("assistant", _text(item, "a", file, at)))
    turns = _with_placeholders(turns, len(media) if modality == "multi_image" else 1, file, where)
    bounds = read_bounds(record, file, where)  # VideoChat2-IT's clips of longer videos
    # The first QA's instruction is the conversation's system text; later ones are not read (the
    # authors' interleave_sft_dataset.py; VideoChat2-IT repeats one instruction per record).
    return Sample(f"{dataset}/{index}", modality, list(media), turns, dataset, system=instructions[0], bounds=bounds)


def read_videochat2(path: str | Path, dataset: str = "") -> Iterator[Sample | RecordError]:
    """VideoChat2-IT style ``[{"video"|"image": path | "multi-image": [paths], "QA": [{"i", "q", "a"}],
    "start"?, "end"?}]`` (the authors convert every SFT set to it); the
    first ``i`` is the system text of the conversation; ``start`` / ``end`` (seconds) bound a video."""
    return _each(Path(path), _videochat2_record, dataset)


def _dpo_line(line: str, file: str, number: int, dataset: str) -> PreferencePair:
    where = f"line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise RecordError(file, where, f"not valid JSON: {error.msg}") from None
    if not isinstance(record, dict):
        raise RecordError(file, where, f"expected an object, got {type(record).__name__}")
    fields = {key: _text(record, key, file, where) for key in ("video", "prompt", "chosen", "rejected")}
    if fields["chosen"] == fields["rejected"]:
        raise RecordError(file, where, "'chosen' and 'rejected' are identical")
    return PreferencePair(f"{dataset}/{record.get('id', number)}", dataset=dataset, **fields)


def read_dpo(path: str | Path, dataset: str = "") -> Iterator[PreferencePair | RecordError]:
    """LLaVA-Hound style JSONL, one ``{"video", "prompt", "chosen", "rejected"}`` per line."""
    path = Path(path)
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield _dpo_line(line, str(path), number, dataset)
                except RecordError as error:
                    yield error


READERS = {"llava": read_llava, "videochat2": read_videochat2, "dpo": read_dpo}
