"""LoRA on PPLLaVA's language model, through PEFT (``peft``): adapters injected into the model in
place (its parameter names gain ``.lora_A.default`` / ``.lora_B.default``; no wrapper class), and
merged back into plain linear layers for export.

Only the LLM's linear layers are adapted (by default all of them but the output head: attention
and MLP projections, what LLaVA-NeXT's and LLaMA-Factory's ``all-linear`` means); the vision tower,
the CLIP towers and the projector train fully or not at all, as ``set_trainable_parts`` says.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file name: what the LoRA of a weightless model directory was
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"


def _peft():
    import peft  # imported when LoRA is used: it pulls in accelerate

    return peft


def llm_linear_names(model: torch.nn.Module) -> list[str]:
    """The last name part of every linear layer of the LLM but its output head (q_proj, ...)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.language_model.named_modules()
             if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}
    return sorted(names)


def lora_config(model: torch.nn.Module, rank: int, alpha: float, dropout: float,
                target_modules: list[str] | None = None):
    """PEFT's LoraConfig for the LLM's linear layers named ``target_modules`` (their last name
    part; None: all but the output head). A name that is no linear layer of the LLM is refused."""
    available = llm_linear_names(model)
    targets = available if target_modules is None else list(target_modules)
    unknown = sorted(set(targets) - set(available))
    if unknown or not targets:
        raise ValueError(f"LoRA target_modules {unknown or targets} are not linear layers of the LLM; "
                         f"it has {available}")
    # a full-name pattern: CLIP's towers have q_proj / k_proj too, and must not be adapted
    pattern = r"language_model\.(?!lm_head).*\.(" + "|".join(map(re.escape, targets)) + r")"
    return _peft().LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")


def add_lora(model: torch.nn.Module, config) -> torch.nn.Module:
    """Inject LoRA adapters (``config``: ``lora_config``) into ``model`` in place; returns it.
    PEFT freezes every other parameter: call ``set_trainable_parts`` then ``train_lora`` after."""
    _peft().inject_adapter_in_model(config, model)
    return model


def is_adapter(name: str) -> bool:
    """Whether a parameter or state-dict name is a LoRA adapter's (``...q_proj.lora_A.default.weight``)."""
    return ".lora_" in name


def lora_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if is_adapter(name)]


def train_lora(model: torch.nn.Module) -> None:
    """The adapters train (``set_trainable_parts`` leaves them as the LLM's switch says)."""
    found = lora_parameters(model)
    if not found:
        raise ValueError("the model has no LoRA adapters")
    for _, parameter in found:
        parameter.requires_grad_(True)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run ``model`` as it was before its adapters (their layers pass the base layer's output
    through): DPO's reference is the LoRA policy with its adapters off, no second copy in memory."""
    layers = [module for module in model.modules() if isinstance(module, _peft().tuners.tuners_utils.BaseTunerLayer)]
    if not layers:
        raise ValueError("the model has no LoRA adapters to disable")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its linear layer (W + B A x alpha / r) and put the plain layer back:
    the model PPLLaVA's own class loads, computing what the adapted one computed."""
    tuner_layer = _peft().tuners.tuners_utils.BaseTunerLayer
    adapted = [(name, module) for name, module in model.named_modules() if isinstance(module, tuner_layer)]
    with torch.no_grad():
        for name, module in adapted:
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    return model


def save_lora_config(config, directory: Path) -> None:
    config.save_pretrained(str(directory))


def load_lora_config(directory: Path):
    """The LoraConfig a model directory records (``adapter_config.json``), or None."""
    if not (Path(directory) / ADAPTER_CONFIG).is_file():
        return None
    return _peft().LoraConfig.from_pretrained(str(directory))


def peft_adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a state dict (ours: ``...q_proj.lora_A.default.weight``) under the names PEFT
    saves them (``base_model.model....q_proj.lora_A.weight``: its wrapper's prefix, no adapter name)."""
    return {"base_model.model." + name.replace(f".{ADAPTER_NAME}.", "."): tensor.contiguous()
            for name, tensor in state.items() if is_adapter(name)}


def save_adapter(config, state: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    """The adapters alone, in PEFT's own format: ``peft.PeftModel.from_pretrained(<the model they
    were trained on>, directory)`` applies them. Returns what was written (PEFT's names)."""
    from safetensors.torch import save_file

    tensors = peft_adapter_tensors(state)
    if not tensors:
        raise ValueError("no LoRA adapters in this state")
    Path(directory).mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(tensors, str(Path(directory) / ADAPTER_WEIGHTS))
    return tensors
