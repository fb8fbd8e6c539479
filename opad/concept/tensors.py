"""Reading a concept's safetensors files and checking each tensor, with one-line errors naming the file."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from opad.errors import OpadError


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    try:
        return safetensors.torch.load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise OpadError(f"{path} is not a readable safetensors file ({e})") from e


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header (empty when it has none)."""
    try:
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise OpadError(f"{path} is not a readable safetensors file ({e})") from e


def check_finite(value: torch.Tensor, where: str) -> None:
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise OpadError(f"{where} holds values that are not finite (NaN or inf)")


def check_weight(path: Path, key: str, value: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> None:
    """A weight read from ``path`` must have the model's shape, a floating-point dtype and finite values."""
    if tuple(value.shape) != tuple(shape):
        raise OpadError(f"{path}: key {key!r} has shape {tuple(value.shape)} but the model's is {tuple(shape)}")
    check_float(path, key, value)


def check_float(path: Path, key: str, value: torch.Tensor) -> None:
    if not value.is_floating_point():
        raise OpadError(f"{path}: key {key!r} has dtype {value.dtype}; expected a floating-point tensor")
    check_finite(value, f"{path}: key {key!r}")
