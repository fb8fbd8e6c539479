"""One resumable, deterministic training run of a mini-world component (the VAE, the teacher, ...).

A component folder ``OUT/<name>/`` holds ``checkpoints/step-NNNNNN/`` (the newest two, each written
whole or not at all, :mod:`opad.train.checkpoint`), ``log.csv`` and, once finished, ``record.json``: where
and how long it trained. Step ``i`` draws its batch and noise from a generator seeded by
``(seed, i)`` alone, so a run cut off and resumed from its last checkpoint reaches the same weights
as one that never stopped (on the same device and thread count), and loses at most the steps since
that checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from opad.errors import OpadError
from opad.fsutil import write_json
from opad.train.checkpoint import latest_checkpoint, load_newest_readable, remove_partial, save_checkpoint

RECORD = "record.json"


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU. Raises OpadError for a device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise OpadError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from e
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise OpadError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise OpadError(f"--device {name}: only cpu and cuda are supported")
    return device


def bf16_fast(device: torch.device) -> bool:
    """Whether bf16 autocast runs faster than fp32 here: CUDA, or a CPU with AVX-512 BF16 / AMX."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator step ``step`` draws from: a function of (seed, step) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def cosine_lr(base: float, step: int, steps: int, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to ``floor * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class Run:
    """What a component's loop needs: a module and optimizer to save and restore, and one step."""

    name: str
    folder: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    steps: int
    lr: Callable[[int], float]
    step: Callable[[int, torch.Generator], dict[str, float]]  # (step, generator) -> logged values
    checkpoint_every: int = 200
    seed: int = 0
    progress: bool = True
    hparams: dict | None = None  # what the component was built with, for its finish and record
    prepare: dict | None = None  # what making the run cost before its first step (the student's pairs), for its record


def is_finished(folder: Path) -> bool:
    return (Path(folder) / RECORD).is_file()


def read_record(folder: Path) -> dict:
    return json.loads((Path(folder) / RECORD).read_text())


def _resume(run: Run) -> tuple[int, float]:
    remove_partial(run.folder)
    if latest_checkpoint(run.folder) is None:
        return 0, 0.0
    step, _, state, _ = load_newest_readable(run.folder)  # falls back past damaged ones; none readable: refused
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    return step, float(state["seconds"])


@contextlib.contextmanager
def _log(folder: Path, start: int) -> Iterator[Callable[[int, dict[str, float]], None]]:
    """Append rows to log.csv, first dropping rows past ``start`` (steps a cut-off run will redo)."""
    path = folder / "log.csv"
    rows = []
    if path.is_file() and start:
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) < start]
    fields: list[str] = list(rows[0]) if rows else []
    with path.open("w", newline="") as f:
        writer: csv.DictWriter | None = None

        def write(step: int, values: dict[str, float]) -> None:
            nonlocal writer, fields
            if writer is None:
                fields = fields or ["step", *values]
                writer = csv.DictWriter(f, fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            writer.writerow({"step": step, **{k: f"{v:.6g}" for k, v in values.items()}})
            f.flush()

        yield write


def train(run: Run, log_every: int = 25) -> dict:
    """Train from the newest checkpoint to ``run.steps``; returns the timing part of the record."""
    run.folder.mkdir(parents=True, exist_ok=True)
    start, seconds = _resume(run)
    run.model.train()
    with _log(run.folder, start) as log, tqdm(total=run.steps, initial=start, desc=run.name, unit="step",
                                              disable=not run.progress) as bar:
        t0 = time.perf_counter()
        for i in range(start, run.steps):
            for group in run.optimizer.param_groups:
                group["lr"] = run.lr(i)
            values = run.step(i, step_generator(run.seed, i))
            done = i + 1
            if done % log_every == 0 or done == run.steps:
                log(done, values)
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
            if done % run.checkpoint_every == 0 or done == run.steps:
                elapsed = seconds + time.perf_counter() - t0
                save_checkpoint(run.folder, done, {"model": run.model.state_dict(),
                                                   "optimizer": run.optimizer.state_dict(), "seconds": elapsed}, keep=2)
            bar.update(1)
        seconds += time.perf_counter() - t0
    run.model.eval()
    return {"steps": run.steps, "train_seconds": round(seconds, 1)}


@torch.no_grad()
def ema_update(ema: torch.nn.Module, live: torch.nn.Module, step: int, decay: float) -> None:
    """Move ``ema`` toward ``live``; the decay ramps up over the first steps, so early weights fade fast."""
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), live.parameters()):
        p_ema.lerp_(p, 1 - d)


def ship_ema_unet(model: torch.nn.ModuleDict, out: Path) -> dict:
    """Save the ``ema`` half of a {live, ema} UNet pair as a diffusers UNet folder (fp16), with the
    default attention processor (training may use another)."""
    ema = model["ema"]
    ema.set_default_attn_processor()
    save_fp16(ema, out)
    return {"unet_params": sum(p.numel() for p in ema.parameters())}


def where() -> dict:
    """Where a component trained, for its record."""
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def save_fp16(model: torch.nn.Module, out: Path) -> None:
    """A diffusers or transformers model's ``save_pretrained`` with its weights stored in fp16
    (half the bytes; the loaders upcast with ``torch_dtype=torch.float32``)."""
    model.save_pretrained(out, safe_serialization=True)
    for path in Path(out).glob("*.safetensors"):
        save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}, path,
                  metadata={"format": "pt"})


def write_record(folder: Path, record: dict) -> None:
    write_json(Path(folder) / RECORD, record)
