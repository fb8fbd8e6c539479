"""Timing for kernel-vs-reference benchmarks: Triton's benchmark timer on a GPU, ours on the CPU.

Each call returns a ``measure()``-shaped dict (median/p20/p80 ms, peak memory MB).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

from common import measure


def time_op(fn: Callable[[], object], device: torch.device, repeats: int) -> dict:
    if device.type != "cuda":
        return measure(fn, device, warmup=1, repeats=repeats)
    import triton.testing

    fn()  # compile and warm up outside the timer and the memory peak
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20  # what the call itself adds
    median, p20, p80, p95 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8, 0.95])
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "p95_ms": p95, "peak_mem_mb": peak}


def providers(device: torch.device) -> list[str]:
    """The Triton kernel is benchmarked on a GPU only (the CPU interpreter says nothing about speed)."""
    return ["reference", "triton"] if device.type == "cuda" else ["reference"]


def time_providers(name: str, shape: str, step: Callable[[], object], device: torch.device,
                   repeats: int, modes: dict[str, str] | None = None) -> list[dict]:
    """One row per provider, each timed with ``OPAD_KERNELS`` set to its mode: by default the
    providers of :func:`providers` (named as their mode); ``modes`` maps provider names to modes."""
    rows = []
    for provider, value in (modes or {p: p for p in providers(device)}).items():
        os.environ["OPAD_KERNELS"] = value
        rows.append({"name": name, "provider": provider, "shape": shape, **time_op(step, device, repeats)})
        print(f"{name} {provider:9s} {rows[-1]['median_ms']:10.3f} ms  peak {rows[-1]['peak_mem_mb']:8.1f} MB",
              file=sys.stderr)
    return rows
