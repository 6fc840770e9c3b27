"""The commands that ask a model directory (an export, or any PPLLaVA directory) directly:
`chat` answers one question about a video or images, streamed token by token; `explain` draws
where the question's relevance (eq.1) goes over the frames and the pooled grid. Both load the
model on the backend asked for (torch and the model code load here, not for every command)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import backends
from backends import BackendUnavailable
from pipeline.data.media import MediaError
from pipeline.exit_codes import ExitCode
from pipeline.model.check import ModelFilesError
from pipeline.model.inference import InferenceError, Question, load_for_inference
from pipeline.model.relevance_map import draw, relevance_map


def chat(args: argparse.Namespace) -> int:
    """One question about a video, an image or several images, answered token by token on stdout
    (loading and the visual token count go to stderr)."""
    try:
        if not args.question.strip():
            raise InferenceError("the question is empty")
        question = Question.from_media(args.question, videos=args.video or (), images=args.image or ())
        missing = [str(p) for p in question.media if not p.exists()]  # a video may be a frame folder
        if missing:  # before the model loads
            raise InferenceError(f"media file not found: {', '.join(missing)}")
        backend = backends.select(args.backend)
        model = load_for_inference(args.model_dir, backend, 0, args.frames, args.video_kernel)
        inputs = model.prompt_inputs(question)
        visual = int((inputs["input_ids"] == model.image_token).sum())
        shape = f", video kernel {'x'.join(map(str, model.config.video_kernel))}" if question.modality == "video" else ""
        print(f"{question.modality}: {inputs['pixel_values'].shape[0]} frames{shape} -> {visual} visual tokens",
              file=sys.stderr, flush=True)
        from transformers import TextStreamer

        streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        model.generate(question, args.max_new_tokens, streamer=streamer, inputs=inputs)
    except (InferenceError, MediaError, BackendUnavailable, ModelFilesError) as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return ExitCode.OK


def explain(args: argparse.Namespace) -> int:
    """The question's eq.1 relevance over the video's frames and the pooled grid, as one PNG."""
    try:
        if not args.question.strip():
            raise InferenceError("the question is empty")
        if not Path(args.video).exists():
            raise InferenceError(f"video not found: {args.video}")
        backend = backends.select(args.backend)
        model = load_for_inference(args.model_dir, backend, 0, args.frames, args.video_kernel)
        result = relevance_map(model, Question.from_media(args.question, videos=[args.video]))
        out = draw(result, args.out or f"{Path(args.video).stem}.relevance.png")
    except (InferenceError, MediaError, BackendUnavailable, ModelFilesError) as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    frame, row, column = result.hottest
    print(f"{out}: {len(result.frames)} frames, {result.pooled.size} pooled tokens; most relevant patch: frame "
          f"{frame}, row {row}, column {column} ({100 * result.scores.max():.1f} % of the video's relevance)")
    return ExitCode.OK
