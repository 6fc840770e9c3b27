"""Synthetic data with something to learn: moving coloured shapes, questions whose answer
depends on what is asked (so prompt-guided pooling has a reason to look somewhere).

    videos        H.264 MP4 (PyAV): two shapes, each moving one way
                  "What colour is the circle?" / "Which way does the red circle move?"
    images        JPEG with two or three still shapes: colour of a named shape, how many shapes
    multi-image   2-4 JPEGs with one shape each: "Which image contains the blue square?"
    eval          multiple-choice questions (A-D) on held-out videos, options phrased like answers
    DPO pairs     video description, correct (chosen) vs wrong direction or colour (rejected)

Annotations are written in the formats real data uses (VideoChat2 QA for video, LLaVA
conversations for images, LLaVA-Hound JSONL for DPO), with dataset cards next to them.
Everything is a function of the seed, byte for byte: annotations, JPEGs and MP4s (x264 with one
thread and without macroblock-tree rate control, see ``encode_mp4``). ``broken`` adds truncated media files, referenced by the
annotations like good ones, for robustness tests.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40), "purple": (150, 60, 190), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass
class SynthSettings:
    seed: int = 0
    videos: int = 24
    images: int = 24
    multi_images: int = 12
    eval_questions: int = 8
    dpo_pairs: int = 12
    size: int = 64            # frame side in pixels (even: H.264 4:2:0 needs it)
    frames: int = 16
    fps: int = 8
    broken: int = 0           # truncated videos and images added to the annotations


@dataclass
class Shape:
    kind: str
    colour: str
    x: float
    y: float
    direction: str = ""

    def describe(self) -> str:
        return f"{self.colour} {self.kind}"


def _draw(shapes: list[Shape], size: int, radius: float) -> np.ndarray:
    canvas = Image.new("RGB", (size, size), (245, 245, 245))
    pen = ImageDraw.Draw(canvas)
    for shape in shapes:
        box = (shape.x - radius, shape.y - radius, shape.x + radius, shape.y + radius)
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif shape.kind == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(shape.x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return np.asarray(canvas)


def _distinct_shapes(rng: random.Random, count: int, size: int, moving: bool) -> list[Shape]:
    kinds = rng.sample(SHAPES, count)
    colours = rng.sample(sorted(COLOURS), count)
    lanes = np.linspace(size * 0.25, size * 0.75, count)
    shapes = []
    for kind, colour, lane in zip(kinds, colours, lanes):
        direction = rng.choice(sorted(DIRECTIONS)) if moving else ""
        horizontal = direction in ("left", "right")
        # Start on the side opposite to the motion so the shape crosses the frame.
        start = size * (0.25 if direction in ("right", "down") else 0.75)
        x, y = (start, lane) if horizontal or not moving else (lane, start)
        if not moving:
            x, y = rng.uniform(size * 0.2, size * 0.8), lane
        shapes.append(Shape(kind, colour, x, y, direction))
    return shapes


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """RGB frames [T, H, W, 3] -> H.264 MP4 bytes."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # Byte-for-byte output for the same frames: one encoder thread (with frame threads the output
        # depends on thread timing) and no macroblock-tree rate control (x264's mbtree reads
        # uninitialised memory on frames this small, so the same frames encoded twice in one process
        # gave different bytes for about one clip in seven).
        stream.options = {"crf": "20", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _video(rng: random.Random, settings: SynthSettings) -> tuple[bytes, list[Shape]]:
    shapes = _distinct_shapes(rng, 2, settings.size, moving=True)
    radius = settings.size * 0.1
    travel = settings.size * 0.5 / max(1, settings.frames - 1)
    frames = []
    for step in range(settings.frames):
        moved = [Shape(s.kind, s.colour, s.x + DIRECTIONS[s.direction][0] * travel * step,
                       s.y + DIRECTIONS[s.direction][1] * travel * step, s.direction) for s in shapes]
        frames.append(_draw(moved, settings.size, radius))
    return encode_mp4(np.stack(frames), settings.fps), shapes


def _video_qa(rng: random.Random, shapes: list[Shape]) -> list[dict]:
    target = rng.choice(shapes)
    return [
        {"i": "", "q": f"What colour is the {target.kind}?", "a": f"The {target.kind} is {target.colour}."},
        {"i": "", "q": f"Which way does the {target.describe()} move?", "a": f"It moves {target.direction}."},
    ]


def generate(out_dir: str | Path, settings: SynthSettings | None = None) -> dict[str, int]:
    """Write media, annotations and dataset cards under ``out_dir``; returns counts per kind."""
    settings = settings or SynthSettings()
    out = Path(out_dir)
    media = out / "media"
    for folder in ("videos", "images", "multi"):
        (media / folder).mkdir(parents=True, exist_ok=True)
    rng = random.Random(settings.seed)
    radius = settings.size * 0.12

    video_records, eval_records, dpo_lines = [], [], []
    for index in range(settings.videos):
        data, shapes = _video(rng, settings)
        name = f"videos/video_{index:04d}.mp4"
        (media / name).write_bytes(data)
        video_records.append({"video": name, "QA": _video_qa(rng, shapes)})
        if index < settings.dpo_pairs:
            target = rng.choice(shapes)
            wrong = rng.choice([d for d in sorted(DIRECTIONS) if d != target.direction])
            dpo_lines.append({"id": f"dpo_{index:04d}", "video": name, "prompt": f"Describe how the {target.kind} moves.",
                              "chosen": f"The {target.describe()} moves {target.direction}.",
                              "rejected": f"The {target.describe()} moves {wrong}."})

    # Held-out videos for the multiple-choice questions; the options are phrased like the training
    # answers, so a model is scored on what it was taught to say.
    for index in range(settings.eval_questions):
        data, shapes = _video(rng, settings)
        name = f"videos/eval_{index:04d}.mp4"
        (media / name).write_bytes(data)
        target = rng.choice(shapes)
        directions = sorted(DIRECTIONS)
        rng.shuffle(directions)
        eval_records.append({"video": name, "question": f"Which way does the {target.describe()} move?",
                             "options": [f"It moves {d}." for d in directions],
                             "answer": "ABCD"[directions.index(target.direction)]})

    image_records = []
    for index in range(settings.images):
        shapes = _distinct_shapes(rng, rng.choice((2, 3)), settings.size, moving=False)
        name = f"images/image_{index:04d}.jpg"
        (media / name).write_bytes(encode_jpeg(_draw(shapes, settings.size, radius)))
        target = rng.choice(shapes)
        image_records.append({"id": f"image_{index:04d}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\nWhat colour is the {target.kind}?"},
            {"from": "gpt", "value": f"The {target.kind} is {target.colour}."},
            {"from": "human", "value": "How many shapes are there?"},
            {"from": "gpt", "value": f"There are {len(shapes)} shapes."}]})

    multi_records = []
    for index in range(settings.multi_images):
        count = rng.choice((2, 3, 4))
        shapes = [_distinct_shapes(rng, 1, settings.size, moving=False)[0] for _ in range(count)]
        names = []
        for position, shape in enumerate(shapes):
            name = f"multi/set_{index:04d}_{position}.jpg"
            (media / name).write_bytes(encode_jpeg(_draw([shape], settings.size, radius)))
            names.append(name)
        answer = rng.randrange(count)
        multi_records.append({"id": f"multi_{index:04d}", "images": names, "conversations": [
            {"from": "human", "value": " ".join(["<image>"] * count) + f"\nWhich image contains the {shapes[answer].describe()}?"},
            {"from": "gpt", "value": f"Image {answer + 1}."}]})

    for index in range(settings.broken):
        good_video = (media / video_records[index % len(video_records)]["video"]).read_bytes()
        video_name = f"videos/broken_{index:04d}.mp4"
        (media / video_name).write_bytes(good_video[: len(good_video) // 3])
        video_records.append({"video": video_name, "QA": [{"i": "", "q": "What is shown?", "a": "Shapes."}]})
        good_image = (media / image_records[index % len(image_records)]["image"]).read_bytes()
        image_name = f"images/broken_{index:04d}.jpg"
        (media / image_name).write_bytes(good_image[: len(good_image) // 4])
        image_records.append({"id": f"broken_{index:04d}", "image": image_name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Shapes."}]})

    (out / "video_qa.json").write_text(json.dumps(video_records, indent=1))
    (out / "image_conversations.json").write_text(json.dumps(image_records, indent=1))
    (out / "multi_image_conversations.json").write_text(json.dumps(multi_records, indent=1))
    (out / "eval_multiple_choice.json").write_text(json.dumps(eval_records, indent=1))
    (out / "dpo_pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in dpo_lines))
    _write_cards(out)
    return {"videos": len(video_records), "images": len(image_records), "multi_images": len(multi_records),
            "eval_questions": len(eval_records), "dpo_pairs": len(dpo_lines), "broken": 2 * settings.broken}


def _write_cards(out: Path) -> None:
    cards = out / "cards"
    cards.mkdir(exist_ok=True)
    entries = [("synthetic_video", "videochat2", "video_qa.json", "video"),
               ("synthetic_image", "llava", "image_conversations.json", "image"),
               ("synthetic_multi_image", "llava", "multi_image_conversations.json", "multi_image"),
               ("synthetic_dpo", "dpo", "dpo_pairs.jsonl", "video")]
    for name, format_, annotation, modality in entries:
        (cards / f"{name}.yaml").write_text(
            f"# Written by `python -m pipeline synth`; paths are relative to this card.\n"
            f"name: {name}\nformat: {format_}\nannotation: ../{annotation}\nmedia_root: ../media\n"
            f"modality: {modality}\nweight: 1.0\nlicense: CC0-1.0 (generated)\n")
