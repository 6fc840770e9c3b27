"""Huawei Ascend NPU backend (910B): HCCL, DeepSpeed's NPU accelerator.

`torch_npu` is imported lazily, only here, and only when this backend is probed or used: it
cannot even be imported without Ascend's CANN runtime. `torch_npu.contrib.transfer_to_npu` is
never used (it monkeypatches every `torch.cuda` call in the process). Every `torch_npu.*` and
`torch.npu.*` name in this file is checked against the real torch_npu package source by
tests/unit/test_npu_api.py, since no NPU is reachable from CI.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from backends.spec import Backend


def _torch_npu() -> ModuleType:
    # Importing torch_npu registers the "npu" device type and the `torch.npu` module.
    return importlib.import_module("torch_npu")


def _probe() -> str | None:
    try:
        _torch_npu()
    except Exception as error:  # ImportError, or OSError/RuntimeError when CANN libraries are missing
        return f"torch_npu not importable: {type(error).__name__}: {error}"
    if not torch.npu.is_available() or torch.npu.device_count() == 0:
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "<unset>")
        return f"torch.npu.is_available() is False (driver not loaded or no NPU visible; ASCEND_RT_VISIBLE_DEVICES={visible})"
    return None


def _device_module():
    _torch_npu()
    return torch.npu


def _bf16_check(local_rank: int) -> tuple[bool, str]:
    # 910A has no bf16; 910B and later do. torch_npu asks the SoC itself.
    _torch_npu()
    return bool(torch.npu.is_bf16_supported()), torch.npu.get_device_name(local_rank)


def _process_setup() -> None:
    torch_npu = _torch_npu()
    # Operators are compiled per input shape when jit compile is on: with variable frame counts
    # and sequence lengths that means a recompile on almost every step. Binary kernels instead.
    torch_npu.npu.set_compile_mode(jit_compile=False)
    # Private (NZ) tensor formats make checkpoints and CPU copies device-specific; keep ND.
    torch_npu.npu.config.allow_internal_format = False


NPU = Backend(
    name="npu",
    device_type="npu",
    dist_backend="hccl",
    visible_devices_env="ASCEND_RT_VISIBLE_DEVICES",
    deepspeed_accelerator="npu",
    # What every tower loads with: torch_npu's SDPA reaches the fused kernel for the vision tower's
    # unmasked 4-D attention. The LLM's masked attention gets npu_fusion_attention from `kernels`.
    attn_implementation="sdpa",
    kernels={"attention": "npu_fusion_attention", "rms_norm": "npu_rms_norm"},
    env_defaults={
        # Rendezvous of 32 ranks across nodes can exceed HCCL's 120 s default.
        "HCCL_CONNECT_TIMEOUT": "1200",
        # A collective waiting this long means a dead peer: fail the job rather than hang it. Longer
        # than the process group's timeout (cluster.dist_timeout_minutes, 30 by default), so that
        # torch's watchdog, which names the collective and the rank, reports first.
        "HCCL_EXEC_TIMEOUT": "2100",
        # Bind each rank's host threads to the cores of its NPU's NUMA node (torch_npu's coarse
        # mode). Under an srun CPU binding torch_npu keeps srun's and says so (docs/ascend.md §2).
        "CPU_AFFINITY_CONF": "1",
        # Asynchronous two-level task queue: the host keeps ahead of the device.
        "TASK_QUEUE_ENABLE": "2",
        # Not set where PYTORCH_ALLOC_CONF is (torch_npu exits when both are: exclusive_env).
        "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
    },
    exclusive_env=(("PYTORCH_NPU_ALLOC_CONF", "PYTORCH_ALLOC_CONF"),),
    probe=_probe,
    device_module=_device_module,
    bf16_check=_bf16_check,
    process_setup=_process_setup,
)
