"""Shared test helpers: tiny models and hand-built interleaved batches (nothing downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

# The tiny tokenizer and config live in the pipeline (the CPU demo trains with them too).
from pipeline.model.tiny import TINY_CHAT_TEMPLATE, tiny_config_for, tiny_tokenizer  # noqa: F401
from ppllava import IMAGE, MULTI_IMAGE, TEXT, VIDEO, PPLLaVAConfig, PPLLaVAForConditionalGeneration
from ppllava.processing import expand_image_placeholders, placeholder_token_counts


def tiny_model(seed: int = 0, **overrides) -> PPLLaVAForConditionalGeneration:
    torch.manual_seed(seed)
    return PPLLaVAForConditionalGeneration(PPLLaVAConfig.tiny(**overrides)).eval()


def tiny_model_directory(directory: Path, seed: int = 0) -> Path:
    """A random tiny PPLLaVA in the export layout (weights, tokenizers, processor_config.json)."""
    from pipeline.model.setup import save_processor_config, save_tokenizers
    from pipeline.recipe import Recipe

    tokenizer = tiny_tokenizer()
    config = tiny_config_for(tokenizer)
    torch.manual_seed(seed)
    PPLLaVAForConditionalGeneration(config).save_pretrained(directory)
    save_tokenizers(tokenizer, tokenizer, directory)
    save_processor_config(Recipe(name="tiny", run_dir=str(directory)), config, directory)
    return Path(directory)


# (height, width) of a tiny-config image with base + 1x2 tiles (3 frames) or base + 2x2 tiles (5).
IMAGE_SIZES = {3: (40, 96), 5: (90, 96)}


def build_batch(config: PPLLaVAConfig, samples: list[tuple[int, int]], seed: int = 0, text_len: int = 6, answer_len: int = 5):
    """An interleaved batch, right-padded: one (modality, frames) pair per sample.

    Each sample: BOS, prompt words, its placeholders (one per image for multi-image), more
    prompt words, then an answer whose tokens are the only labelled ones.
    """
    generator = torch.Generator().manual_seed(seed)
    image_token = config.image_token_index
    vocab = config.text_config.vocab_size
    size = config.vision_config.image_size
    sequences, label_rows, pixels, counts, modalities, clip_rows, sizes = [], [], [], [], [], [], []
    for modality, frames in samples:
        words = lambda n: torch.randint(3, vocab - 1, (n,), generator=generator).tolist()  # noqa: E731
        placeholders = frames if modality == MULTI_IMAGE else (1 if modality != TEXT else 0)
        prompt = [config.text_config.bos_token_id] + words(text_len // 2) + [image_token] * placeholders + words(text_len - text_len // 2)
        size_of_image = IMAGE_SIZES[frames] if modality == IMAGE else (0, 0)
        sizes.append(size_of_image)
        if modality != TEXT:
            counts_here = placeholder_token_counts(config, modality, frames, image_size=size_of_image if modality == IMAGE else None)
            prompt = expand_image_placeholders(prompt, counts_here, image_token)
        answer = words(answer_len) + [config.text_config.eos_token_id]
        sequences.append(prompt + answer)
        label_rows.append([-100] * len(prompt) + answer)
        pixels.append(torch.randn(frames, 3, size, size, generator=generator))
        counts.append(frames)
        modalities.append(modality)
        clip = torch.randint(1, config.clip_text_config.vocab_size - 2, (10,), generator=generator)
        clip[-1] = config.clip_text_config.eos_token_id
        clip_rows.append(clip)
    length = max(len(s) for s in sequences)
    pad = config.text_config.pad_token_id
    input_ids = torch.full((len(samples), length), pad)
    labels = torch.full((len(samples), length), -100)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, (sequence, label) in enumerate(zip(sequences, label_rows)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, : len(label)] = torch.tensor(label)
        attention_mask[row, : len(sequence)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.cat(pixels),
        "frame_counts": torch.tensor(counts),
        "modalities": torch.tensor(modalities),
        "clip_input_ids": torch.stack(clip_rows),
        "clip_attention_mask": torch.ones(len(samples), 10, dtype=torch.long),
        "image_sizes": torch.tensor(sizes, dtype=torch.long),
    }


INTERLEAVED = [(VIDEO, 8), (IMAGE, 3), (MULTI_IMAGE, 3)]


@pytest.fixture
def model():
    return tiny_model()


# -- running the pipeline's command line -----------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def pipeline_env(**extra: str) -> dict:
    """This environment without launcher variables of its own (a test's process is no rank), plus ``extra``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        env.pop(name, None)
    return {**env, **extra}


def run_pipeline(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT, env=env or pipeline_env(),
                          capture_output=True, text=True, timeout=timeout)


def write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def training_recipe(run_dir: Path, manifest: Path, **sft) -> dict:
    """A short SFT of the tiny model on shards made beforehand (no data stages), every step logged;
    two loader workers, so resumes also test the workers' order of batches."""
    settings = {"zero_stage": 2, "precision": "fp32", "global_batch_size": 4, "micro_batch_size": 2, "lr": 2e-3,
                "warmup_ratio": 0.1, "epochs": 10, "max_steps": 8, "log_every": 1, "save_every": 100, "keep_last": 3}
    settings.update(sft)
    return {"name": "resume_test", "run_dir": str(run_dir), "backend": "cpu", "seed": 0, "model": {"source": "tiny"},
            "data": {"manifest": str(manifest), "num_workers": 2, "max_length": 512, "shuffle_buffer": 8},
            "sft": settings}


def saved_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint's training_state/ holds, read straight from its files: the fp32
    master weights of the trained parameters, the frozen ones, the buffers (what an export of it
    must hold)."""
    state_dir = Path(step_dir) / "training_state"
    index = json.loads((state_dir / "index.json").read_text())
    found = {}
    for part in sorted(state_dir.glob("part_*.pt")):
        found.update({name: tensors["value"] for name, tensors in torch.load(part, weights_only=True).items()})
    found.update({alias: found[name] for alias, name in index["aliases"].items()})
    found.update(torch.load(state_dir / "buffers.pt", weights_only=True))
    return found


def small_shards(root: Path, dpo_pairs: int = 0, seed: int = 2, **counts: int) -> Path:
    """Synthetic data of every modality (and DPO pairs if asked), 48 px, 8 frames, sharded 4 samples
    a tar; ``counts``: other numbers of videos, images, multi_images. Returns the manifest path."""
    from pipeline.data.synthetic import SynthSettings, generate
    from pipeline.data.sharding import ShardSettings, run_shard

    counts = {"videos": 12, "images": 8, "multi_images": 6, **counts}
    generate(root / "synth", SynthSettings(seed=seed, **counts, eval_questions=0, dpo_pairs=dpo_pairs, size=48,
                                           frames=8))
    cards = [str(p) for p in sorted((root / "synth" / "cards").glob("*.yaml")) if dpo_pairs or "dpo" not in p.name]
    run_shard(cards, root / "shards", ShardSettings(max_samples_per_shard=4, num_frames=8))
    return root / "shards" / "manifest.json"
