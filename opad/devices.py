"""Device and dtype choices shared by the CLIs."""

from __future__ import annotations

import torch

from opad.config import DEVICE_PATTERN
from opad.errors import OpadError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when there is a GPU, else CPU; otherwise cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE_PATTERN.match(name):
        raise OpadError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OpadError(f"device {name!r} requested but no CUDA GPU is available")
    return device


def visible_gpus() -> int:
    """How many CUDA GPUs this process sees (0 without a usable CUDA): one job per GPU."""
    try:
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken CUDA install counts as none
        return 0


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` means float16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise OpadError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
