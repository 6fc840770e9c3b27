"""CPU backend: tests, the demo, laptops. gloo for collectives, DeepSpeed's CPU accelerator."""

import platform

from backends.spec import Backend


def _bf16_check(local_rank: int) -> tuple[bool, str]:
    # torch runs bf16 on every x86-64/arm64 CPU it supports (emulated where AVX512-BF16 is absent).
    return True, f"CPU ({platform.machine()})"


CPU = Backend(
    name="cpu",
    device_type="cpu",
    dist_backend="gloo",
    visible_devices_env=None,
    deepspeed_accelerator="cpu",
    attn_implementation="sdpa",
    env_defaults={},
    probe=lambda: None,
    device_module=lambda: None,
    bf16_check=_bf16_check,
    # Emulated bf16 matmuls are slower than fp32 on most CPUs, and eval scores compare best at full precision.
    inference_precision="fp32",
)
