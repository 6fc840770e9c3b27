"""NVIDIA GPU backend: NCCL, DeepSpeed's CUDA accelerator, flash-attention when installed."""

import importlib.util
import os

import torch

from backends.spec import Backend


def _probe() -> str | None:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a build without CUDA"
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        return f"torch.cuda.is_available() is False (driver missing or no GPU visible; CUDA_VISIBLE_DEVICES={visible})"
    return None


def _bf16_check(local_rank: int) -> tuple[bool, str]:
    # Native bf16 needs Ampere (sm_80) or newer; V100/T4 would only emulate it, slowly.
    name = torch.cuda.get_device_name(local_rank)
    major, _ = torch.cuda.get_device_capability(local_rank)
    return major >= 8, name


def _attention() -> str:
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


CUDA = Backend(
    name="cuda",
    device_type="cuda",
    dist_backend="nccl",
    visible_devices_env="CUDA_VISIBLE_DEVICES",
    deepspeed_accelerator="cuda",
    attn_implementation=_attention(),
    kernels={"attention": _attention(), "rms_norm": "reference"},
    env_defaults={
        # A rank whose peer died raises instead of hanging until the job's wall time.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        # Video batches vary in frame count; expandable segments keep fragmentation down.
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    },
    probe=_probe,
    device_module=lambda: torch.cuda,
    bf16_check=_bf16_check,
)
