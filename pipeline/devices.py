"""The devices a memory plan (pipeline/model/memory.py) judges a recipe against: memory and the
runtime's own share of it. No torch here: recipes name a device (``cluster.device``) and are
validated before torch is imported."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    family: str              # cuda | npu | cpu
    reserve_gib: float       # the runtime's own share, not visible to the training process's tensors

    @property
    def memory(self) -> int:
        return int(self.memory_gib * GIB)


# The runtime reserves are estimates (not measured here): CUDA context + cuBLAS/cuDNN workspaces
# + NCCL buffers; CANN runtime + HCCL buffers (HCCL_BUFFSIZE, 200 MB each way by default).
DEVICES = {device.name: device for device in (
    Device("a100-40g", 40, "cuda", 1.5),
    Device("a100-80g", 80, "cuda", 1.5),
    Device("h100-80g", 79.6, "cuda", 1.5),
    Device("h200", 140.4, "cuda", 1.5),
    Device("l40s-48g", 45, "cuda", 1.5),
    Device("rtx4090-24g", 24, "cuda", 1.5),
    Device("910b-64g", 64, "npu", 3.0),
    Device("910b-32g", 32, "npu", 3.0),
)}


def device_named(name: str, where: str) -> Device:
    """The device ``name``; ValueError naming ``where`` (a key or option) and the known names."""
    if name not in DEVICES:
        raise ValueError(f"{where}: unknown device {name!r}; known: {', '.join(DEVICES)}")
    return DEVICES[name]
