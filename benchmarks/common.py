"""Shared by the benchmark scripts: timing and the one results file they all append to.

Rows: name, provider, shape, median_ms, p20_ms, p80_ms, p95_ms, peak_mem_mb, images_per_s, device,
date (images_per_s only where a row makes images; older rows have no p95 or throughput).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

# OPAD_RESULTS redirects the rows (the GPU suite's tests write to a temporary file, not the repository)
RESULTS = Path(os.environ.get("OPAD_RESULTS") or Path(__file__).resolve().parent / "results" / "results.csv")
COLUMNS = ["name", "provider", "shape", "median_ms", "p20_ms", "p80_ms", "p95_ms", "peak_mem_mb", "images_per_s",
           "device", "date"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 10) -> dict:
    """Median / p20 / p80 wall time of ``fn`` in ms and peak memory in MB: CUDA's peak allocation
    during the timed calls on a GPU; on the CPU the process's peak resident size so far."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    q = statistics.quantiles(times, n=20) if len(times) > 1 else times * 19
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"median_ms": statistics.median(times), "p20_ms": q[3], "p80_ms": q[15], "p95_ms": q[18],
            "peak_mem_mb": peak}


def write_rows(rows: list[dict], device: torch.device) -> Path:
    """Append rows (name, provider, shape + a measure() result) to benchmarks/results/results.csv."""
    _upgrade_header()
    new = not RESULTS.is_file()
    date = datetime.date.today().isoformat()
    with RESULTS.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            out = {**row, "device": device_name(device), "date": date}
            for key in ("median_ms", "p20_ms", "p80_ms", "p95_ms", "peak_mem_mb", "images_per_s"):
                if out.get(key) is not None:
                    out[key] = f"{out[key]:.3f}"
            writer.writerow(out)
    return RESULTS


def _upgrade_header() -> None:
    """Rewrite a results file written with fewer columns under today's header (new cells empty)."""
    if not RESULTS.is_file():
        return
    with RESULTS.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames == COLUMNS:
            return
        rows = list(reader)
    with RESULTS.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in rows)
