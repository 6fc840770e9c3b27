"""A training checkpoint (any world size, ZeRO stage or device) -> one full model on CPU.

A checkpoint's training_state/ holds every parameter whole (fp32 master weights for the trained
ones, the frozen ones as the module held them) and the buffers (``backends.portable_state``), read
here in one process without DeepSpeed. Checkpoints of earlier versions hold DeepSpeed's own
layout instead: its offline reader (``zero_to_fp32``) merges their ranks' shards (a ZeRO-0 one has
no partitioned optimizer: its module state holds every weight). The model skeleton comes from the
stage's weightless model directory (config.json). Loading is strict: a missing or unexpected
tensor is an error naming every one. The model is built in ``dtype`` as ``from_pretrained`` builds
it (RoPE's ``inv_freq`` stays fp32, which ``.to(bf16)`` would round), so that a saved and reloaded
copy computes the same logits bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path

import torch

from backends.portable_state import PortableStateError, portable_state_dict
from pipeline.layout import CLIP_TOKENIZER_DIR, DEEPSPEED_TAG, PROCESSOR_CONFIG, TRAINING_STATE
from ppllava import PPLLaVAConfig, PPLLaVAForConditionalGeneration
from ppllava.lora import add_lora, load_lora_config, lora_parameters, merge_lora

logger = logging.getLogger(__name__)


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's model, full size, on CPU, whatever world size wrote it."""
    if (Path(step_dir) / TRAINING_STATE).is_dir():
        try:
            return portable_state_dict(Path(step_dir) / TRAINING_STATE)
        except PortableStateError as error:
            raise ValueError(str(error)) from None
    deepspeed_dir = Path(step_dir) / DEEPSPEED_TAG
    if any(deepspeed_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints every step of its work
            return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DEEPSPEED_TAG)
    module_states = deepspeed_dir / "mp_rank_00_model_states.pt"
    if not module_states.is_file():
        raise ValueError(f"{deepspeed_dir} holds no DeepSpeed checkpoint (no optimizer shards, no {module_states.name})")
    return torch.load(module_states, map_location="cpu", weights_only=False)["module"]


def model_from_state_dict(state: dict[str, torch.Tensor], model_dir: Path,
                          dtype: torch.dtype = torch.float32) -> PPLLaVAForConditionalGeneration:
    """The model of ``model_dir`` with ``state`` loaded strictly; trained with LoRA (the directory
    records its adapter_config.json), the adapters are loaded, then merged into the plain model."""
    from transformers.initialization import no_init_weights

    config = PPLLaVAConfig.from_pretrained(str(model_dir))
    with no_init_weights():  # every weight comes from the checkpoint
        model = PPLLaVAForConditionalGeneration._from_config(config, dtype=dtype)
    lora = load_lora_config(model_dir)
    if lora is not None:
        add_lora(model, lora)
        for _, parameter in lora_parameters(model):  # PEFT makes them in the base layer's dtype: merge from fp32
            parameter.data = parameter.data.float()
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"the weights do not fit the model of {model_dir}: missing {missing}, unexpected {unexpected}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # shapes
        raise ValueError(f"the weights do not fit the model of {model_dir}: {error}") from None
    if lora is not None:
        merge_lora(model)
    return model.eval()


def consolidated_model(step_dir: Path, model_dir: Path, dtype: torch.dtype = torch.float32) -> PPLLaVAForConditionalGeneration:
    try:
        return model_from_state_dict(consolidated_state_dict(step_dir), model_dir, dtype)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"{step_dir}: {error}") from None


def copy_model_files(source: Path, target: Path) -> None:
    """Tokenizers and processor settings of a model directory (everything but config and weights)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name == CLIP_TOKENIZER_DIR:
            shutil.copytree(path, target / path.name, dirs_exist_ok=True)
        elif path.is_file() and (path.name.startswith("tokenizer") or path.name in (PROCESSOR_CONFIG, "special_tokens_map.json", "chat_template.jinja")):
            shutil.copy2(path, target / path.name)
