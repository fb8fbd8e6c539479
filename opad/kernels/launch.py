"""The CUDA device a Triton launch runs on: the tensors' own, not whichever happens to be current."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def on_device(device: torch.device) -> ContextManager:
    """Make ``device`` current for a launch: Triton launches on the current CUDA device (and its
    current stream), so a kernel on cuda:1 tensors launched while cuda:0 is current would fault.
    A no-op for CPU tensors (Triton's interpreter), which must not touch CUDA at all."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
