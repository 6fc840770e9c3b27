"""A training checkpoint (ZeRO-sharded, any world size) -> one full model on CPU.

DeepSpeed's own offline reader (``zero_to_fp32``) merges the fp32 master weights of every rank,
the frozen parameters and the buffers; the model skeleton comes from the stage's weightless
model directory (config.json). Loading is strict: a missing or unexpected tensor is an error.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from pipeline.checkpoint import DEEPSPEED_TAG
from pipeline.model_setup import CLIP_TOKENIZER_DIR, PROCESSOR_CONFIG
from ppllava import PPLLaVAConfig, PPLLaVAForConditionalGeneration

logger = logging.getLogger(__name__)


def consolidated_model(step_dir: Path, model_dir: Path, dtype: torch.dtype = torch.float32) -> PPLLaVAForConditionalGeneration:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DEEPSPEED_TAG)
    model = PPLLaVAForConditionalGeneration(PPLLaVAConfig.from_pretrained(str(model_dir)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{step_dir} does not fit the model of {model_dir}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(dtype).eval()


def copy_model_files(source: Path, target: Path) -> None:
    """Tokenizers and processor settings of a model directory (everything but config and weights)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name == CLIP_TOKENIZER_DIR:
            shutil.copytree(path, target / path.name, dirs_exist_ok=True)
        elif path.is_file() and (path.name.startswith("tokenizer") or path.name in (PROCESSOR_CONFIG, "special_tokens_map.json", "chat_template.jinja")):
            shutil.copy2(path, target / path.name)
