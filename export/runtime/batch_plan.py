"""How a batch of images is cut into the calls a graph's batch dimension takes: one rule for every
backend (ONNX Runtime, TensorRT, the compiled PyTorch graphs)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from opad.errors import OpadError


def compiled_batch(n: int) -> int:
    """The batch size the compiled backend runs ``n`` images at: the next power of two."""
    return 1 << (n - 1).bit_length()


def batch_chunks(n: int, lo: int, hi: int, *, power_of_two: bool = False) -> list[tuple[int, int, int]]:
    """``(start, images, run_size)`` per call for ``n`` images on a graph whose batch takes ``lo..hi``:
    chunks of at most ``hi`` images, each run at ``run_size >= lo`` (the chunk's last image repeated,
    then dropped). With ``power_of_two`` the run sizes are rounded up to a power of two (within
    ``lo..hi``), so that a runner keeping one execution context or compiled graph per size needs few."""
    if not 1 <= lo <= hi:
        raise OpadError(f"a graph's batch range must be 1 <= min <= max, got {lo}..{hi}")
    chunks = []
    for start in range(0, n, hi):
        count = min(hi, n - start)
        size = min(hi, compiled_batch(count)) if power_of_two else count
        chunks.append((start, count, max(lo, size)))
    return chunks


def take_rows(t: Tensor | np.ndarray, start: int, count: int, size: int) -> Tensor | np.ndarray:
    """Rows ``start..start+count`` of a batch (tensor or array), the last repeated up to ``size`` rows."""
    part = t[start:start + count]
    if size == count:
        return part
    filler = [part[-1:]] * (size - count)
    if isinstance(part, Tensor):
        return torch.cat([part, *filler])
    return np.ascontiguousarray(np.concatenate([part, *filler]))
