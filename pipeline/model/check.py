"""Checks of a model directory: logits on a fixed probe input, and the files' checksums.

    probe_inputs(config)    one right-padded interleaved batch (video + any-res image + 2-image
                            set) made from the config alone, the same in every process and run
    probe_logits(model)     the model's logits on it (no grad, eval mode)
    write_checksums(dir)    SHA256SUMS in `sha256sum -c` format: every file below dir
    verify_checksums(dir)   ModelFilesError naming each missing, truncated or corrupted file

safetensors carries no checksum: a flipped byte in a shard loads silently as a wrong weight, so
an export records its files' sha256 and whoever loads it can check them first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.atomic import file_problems, sha256_of
from pipeline.layout import CHECKSUMS, COMPLETE

from ppllava import IMAGE, MULTI_IMAGE, VIDEO, PPLLaVAConfig
from ppllava.processing import expand_image_placeholders, image_grid, placeholder_token_counts



class ModelFilesError(RuntimeError):
    """A model directory whose files are missing or differ from the checksums written with it."""


def probe_inputs(config: PPLLaVAConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A video of two pooled time steps, an image of the smallest any-res grid and a set of two
    images, each with a few prompt words around its placeholders, random pixels and CLIP text."""
    generator = torch.Generator().manual_seed(seed)
    text, image_token = config.text_config, config.image_token_index
    side = config.vision_config.image_size
    image_size = tuple(config.image_grid_pinpoints[0])
    rows, cols = image_grid(image_size, config)
    samples = [(VIDEO, 2 * config.video_kernel[0]), (IMAGE, 1 + rows * cols), (MULTI_IMAGE, 2)]

    def words(count: int) -> list[int]:
        ids = torch.randint(3, text.vocab_size, (count,), generator=generator)
        return ids.masked_fill(ids == image_token, 3).tolist()

    start = [] if text.bos_token_id is None else [text.bos_token_id]
    sequences, pixels = [], []
    for modality, frames in samples:
        placeholders = frames if modality == MULTI_IMAGE else 1
        prompt = start + words(3) + [image_token] * placeholders + words(3)
        counts = placeholder_token_counts(config, modality, frames,
                                          image_size=image_size if modality == IMAGE else None)
        sequences.append(expand_image_placeholders(prompt, counts, image_token) + words(4))
        pixels.append(torch.randn(frames, 3, side, side, generator=generator))
    clip = torch.randint(1, config.clip_text_config.vocab_size - 2, (len(samples), 10), generator=generator)
    clip[:, -1] = config.clip_text_config.eos_token_id
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(samples), length), text.pad_token_id or 0)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": torch.cat(pixels),
            "frame_counts": torch.tensor([frames for _, frames in samples]),
            "modalities": torch.tensor([modality for modality, _ in samples]),
            "clip_input_ids": clip, "clip_attention_mask": torch.ones_like(clip),
            "image_sizes": torch.tensor([(0, 0), image_size, (0, 0)], dtype=torch.long)}


@torch.no_grad()
def probe_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    model.eval()
    return model(**(inputs or probe_inputs(model.config))).logits


def write_checksums(directory: Path) -> Path:
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (CHECKSUMS, COMPLETE))
    lines = [f"{sha256_of(path)}  {path.relative_to(directory).as_posix()}\n" for path in files]
    (directory / CHECKSUMS).write_text("".join(lines))
    return directory / CHECKSUMS


def verify_checksums(directory: Path) -> None:
    """Every file SHA256SUMS lists is present with its recorded sha256, or ModelFilesError."""
    directory = Path(directory)
    listing = directory / CHECKSUMS
    if not listing.is_file():
        raise ModelFilesError(f"{directory} has no {CHECKSUMS}: not an export of this pipeline, or incomplete")
    lines = (line.split("  ", 1) for line in listing.read_text().splitlines())  # `sha256sum` format: digest, name
    recorded = [(name, None, digest) for digest, name in lines]
    problems = file_problems(directory, recorded, True, f"{CHECKSUMS} (written at export)")
    if problems:
        raise ModelFilesError(f"{directory}: " + "; ".join(problems) + "; export the model again or restore the files")


def directory_fingerprint(directory: Path) -> dict:
    """What a model directory's contents are, cheaply: its SHA256SUMS (an export's) when present,
    else every file's size and modification time. A stage reading the directory re-runs when it
    changes (a re-export, a re-conversion)."""
    directory = Path(directory)
    if (directory / CHECKSUMS).is_file():
        return {CHECKSUMS: (directory / CHECKSUMS).read_text()}
    return {str(p.relative_to(directory)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(directory.rglob("*")) if p.is_file()}
