"""Which implementation of each LLM op runs on each device row: a registry of fused kernels, each
with the reference it must equal, the limits it documents, and a tolerance.

    kernels = resolve(backend.kernels, recipe.model.kernels)   # {"attention": ..., "rms_norm": ...}
    use_kernels(model.language_model, kernels)                  # before the DeepSpeed engine wraps it
    fallback_counts()                                           # calls that ran the reference instead

Ops (the LLM's; the vision tower's attention has no mask and already reaches the fused kernel
through SDPA on CUDA and NPU, and fused AdamW is DeepSpeed's, so neither is wrapped here):

    attention   reference: transformers' ``sdpa``    NPU: npu_fusion_attention    CUDA: flash_attention_2 if installed
    rms_norm    reference: the HF module's forward   NPU: npu_rms_norm            CUDA, CPU: the reference

A call whose shapes or dtype fall outside a kernel's ``supports`` runs the reference, with one
warning per reason and a count in ``fallback_counts()`` (training logs it as
``kernel_fallbacks/<op>``), never an error and never a silent slow path.

Not registered, on purpose: ``npu_rotary_mul`` (transformers' Llama applies rotary embeddings through
a module-level function; replacing it would patch transformers for the whole process, the kind of
global patch ``transfer_to_npu`` is refused for) and ``npu_swiglu`` (it takes the gate and up
projections concatenated, a different weight layout from the checkpoints). docs/ascend.md §5.

No NPU is reachable from CI: the NPU wrappers run there against an emulator of the ops' documented
semantics (tests/unit/fake_torch_npu.py), and every torch_npu name and keyword used here is checked
against the released wheel (tests/unit/test_npu_api.py). Imports nothing from ppllava or pipeline.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

logger = logging.getLogger(__name__)

OPS = ("attention", "rms_norm")
REFERENCE = {"attention": "sdpa", "rms_norm": "reference"}
# The name our NPU attention is registered under in transformers' attention and mask interfaces.
NPU_ATTENTION = "npu_fusion_attention"

# npu_fusion_attention's documented limits (torch_npu 2.14 op docs, `torch_npu/_op_plugin_docs.py`;
# tests/unit/test_npu_api.py reads them there): Nq 1..256 and a multiple of Nkv, head dim
# Dq = Dk >= Dv up to 768, S up to 1M, B up to 2M; masks bool or uint8 with 1 = masked, shaped
# BNSS, B1SS, 11SS or SS; sparse_mode 3 (right-down causal) takes a 2048 x 2048 upper-triangular mask.
FUSION_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADS, MAX_HEAD_DIM, MAX_SEQUENCE, MAX_BATCH = 256, 768, 2**20, 2**21
CAUSAL_BLOCK = 2048
RMS_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_fallbacks: Counter = Counter()
_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Kernel:
    """One implementation of one op.

    forward: ours, called as the op is (attention: transformers' attention-interface signature;
        rms_norm: ``(module, hidden_states)``); None for transformers' own implementation of ``name``.
    supports: ``(*the op's tensors) -> None`` where this kernel runs them, else the reason it cannot.
    tolerance: relative L2 distance from the fp32 reference allowed, by the dtype it runs in.
    requires: the package it needs at run time (None: torch and transformers only).
    """

    op: str
    name: str
    forward: Callable | None = None
    supports: Callable[..., str | None] | None = None
    tolerance: Mapping[torch.dtype, float] = field(
        default_factory=lambda: {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 1e-2})
    requires: str | None = None


def fallback_counts() -> dict[str, int]:
    """How many calls of each op ran the reference because the shapes left the kernel's limits."""
    return {op: _fallbacks[op] for op in OPS}


def _fall_back(op: str, name: str, reason: str) -> None:
    _fallbacks[op] += 1
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        logger.warning("%s: %s cannot run this call (%s); running the reference instead (counted in "
                       "kernel_fallbacks/%s; warned once per reason)", op, name, reason, op)


def _torch_npu() -> types.ModuleType:
    return importlib.import_module("torch_npu")


# --- attention ---------------------------------------------------------------------------------


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def fusion_attention_supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None) -> str | None:
    """None where npu_fusion_attention runs these BNSD tensors as documented, else why not."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return f"inputs of rank {query.dim()}, expected 4 (BNSD)"
    if query.dtype not in FUSION_ATTENTION_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype}/{key.dtype}/{value.dtype}, expected one of fp16, bf16, fp32 for all three"
    batch, heads, sequence, head_dim = query.shape
    if key.shape != value.shape:
        return f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in shape"
    if key.shape[0] != batch or key.shape[3] != head_dim:
        return f"query {tuple(query.shape)} and key {tuple(key.shape)} differ in batch or head dim"
    if not 1 <= heads <= MAX_HEADS or heads % key.shape[1]:
        return f"{heads} query heads over {key.shape[1]} key heads (limit {MAX_HEADS}, and a whole multiple)"
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} (limit {MAX_HEAD_DIM})"
    if max(sequence, key.shape[2]) > MAX_SEQUENCE or batch > MAX_BATCH:
        return f"batch {batch}, sequence {sequence}/{key.shape[2]} (limits {MAX_BATCH}, {MAX_SEQUENCE})"
    if attention_mask is not None:
        if attention_mask.dtype not in (torch.bool, torch.uint8):
            return f"a {attention_mask.dtype} attention mask (the kernel takes bool or uint8)"
        forms = {(batch, heads, sequence, key.shape[2]), (batch, 1, sequence, key.shape[2]),
                 (1, 1, sequence, key.shape[2])}
        if tuple(attention_mask.shape) not in forms:
            return f"an attention mask shaped {tuple(attention_mask.shape)} (expected BNSS, B1SS or 11SS)"
    return None


_causal_blocks: dict[torch.device, torch.Tensor] = {}
# The mask of the forward pass in progress and whether it has rows with nothing to attend to:
# computed once per forward by the mask function, read by each layer (one host sync, not 32).
_current_mask: tuple[Any, bool] = (lambda: None, False)


def _causal_block(device: torch.device) -> torch.Tensor:
    """sparse_mode 3's compressed causal mask: 2048 x 2048, True (masked) above the diagonal."""
    if device not in _causal_blocks:
        _causal_blocks[device] = torch.triu(torch.ones(CAUSAL_BLOCK, CAUSAL_BLOCK, dtype=torch.bool, device=device), 1)
    return _causal_blocks[device]


def _has_empty_rows(attention_mask: torch.Tensor) -> bool:
    """Query rows that may attend to nothing (left padding): the kernel needs inner_precise=2 for
    them, or it returns NaN there, and a NaN row poisons every row that reads its value."""
    remembered, empty = _current_mask
    if remembered() is attention_mask:
        return empty
    return _any_empty_row(attention_mask)


def _any_empty_row(attention_mask: torch.Tensor) -> bool:
    return bool((~attention_mask.bool()).all(dim=-1).any())  # one host sync


def npu_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' SDPA mask (bool, True = attend; None where causality alone suffices), noting
    once per forward whether it has empty rows. Registered in the attention-mask interface: an
    implementation registered only in the attention interface is handed no mask at all."""
    global _current_mask
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    if mask is not None:
        _current_mask = (weakref.ref(mask), _any_empty_row(mask))
    return mask


def npu_fusion_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-interface call on torch_npu's FlashAttentionScore kernel (BNSD in,
    BSND out, as SDPA's path returns). GQA runs natively (no repeat of the key heads)."""
    reason = fusion_attention_supports(query, key, value, attention_mask)
    if reason is not None:
        _fall_back("attention", NPU_ATTENTION, reason)
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kwargs)
    torch_npu = _torch_npu()
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    mask, sparse_mode, inner_precise = None, 0, 0
    if attention_mask is not None:
        mask = ~attention_mask.bool()  # transformers: True = attend; the kernel: True = masked
        inner_precise = 2 if _has_empty_rows(attention_mask) else 0
    elif causal and query.shape[2] > 1:
        # Right-down aligned, as transformers' causal mask is when the cache holds earlier keys.
        mask, sparse_mode = _causal_block(query.device), 3
    output = torch_npu.npu_fusion_attention(
        query, key, value, query.shape[1], "BNSD", atten_mask=mask,
        scale=query.shape[-1] ** -0.5 if scaling is None else scaling, keep_prob=1.0 - dropout,
        inner_precise=inner_precise, sparse_mode=sparse_mode)[0]
    return output.transpose(1, 2).contiguous(), None


# --- RMSNorm -----------------------------------------------------------------------------------


def is_rms_norm(module: torch.nn.Module) -> bool:
    """The LLM's RMSNorm modules (LlamaRMSNorm and its kin: a weight and ``variance_epsilon``)."""
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def reference_rms_norm(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The HF module's own forward (its class's, whatever its instance has been given)."""
    return type(module).forward(module, hidden_states)


def rms_norm_supports(hidden_states: torch.Tensor, weight: torch.Tensor) -> str | None:
    if hidden_states.dtype not in RMS_NORM_DTYPES or weight.dtype != hidden_states.dtype:
        return f"input {hidden_states.dtype} with weight {weight.dtype} (expected one of fp16, bf16, fp32, the same)"
    if not 2 <= hidden_states.dim() <= 8 or tuple(weight.shape) != tuple(hidden_states.shape[-weight.dim():]):
        return f"input {tuple(hidden_states.shape)} with weight {tuple(weight.shape)} (2-8 dims, weight the last)"
    return None


def npu_rms_norm_forward(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    reason = rms_norm_supports(hidden_states, module.weight)
    if reason is not None:
        _fall_back("rms_norm", "npu_rms_norm", reason)
        return reference_rms_norm(module, hidden_states)
    torch_npu = _torch_npu()
    return torch_npu.npu_rms_norm(hidden_states, module.weight, epsilon=module.variance_epsilon)[0]


# --- the registry ------------------------------------------------------------------------------

KERNELS: dict[str, dict[str, Kernel]] = {
    "attention": {
        "sdpa": Kernel("attention", "sdpa"),
        "eager": Kernel("attention", "eager"),
        "flash_attention_2": Kernel("attention", "flash_attention_2", requires="flash_attn"),
        NPU_ATTENTION: Kernel("attention", NPU_ATTENTION, npu_fusion_attention_forward, fusion_attention_supports,
                              requires="torch_npu"),
    },
    "rms_norm": {
        "reference": Kernel("rms_norm", "reference"),
        "npu_rms_norm": Kernel("rms_norm", "npu_rms_norm", npu_rms_norm_forward, rms_norm_supports,
                               requires="torch_npu"),
    },
}


def choice_problem(choice: Any) -> str | None:
    """Why ``model.kernels`` is not a valid choice (auto | reference | {op: implementation}), or None."""
    if choice in ("auto", "reference"):
        return None
    if not isinstance(choice, Mapping):
        return f"expected auto, reference or a mapping of op to implementation, got {choice!r}"
    for op, name in choice.items():
        if op not in KERNELS:
            return f"unknown op {op!r}; expected one of {', '.join(OPS)}"
        if name not in KERNELS[op]:
            return f"{op}: unknown implementation {name!r}; expected one of {', '.join(KERNELS[op])}"
    return None


def _installed(package: str) -> bool:
    if package in sys.modules:
        return True
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def resolve(row: Mapping[str, str], choice: Any = "auto") -> dict[str, str]:
    """The implementation of every op: the device row's (auto), every reference, or the row's with
    the named ops replaced. ValueError for an unknown name or a kernel whose package is missing."""
    problem = choice_problem(choice)
    if problem is not None:
        raise ValueError(f"model.kernels: {problem}")
    chosen = dict(REFERENCE) if choice == "reference" else {**REFERENCE, **row}
    if isinstance(choice, Mapping):
        chosen.update(choice)
    for op, name in chosen.items():
        required = KERNELS[op][name].requires
        if required is not None and not _installed(required):
            raise ValueError(f"model.kernels: {op}: {name} needs the {required} package, which is not installed here")
    return chosen


def use_kernels(language_model: torch.nn.Module, kernels: Mapping[str, str]) -> None:
    """Make ``language_model`` (a transformers causal LM) run ``kernels``: its attention
    implementation, and every RMSNorm's forward; an op ``kernels`` does not name is left as it is.
    Calling it again with other kernels undoes these."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if "attention" in kernels:
        attention = KERNELS["attention"][kernels["attention"]]
        if attention.forward is not None:
            AttentionInterface.register(attention.name, attention.forward)
            AttentionMaskInterface.register(attention.name, npu_mask)
        language_model.set_attn_implementation(attention.name)
    if "rms_norm" not in kernels:
        return
    norm = KERNELS["rms_norm"][kernels["rms_norm"]]
    for module in language_model.modules():
        if not is_rms_norm(module):
            continue
        module.__dict__.pop("forward", None)
        if norm.forward is not None:
            module.forward = types.MethodType(norm.forward, module)
