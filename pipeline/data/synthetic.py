"""Synthetic data with something to learn, on which prompt-guided pooling can matter: several
coloured shapes per picture, and a question about *one* of them, so that pooling guided by the
question can keep that object's tokens where uniform pooling mixes them with the others'.

    videos        H.264 MP4 (PyAV): ``objects`` shapes of distinct kinds, colours and directions,
                  each crossing the middle of the frame (so objects share pooling windows)
    images        JPEG with three still shapes of distinct kinds and colours
    multi-image   three JPEGs with one shape each, every kind once
    question      every modality: "What colour is the triangle?" -> "The triangle is red."
    eval          held-out media, one multiple-choice file per modality (eval_video.json,
                  eval_image.json, eval_multi_image.json), four options phrased like the training
                  answers: chance is 25 % (EVAL_CHANCE)
    DPO pairs     the same question on training videos: the right colour (chosen) against another
                  object's (rejected)

Every question is answerable from its media only, and only by binding a shape to its colour: the
wrong options are the colours of the other objects on screen first (a model that only knows
which colours are present guesses between them), then an absent one.

Why colours of shapes, and no "which way does it move" or "which image" questions: a tiny LLM
trained from scratch has no notion of where a token sits (Llama's rotary positions are only
relative; a pretrained LLM learned to use them), and within the demo's budget it learned neither
direction nor image order (the direction of a lone shape: 30 % after 1,000 steps; which image:
22 % after 2,000 steps; measured), while attributes it reads
from the tokens' content it learns (docs/recipes.md, the demo).

Annotations are written in the formats real data uses (VideoChat2 QA for video, LLaVA
conversations for images, LLaVA-Hound JSONL for DPO), with dataset cards next to them.
Everything is a function of the seed, byte for byte: annotations, JPEGs and MP4s (x264 with one
thread and without macroblock-tree rate control, see ``encode_mp4``). ``broken`` adds truncated
media files, referenced by the annotations like good ones, for robustness tests.
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
OPTIONS = 4                                   # every eval question has four options
EVAL_CHANCE = 1 / OPTIONS
EVAL_FILES = {"video": "eval_video.json", "image": "eval_image.json", "multi_image": "eval_multi_image.json"}
BACKGROUND = (245, 245, 245)
RADIUS = 0.18                                 # shape radius, a fraction of the frame side
# Every word the generated questions and answers use (the tiny tokenizer learns them whole).
VOCABULARY = "What colour is the shape? The " + " ".join([*COLOURS, *SHAPES, *DIRECTIONS])


@dataclass
class SynthSettings:
    seed: int = 0
    videos: int = 24
    images: int = 24
    multi_images: int = 12
    eval_questions: int = 8   # held-out multiple-choice questions per modality
    dpo_pairs: int = 12
    size: int = 64            # frame side in pixels (even: H.264 4:2:0 needs it)
    frames: int = 16
    fps: int = 8
    objects: int = 3          # moving shapes per video (2 or 3)
    broken: int = 0           # truncated videos and images added to the annotations
    # > 0: the synth stage also writes synth/model, a tiny PPLLaVA whose CLIP is pretrained on these
    # shapes for this many steps (pipeline/model/tiny_clip.py), for `model.source: pretrained`
    clip_pretrain_steps: int = 0


@dataclass
class Shape:
    kind: str
    colour: str
    x: float
    y: float
    direction: str = ""


def draw_shapes(shapes: list[Shape], size: int, radius: float) -> np.ndarray:
    """RGB picture [size, size, 3] of ``shapes`` on the background, later shapes drawn over earlier ones."""
    canvas = Image.new("RGB", (size, size), BACKGROUND)
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


def _moving_shapes(rng: random.Random, count: int, size: int) -> list[Shape]:
    """``count`` shapes of distinct kinds, colours and directions, each starting on the side
    opposite its motion so that it crosses the middle of the frame."""
    kinds = rng.sample(SHAPES, count)
    colours = rng.sample(sorted(COLOURS), count)
    directions = rng.sample(sorted(DIRECTIONS), count)
    shapes = []
    for kind, colour, direction in zip(kinds, colours, directions):
        start = size * (0.2 if direction in ("right", "down") else 0.8)
        lane = rng.uniform(size * 0.2, size * 0.8)
        x, y = (start, lane) if direction in ("left", "right") else (lane, start)
        shapes.append(Shape(kind, colour, x, y, direction))
    return shapes


def _still_shapes(rng: random.Random, count: int, size: int) -> list[Shape]:
    """``count`` still shapes of distinct kinds and colours, in distinct cells of a 2x2 grid (so
    they never overlap), jittered inside their cell."""
    kinds = rng.sample(SHAPES, count)
    colours = rng.sample(sorted(COLOURS), count)
    cells = rng.sample([(0, 0), (0, 1), (1, 0), (1, 1)], count)
    return [Shape(kind, colour, size * (0.25 + 0.5 * col + rng.uniform(-0.08, 0.08)),
                  size * (0.25 + 0.5 * row + rng.uniform(-0.08, 0.08)))
            for kind, colour, (row, col) in zip(kinds, colours, cells)]


def encode_mp4(frames: np.ndarray, fps: int, x264_params: str = "") -> bytes:
    """RGB frames [T, H, W, 3] -> H.264 MP4 bytes; ``x264_params`` adds x264 options
    ("keyint=8:min-keyint=8" for short GOPs, "open-gop=1")."""
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
        params = "mbtree=0" + (f":{x264_params}" if x264_params else "")
        stream.options = {"crf": "20", "preset": "veryfast", "threads": "1", "x264-params": params}
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
    shapes = _moving_shapes(rng, settings.objects, settings.size)
    radius = settings.size * RADIUS
    travel = settings.size * 0.6 / max(1, settings.frames - 1)
    frames = []
    for step in range(settings.frames):
        moved = [Shape(s.kind, s.colour, s.x + DIRECTIONS[s.direction][0] * travel * step,
                       s.y + DIRECTIONS[s.direction][1] * travel * step, s.direction) for s in shapes]
        frames.append(draw_shapes(moved, settings.size, radius))
    return encode_mp4(np.stack(frames), settings.fps), shapes


def colour_question(rng: random.Random, shapes: list[Shape]) -> tuple[str, str, list[str]]:
    """The question every modality asks about one of ``shapes`` (drawn here), its answer and its
    multiple-choice options, the right one first (the eval shuffles them). Wrong colours: the
    other objects' first, then absent ones."""
    target = rng.choice(shapes)
    others = [s.colour for s in shapes if s is not target]
    absent = [c for c in sorted(COLOURS) if c not in {s.colour for s in shapes}]
    wrong = (rng.sample(others, len(others)) + rng.sample(absent, len(absent)))[: OPTIONS - 1]
    return (f"What colour is the {target.kind}?", f"The {target.kind} is {target.colour}.",
            [f"The {target.kind} is {c}." for c in (target.colour, *wrong)])


def _multiple_choice(rng: random.Random, media: dict, shapes: list[Shape]) -> dict:
    """An eval record: the colour question, its options shuffled."""
    question, _, options = colour_question(rng, shapes)
    order = list(range(len(options)))
    rng.shuffle(order)
    return {**media, "question": question, "options": [options[i] for i in order], "answer": "ABCD"[order.index(0)]}


def generate(out_dir: str | Path, settings: SynthSettings | None = None) -> dict[str, int]:
    """Write media, annotations and dataset cards under ``out_dir``; returns counts per kind."""
    settings = settings or SynthSettings()
    if not 2 <= settings.objects <= len(SHAPES):
        raise ValueError(f"synth.objects must be 2 to {len(SHAPES)} (one shape kind each), got {settings.objects}")
    out = Path(out_dir)
    media = out / "media"
    for folder in ("videos", "images", "multi"):
        (media / folder).mkdir(parents=True, exist_ok=True)
    rng = random.Random(settings.seed)
    radius = settings.size * RADIUS

    def video(name: str) -> list[Shape]:
        data, shapes = _video(rng, settings)
        (media / name).write_bytes(data)
        return shapes

    def image(name: str) -> list[Shape]:
        shapes = _still_shapes(rng, len(SHAPES), settings.size)
        (media / name).write_bytes(encode_jpeg(draw_shapes(shapes, settings.size, radius)))
        return shapes

    def image_set(name: str) -> tuple[list[str], list[Shape]]:
        """One shape per image, every kind once, in a random order."""
        shapes = _still_shapes(rng, len(SHAPES), settings.size)
        rng.shuffle(shapes)
        names = [f"{name}_{position}.jpg" for position in range(len(shapes))]
        for shape, path in zip(shapes, names):
            (media / path).write_bytes(encode_jpeg(draw_shapes([shape], settings.size, radius)))
        return names, shapes

    video_records, dpo_lines = [], []
    for index in range(settings.videos):
        name = f"videos/video_{index:04d}.mp4"
        shapes = video(name)
        question, answer, _ = colour_question(rng, shapes)
        video_records.append({"video": name, "QA": [{"i": "", "q": question, "a": answer}]})
        if index < settings.dpo_pairs:  # the right colour (chosen) against another object's (rejected)
            question, answer, options = colour_question(rng, shapes)
            dpo_lines.append({"id": f"dpo_{index:04d}", "video": name, "prompt": question, "chosen": answer,
                              "rejected": options[1]})

    image_records = []
    for index in range(settings.images):
        name = f"images/image_{index:04d}.jpg"
        shapes = image(name)
        question, answer, _ = colour_question(rng, shapes)
        image_records.append({"id": f"image_{index:04d}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})

    multi_records = []
    for index in range(settings.multi_images):
        names, shapes = image_set(f"multi/set_{index:04d}")
        question, answer, _ = colour_question(rng, shapes)
        multi_records.append({"id": f"multi_{index:04d}", "images": names, "conversations": [
            {"from": "human", "value": " ".join(["<image>"] * len(names)) + f"\n{question}"},
            {"from": "gpt", "value": answer}]})

    # Held-out media for the multiple-choice questions, one file per modality.
    evals = {modality: [] for modality in EVAL_FILES}
    for index in range(settings.eval_questions):
        name = f"videos/eval_{index:04d}.mp4"
        shapes = video(name)
        evals["video"].append(_multiple_choice(rng, {"video": name}, shapes))
        name = f"images/eval_{index:04d}.jpg"
        shapes = image(name)
        evals["image"].append(_multiple_choice(rng, {"image": name}, shapes))
        names, shapes = image_set(f"multi/eval_{index:04d}")
        evals["multi_image"].append(_multiple_choice(rng, {"image": names}, shapes))

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
    for modality, records in evals.items():
        (out / EVAL_FILES[modality]).write_text(json.dumps(records, indent=1))
    (out / "dpo_pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in dpo_lines))
    _write_cards(out)
    return {"videos": len(video_records), "images": len(image_records), "multi_images": len(multi_records),
            "eval_questions": sum(len(records) for records in evals.values()), "dpo_pairs": len(dpo_lines),
            "broken": 2 * settings.broken}


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
