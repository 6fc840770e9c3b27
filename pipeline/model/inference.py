"""Inference on a PPLLaVA model directory: shared by the eval stage and `python -m pipeline chat`.

    model = load_model_dir("runs/demo_cpu/export", num_frames=64, video_kernel=(4, 3, 3))  # paper Table 8
    question = Question.from_media("Which way does the red circle move?", videos=["clip.mp4"])
    model.generate(question, max_new_tokens=64, streamer=TextStreamer(model.tokenizer, skip_prompt=True))
    model.answer_loglikelihoods(question, ["left", "right", "up", "down"])  # [Likelihood(total, mean, tokens)]

A model directory is what the export stage writes: config.json and weights, the LLM tokenizer,
the CLIP tokenizer in clip_tokenizer/, and processor_config.json (chat template; frames and
kernels are read from config.json). Inputs are prepared as in training, in eval mode: frames at
segment middles, CLIP text = the question only. The prompt ends where the answer begins
(Vicuna's "ASSISTANT:" or the tokenizer template's generation prompt); a prompt that does not fit
the LLM's context is an error, never truncated.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from pipeline.data.collate import MODALITY_IDS, ProcessedSample, SampleProcessor, collate, expand_placeholders
from pipeline.data.media import decoder, frame_files
from pipeline.data.records import IMAGE_PLACEHOLDER, Sample, Turn
from pipeline.data.templates import IGNORE_INDEX, encode, encode_prefixed_answer
from pipeline.layout import CHECKSUMS, CLIP_TOKENIZER_DIR
from pipeline.model.check import verify_checksums
from pipeline.model.setup import load_directory_tokenizers, load_processor_settings, use_recipe_kernels
from ppllava import PPLLaVAConfig, PPLLaVAForConditionalGeneration
from ppllava.authors import is_authors_checkpoint
from ppllava.processing import placeholder_token_counts

logger = logging.getLogger(__name__)


class InferenceError(ValueError):
    """Bad input to inference: a missing model directory or media file, a prompt too long, ..."""


@dataclass
class Likelihood:
    """Log-likelihood of one answer given the prompt: sum over its tokens (the end-of-turn token
    included, as in training labels), per-token mean, and how many tokens were scored."""

    total: float
    mean: float
    tokens: int


@dataclass
class Question:
    """One question about zero or more media files: a video, an image, or several images."""

    text: str
    modality: str = "text"              # text | image | multi_image | video
    media: tuple[Path, ...] = ()
    answer_prefix: str = ""             # the assistant's answer starts with it (not scored), e.g. "Best option:("
    guide: str | None = None            # the text that guides pooling (default: the question)
    bounds: list[float] | None = None   # a video's (start, end) in seconds: frames from that part only
    frames: int | None = None           # frames sampled from the video (None: the model's)
    folder_fps: float | None = None     # a video given as a folder of frames: their rate (for bounds)
    frame_scheme: str | None = None     # which frames (pipeline.data.media.FRAME_SCHEMES; None: the model's)

    @classmethod
    def from_media(cls, text: str, videos: Sequence[str | Path] = (), images: Sequence[str | Path] = ()) -> "Question":
        """One video, one image, or several images (a multi-image sample); nothing: text only."""
        if videos and images:
            raise InferenceError("a question is about one video or about images, not both")
        if len(videos) > 1:
            raise InferenceError(f"one video per question, got {len(videos)}")
        paths = tuple(Path(p) for p in (*videos, *images))
        modality = "video" if videos else "image" if len(images) == 1 else "multi_image" if images else "text"
        return cls(text, modality, paths)

    @property
    def key(self) -> str:
        return ",".join(str(p) for p in self.media) or "<text>"

    def user_turn(self) -> Turn:
        """The question with one ``<image>`` per visual input (one for a video), in front unless
        the text places them itself."""
        needed = {"text": 0, "video": 1, "image": 1}.get(self.modality, len(self.media))
        found = self.text.count(IMAGE_PLACEHOLDER)
        if found == 0:
            return Turn("user", f"{IMAGE_PLACEHOLDER}\n" * needed + self.text)
        if found != needed:
            raise InferenceError(f"{self.key}: the question has {found} {IMAGE_PLACEHOLDER} placeholders but its "
                                 f"{self.modality} input needs {needed}")
        return Turn("user", self.text)


def read_media(question: Question) -> list[bytes]:
    """The media's bytes; a video given as a folder of frames gives its frames' bytes, in order
    (with bounds, those of frames round(start x fps) .. round(end x fps), counted from 1 as
    MVBench's frame folders are: the authors' arithmetic)."""
    if question.modality == "video" and question.media and question.media[0].is_dir():
        frames = frame_files(question.media[0])
        if not frames:
            raise InferenceError(f"frame folder {question.media[0]} holds no frames")
        if question.bounds is not None:
            if question.folder_fps is None:
                raise InferenceError(f"{question.key}: bounds on a folder of frames need its frame rate")
            first = max(1, round(question.bounds[0] * question.folder_fps))
            last = min(round(question.bounds[1] * question.folder_fps), len(frames))
            if first > last:
                raise InferenceError(f"{question.key}: bounds {question.bounds} s hold none of its {len(frames)} frames")
            frames = frames[first - 1:last]
        return [p.read_bytes() for p in frames]
    missing = [str(p) for p in question.media if not p.is_file()]
    if missing:
        raise InferenceError(f"media file not found: {', '.join(missing)}")
    return [p.read_bytes() for p in question.media]


class InferenceModel:
    """A loaded model directory: the model in eval mode, its tokenizers and its processor."""

    def __init__(self, model: PPLLaVAForConditionalGeneration, tokenizer, clip_tokenizer, processor: SampleProcessor,
                 directory: Path) -> None:
        self.model, self.tokenizer, self.clip_tokenizer = model, tokenizer, clip_tokenizer
        self.processor, self.directory = processor, directory
        self.config: PPLLaVAConfig = model.config
        self.device = next(model.parameters()).device
        self.image_token = self.config.image_token_index
        # The LLM's own context: inference prompts may be longer than the training max_length.
        self.max_length = getattr(self.config.text_config, "max_position_embeddings", None) or processor.settings.max_length
        configured = model.generation_config.eos_token_id
        configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
        self.eos_token_ids = sorted({*configured, tokenizer.eos_token_id} - {None})

    @property
    def num_frames(self) -> int:
        return self.processor.settings.num_frames or self.config.num_frames

    # -- inputs -------------------------------------------------------------------------------
    def pixels(self, question: Question) -> tuple[torch.Tensor, tuple[int, int]]:
        """Frames [T, 3, S, S] as the model sees them (eval sampling) and an image's (height, width)."""
        sample = Sample(question.key, question.modality, [str(p) for p in question.media], [question.user_turn()],
                        bounds=None if question.folder_fps else question.bounds)  # a folder's: read_media
        pixel_values, image_size = self.processor.pixels(sample, read_media(question), epoch=0, frames=question.frames,
                                                         scheme=question.frame_scheme)
        return pixel_values, tuple(int(v) for v in image_size)

    def encode(self, question: Question, answer: str | None, pixel_values: torch.Tensor,
               image_size: tuple[int, int]) -> tuple[list[int], list[int]]:
        """(input_ids, labels) with expanded image tokens: the prompt ending in the generation
        prompt (``answer`` None), or the conversation with ``answer`` labelled as in training."""
        template = self.processor.settings.template
        if question.answer_prefix:
            encoded = encode_prefixed_answer([question.user_turn()], question.answer_prefix, answer, self.tokenizer,
                                             self.image_token, template)
        else:
            turns = [question.user_turn()] + ([Turn("assistant", answer)] if answer is not None else [])
            encoded = encode(turns, self.tokenizer, self.image_token, template, add_generation_prompt=answer is None)
        modality = MODALITY_IDS[question.modality]
        counts = (placeholder_token_counts(self.config, modality, pixel_values.shape[0], image_size=image_size)
                  if question.modality != "text" else [])
        ids, labels = expand_placeholders(encoded.input_ids, encoded.labels, counts, self.image_token, question.key)
        if len(ids) > self.max_length:
            raise InferenceError(f"{question.key}: {len(ids)} tokens do not fit the LLM context of {self.max_length}")
        return ids, labels

    def _processed(self, question: Question, ids: list[int], pixel_values: torch.Tensor,
                   image_size: tuple[int, int]) -> ProcessedSample:
        guide = [Turn("user", question.guide)] if question.guide is not None else [question.user_turn()]
        sample = Sample(question.key, question.modality, [], guide)
        return ProcessedSample(question.key, MODALITY_IDS[question.modality], ids, [IGNORE_INDEX] * len(ids),
                               pixel_values, self.processor.clip_ids(sample), False, image_size)

    def _collated(self, samples: list[ProcessedSample], left_padded: bool = False) -> dict[str, torch.Tensor]:
        inputs = collate(samples, self.tokenizer.pad_token_id, self.clip_tokenizer.pad_token_id, self.image_token,
                         left_padded).inputs
        inputs.pop("labels")
        return {name: value.to(self.device) for name, value in inputs.items()}

    def _batch(self, question: Question, ids: list[int], pixel_values: torch.Tensor,
               image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self._collated([self._processed(question, ids, pixel_values, image_size)])

    def prompt_inputs(self, question: Question) -> dict[str, torch.Tensor]:
        """Model inputs of one question, ready for ``generate`` (batch of one, on the model's device)."""
        pixel_values, image_size = self.pixels(question)
        return self._batch(question, self.encode(question, None, pixel_values, image_size)[0], pixel_values, image_size)

    # -- scoring and generation -----------------------------------------------------------------
    @torch.no_grad()
    def answer_loglikelihoods(self, question: Question, answers: Sequence[str], batch_size: int = 8) -> list[Likelihood]:
        """log p(answer | media, question) of each answer, as labelled in training (answer tokens and
        the end-of-turn token). The media are decoded once and the prompt (visual tokens included)
        runs through the model once; its key/value cache is shared by the answers, scored
        ``batch_size`` at a time."""
        if not answers:
            raise InferenceError(f"{question.key}: no answers to score")
        pixel_values, image_size = self.pixels(question)
        encoded = [self.encode(question, answer, pixel_values, image_size) for answer in answers]
        # The longest prefix every answer's conversation shares, up to the first answer token.
        shared = min(next(i for i, t in enumerate(labels) if t != IGNORE_INDEX) for _, labels in encoded)
        reference = encoded[0][0]
        shared = next((i for i in range(shared) if any(ids[i] != reference[i] for ids, _ in encoded)), shared)
        prefix = self._batch(question, reference[:shared], pixel_values, image_size)
        output = self.model(**prefix, use_cache=True, logits_to_keep=1)
        first = output.logits[0, -1].float().log_softmax(-1)  # predicts each answer's first token
        results: list[Likelihood] = []
        for start in range(0, len(encoded), batch_size):
            chunk = [(ids[shared:], labels[shared:]) for ids, labels in encoded[start:start + batch_size]]
            rows, width = len(chunk), max(len(ids) for ids, _ in chunk)
            ids = torch.full((rows, width), self.tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((rows, shared + width), dtype=torch.long)
            mask[:, :shared] = 1
            for row, (row_ids, row_labels) in enumerate(chunk):
                ids[row, : len(row_ids)] = torch.tensor(row_ids)
                labels[row, : len(row_labels)] = torch.tensor(row_labels)
                mask[row, shared: shared + len(row_ids)] = 1
            cache = copy.deepcopy(output.cache)
            cache.batch_repeat_interleave(rows)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                cache=cache, use_cache=True).logits.float()
            # Position j predicts token j + 1; token 0 is predicted by the prompt's last position.
            predicting = torch.cat([first.expand(rows, 1, -1), logits[:, :-1].log_softmax(-1)], dim=1)
            labels = labels.to(self.device)
            scored = labels != IGNORE_INDEX
            token_logprobs = predicting.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * scored
            for total, count in zip(token_logprobs.sum(1).tolist(), scored.sum(1).tolist()):
                results.append(Likelihood(total, total / count, int(count)))
        return results

    @torch.no_grad()
    def generate(self, question: Question, max_new_tokens: int = 64, streamer=None,
                 inputs: dict[str, torch.Tensor] | None = None) -> str:
        """Greedy answer (``streamer``: a transformers TextStreamer, fed token by token)."""
        inputs = inputs if inputs is not None else self.prompt_inputs(question)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                     eos_token_id=self.eos_token_ids, pad_token_id=self.tokenizer.pad_token_id,
                                     # an image token without pixels would stop the next step
                                     suppress_tokens=[self.image_token])
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def prepare(self, question: Question) -> ProcessedSample:
        """A question's model inputs (its media decoded, its prompt encoded), ready to be batched."""
        pixel_values, image_size = self.pixels(question)
        ids, _ = self.encode(question, None, pixel_values, image_size)
        return self._processed(question, ids, pixel_values, image_size)

    @torch.no_grad()
    def generate_batch(self, questions: Sequence[Question | ProcessedSample], max_new_tokens: int = 64) -> list[str]:
        """Greedy answers of several questions (or their ``prepare``d inputs) in one generation: the
        prompts left-padded into one batch (each with its own media and pooling text), one key/value
        cache, every row stepping until it ends or all do. The answers equal ``generate``'s one at a
        time (up to the last bits of float arithmetic, which can flip a near tie between two tokens)."""
        samples = [q if isinstance(q, ProcessedSample) else self.prepare(q) for q in questions]
        inputs = self._collated(samples, left_padded=True)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=self.eos_token_ids, pad_token_id=self.tokenizer.pad_token_id,
                                     suppress_tokens=[self.image_token])
        start = inputs["input_ids"].shape[1]
        return [self.tokenizer.decode(row[start:], skip_special_tokens=True).strip() for row in output]


def round_rotary_frequencies(module: torch.nn.Module, dtype: torch.dtype = torch.float16) -> int:
    """Round every rotary embedding's inverse frequencies in ``module`` to ``dtype``, kept in their
    own dtype; returns how many embeddings it rounded. The authors' benchmark scripts build the
    model with ``from_config`` and cast it to fp16 before loading the weights, which leaves RoPE's
    frequencies (a buffer, computed at build time, never loaded) in fp16: ``eval.authors_rope_rounding``
    reproduces their logits from a converted release. Their demo keeps fp32; so does ours by default."""
    rounded = 0
    for child in module.modules():
        for name in ("inv_freq", "original_inv_freq"):
            frequencies = getattr(child, name, None)
            if isinstance(frequencies, torch.Tensor):
                setattr(child, name, frequencies.to(dtype).to(frequencies.dtype))
                rounded += name == "inv_freq"
    return rounded


def load_for_inference(directory: str | Path, backend, local_rank: int = 0, num_frames: int | None = None,
                       video_kernel: Sequence[int] | None = None, video_decoder: str = "pyav",
                       kernels="auto", attn_implementation: str | None = None) -> InferenceModel:
    """``load_model_dir`` as eval and chat both need it: on ``backend``'s device for ``local_rank``,
    in its inference precision, with its attention and the LLM's fused ``kernels`` (a recipe's
    ``model.kernels`` / ``model.attn_implementation``); an export's checksums are verified first
    (a corrupted shard would load silently), ModelFilesError where they differ."""
    directory = Path(directory)
    if (directory / CHECKSUMS).is_file():
        verify_checksums(directory)
    loaded = load_model_dir(directory, num_frames, video_kernel, device=backend.device(local_rank),
                            dtype=backend.resolve_dtype(backend.inference_precision, local_rank),
                            attn_implementation=attn_implementation or backend.attn_implementation,
                            video_decoder=video_decoder)
    use_recipe_kernels(loaded.model, backend, kernels, attn_implementation)
    return loaded


def load_model_dir(directory: str | Path, num_frames: int | None = None, video_kernel: Sequence[int] | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None, video_decoder: str = "pyav") -> InferenceModel:
    """A model directory (export / save_pretrained layout) ready for inference.

    ``num_frames`` and ``video_kernel`` override the trained ones (stride = kernel), e.g. 64 frames
    with (4, 3, 3): the processor and the model's pooling read the same overridden config, so the
    image-token count always matches the pooled tokens.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        what = "does not exist" if not directory.exists() else "has no config.json"
        raise InferenceError(f"model directory {directory} {what}: expected an export (config.json, weights, "
                             f"tokenizer, {CLIP_TOKENIZER_DIR}/, processor_config.json)")
    if is_authors_checkpoint(directory):
        raise InferenceError(f"{directory} is one of the authors' released checkpoints: convert it once with "
                             f"`python -m ppllava.convert authors {directory} OUT_DIR` (docs/model.md) and use OUT_DIR")
    config = PPLLaVAConfig.from_pretrained(directory)
    if num_frames is not None:
        if num_frames < 1:
            raise InferenceError(f"num_frames must be positive, got {num_frames}")
        config.num_frames = int(num_frames)
    if video_kernel is not None:
        kernel = [int(k) for k in video_kernel]
        if len(kernel) != 3 or min(kernel) < 1:
            raise InferenceError(f"video_kernel must be three positive integers (t, h, w), got {list(video_kernel)}")
        config.video_kernel, config.video_stride = kernel, list(kernel)
    tokenizer, clip_tokenizer = load_directory_tokenizers(directory)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = PPLLaVAForConditionalGeneration.from_pretrained(directory, config=config, dtype=dtype, **extra)
    model.to(device).eval()
    settings = load_processor_settings(directory)
    settings.num_frames = config.num_frames
    processor = SampleProcessor(config, tokenizer, clip_tokenizer, settings, video_decoder=decoder(video_decoder))
    logger.info("loaded %s: %d frames per video, video kernel %s, template %s, on %s (%s)", directory,
                config.num_frames, tuple(config.video_kernel), settings.template, device, str(dtype).replace("torch.", ""))
    return InferenceModel(model, tokenizer, clip_tokenizer, processor, directory)
