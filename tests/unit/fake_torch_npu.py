"""A stand-in for `torch_npu`, for testing backend *selection and setup logic only*.

It proves that `backends.select` picks the NPU row when torch_npu imports and reports
devices, that the NPU row's process setup asks for jit compile off and ND formats, and that
the bf16 fallback names the device. It proves nothing about real Ascend behaviour: no op,
collective, memory function or DeepSpeed accelerator of torch_npu runs here. Those names are
checked statically against the real package in test_npu_api.py.
"""

from __future__ import annotations

import types


def install(monkeypatch, device_name: str = "Ascend910B3", bf16: bool = True, devices: int = 8) -> types.SimpleNamespace:
    """Put a fake `torch_npu` into sys.modules and `torch.npu`; returns a record of calls."""
    import sys

    import torch

    calls = types.SimpleNamespace(compile_modes=[], config=types.SimpleNamespace(allow_internal_format=True))
    npu = types.SimpleNamespace(
        is_available=lambda: devices > 0,
        device_count=lambda: devices,
        is_bf16_supported=lambda: bf16,
        get_device_name=lambda index=0: device_name,
        set_compile_mode=lambda jit_compile=True: calls.compile_modes.append(jit_compile),
        config=calls.config,
    )
    module = types.ModuleType("torch_npu")
    module.npu = npu
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    return calls
