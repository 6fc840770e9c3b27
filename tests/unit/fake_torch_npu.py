"""A stand-in for `torch_npu`: backend selection and setup, and an emulator of the two fused ops
our kernels call, written from their documentation (torch_npu's op-plugin docs, which
tests/unit/test_npu_api.py reads from the released wheel).

What it proves: that `backends.select` picks the NPU row and sets it up, and that the wrappers in
`backends/kernels.py` (mask inversion, layouts, sparse modes, empty rows, the returned tuple) give
the reference's result when the ops behave as documented. It proves nothing about the real
kernels' numerics or speed: that is `benchmarks/fused_kernels.py --device npu` on an Ascend host.

The emulator is strict where the documentation is: it refuses a float mask, a mask shape outside
BNSS/B1SS/11SS/SS, sparse mode 2/3 without the 2048 x 2048 compressed mask, heads or head dims past
the limits, and any keyword the real signature lacks (the signatures are the wheel's). Rows with
nothing to attend to come out NaN unless ``inner_precise=2``, as the docs warn they lose precision.
"""

from __future__ import annotations

import math
import types

import torch

MAX_INT = 2147483647
BLOCK = 2048


def _to_bnsd(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return tensor
    if layout == "BSND":
        return tensor.transpose(1, 2)
    raise NotImplementedError(f"the emulator covers BNSD and BSND, not {layout}")


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=MAX_INT, next_tockens=MAX_INT, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout=""):
    """softmax(scale * Q K^T, masked where atten_mask is 1) V, as documented; returns the 7-tuple."""
    if pse is not None or padding_mask is not None or prefix is not None or keep_prob != 1.0:
        raise NotImplementedError("the emulator covers no pse, padding_mask, prefix or dropout")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or len({query.dtype, key.dtype, value.dtype}) > 1:
        raise RuntimeError(f"query, key, value must share one of fp16/bf16/fp32, got {query.dtype}/{key.dtype}/{value.dtype}")
    q, k, v = (_to_bnsd(t, input_layout) for t in (query, key, value))
    batch, heads, s_q, dim = q.shape
    s_kv, heads_kv = k.shape[2], k.shape[1]
    if heads != head_num or not 1 <= heads <= 256 or heads % heads_kv or k.shape != v.shape:
        raise RuntimeError(f"head_num {head_num}: query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}")
    if not 1 <= dim <= 768:
        raise RuntimeError(f"head dim {dim} outside 1..768")
    masked = None
    if atten_mask is not None:
        if atten_mask.dtype not in (torch.bool, torch.uint8):
            raise RuntimeError(f"atten_mask must be bool or uint8, got {atten_mask.dtype}")
        atten_mask = atten_mask.bool()
        if sparse_mode in (2, 3):
            expected = torch.triu(torch.ones(BLOCK, BLOCK, dtype=torch.bool), 1)
            if tuple(atten_mask.shape) != (BLOCK, BLOCK) or not torch.equal(atten_mask.cpu(), expected):
                raise RuntimeError(f"sparse_mode {sparse_mode} takes the 2048x2048 compressed causal mask")
            rows, cols = torch.arange(s_q)[:, None], torch.arange(s_kv)[None, :]
            offset = s_kv - s_q if sparse_mode == 3 else 0  # 3: right-down aligned, 2: left-up
            masked = (cols > rows + offset).to(q.device)
        elif sparse_mode == 0:
            if tuple(atten_mask.shape) not in {(batch, heads, s_q, s_kv), (batch, 1, s_q, s_kv), (1, 1, s_q, s_kv),
                                               (s_q, s_kv)}:
                raise RuntimeError(f"atten_mask shape {tuple(atten_mask.shape)} is none of BNSS, B1SS, 11SS, SS")
            if pre_tockens != MAX_INT or next_tockens != MAX_INT:
                raise NotImplementedError("the emulator covers sparse_mode 0 without a band")
            masked = atten_mask
        else:
            raise NotImplementedError(f"the emulator covers sparse_mode 0, 2 and 3, not {sparse_mode}")
    k = k.repeat_interleave(heads // heads_kv, dim=1)
    v = v.repeat_interleave(heads // heads_kv, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if masked is not None:
        scores = scores.masked_fill(masked, -math.inf)
    probabilities = torch.softmax(scores, dim=-1)
    if masked is not None:
        empty = masked.expand_as(scores).all(dim=-1, keepdim=True)
        fill = 0.0 if inner_precise == 2 else math.nan
        probabilities = probabilities.masked_fill(empty, fill)
    output = torch.matmul(probabilities, v.float()).to(query.dtype)
    if input_layout == "BSND":
        output = output.transpose(1, 2)
    statistics = torch.zeros(batch, heads, s_q, 8)
    calls.fusion_attention.append({"layout": input_layout, "sparse_mode": sparse_mode, "inner_precise": inner_precise,
                                   "mask": None if atten_mask is None else tuple(atten_mask.shape),
                                   "dtype": query.dtype, "shape": tuple(q.shape)})
    return output, statistics, statistics, torch.empty(0), 0, 0, 0


def npu_rms_norm(self, gamma, epsilon=1e-06):
    """x * rsqrt(mean(x^2) + eps) * gamma over gamma's dims, computed in fp32; returns (y, rstd)."""
    if self.dtype not in (torch.float16, torch.bfloat16, torch.float32) or gamma.dtype != self.dtype:
        raise RuntimeError(f"npu_rms_norm takes fp16/bf16/fp32 with gamma of the same dtype, got {self.dtype}/{gamma.dtype}")
    if not 2 <= self.dim() <= 8:
        raise RuntimeError(f"npu_rms_norm takes 2-8 dims, got {self.dim()}")
    dims = tuple(range(self.dim() - gamma.dim(), self.dim()))
    rstd = torch.rsqrt(self.float().pow(2).mean(dim=dims, keepdim=True) + epsilon)
    calls.rms_norm.append({"dtype": self.dtype, "shape": tuple(self.shape)})
    return (self.float() * rstd * gamma.float()).to(self.dtype), rstd


calls = types.SimpleNamespace(fusion_attention=[], rms_norm=[])


def install(monkeypatch, device_name: str = "Ascend910B3", bf16: bool = True, devices: int = 8) -> types.SimpleNamespace:
    """Put a fake `torch_npu` into sys.modules and `torch.npu`; returns a record of calls (setup
    calls, and every emulated op call in ``fusion_attention`` / ``rms_norm``)."""
    import sys

    record = types.SimpleNamespace(compile_modes=[], config=types.SimpleNamespace(allow_internal_format=True))
    calls.fusion_attention, calls.rms_norm = [], []
    record.fusion_attention, record.rms_norm = calls.fusion_attention, calls.rms_norm
    npu = types.SimpleNamespace(
        is_available=lambda: devices > 0,
        device_count=lambda: devices,
        is_bf16_supported=lambda: bf16,
        get_device_name=lambda index=0: device_name,
        set_compile_mode=lambda jit_compile=True: record.compile_modes.append(jit_compile),
        config=record.config,
    )
    module = types.ModuleType("torch_npu")
    module.npu = npu
    module.npu_fusion_attention = npu_fusion_attention
    module.npu_rms_norm = npu_rms_norm
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    return record
