"""Checkpoints: ``checkpoints/step-NNNNNN/state.pt``, each written whole or not at all.

A checkpoint folder is built under a temporary name and renamed when complete, so a run killed
mid-write leaves only a temporary folder, which resuming ignores and removes. Files are read with
``weights_only=True``: a checkpoint can never run code.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from opad.errors import OpadError, first_line
from opad.fsutil import staged_dir

_NAME = re.compile(r"^step-(\d{6,})$")
STATE = "state.pt"


def checkpoints_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def complete_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(out_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and (p / STATE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def remove_partial(out_dir: Path) -> list[Path]:
    """Delete temporary folders left by an interrupted write; return what was removed."""
    root = checkpoints_dir(out_dir)
    stale = [p for p in root.iterdir() if p.name.startswith(".")] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def save_checkpoint(out_dir: Path, step: int, state: dict, *, keep: int) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) for ``step``; keep the newest ``keep``."""
    path = checkpoints_dir(out_dir) / f"step-{step:06d}"
    with staged_dir(path, replace=True) as tmp:
        torch.save(state, tmp / STATE)
    for _, old in complete_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path) -> dict:
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=True)


def load_newest_readable(out_dir: Path) -> tuple[int, Path, dict, list[tuple[Path, str]]]:
    """(step, folder, state) of the newest checkpoint that loads, and the newer ones that did not
    (folder, reason): a file truncated or damaged after it was written (a full disk, a bad copy)."""
    unreadable = []
    for step, path in reversed(complete_checkpoints(out_dir)):
        try:
            return step, path, load_checkpoint(path), unreadable
        except Exception as e:  # noqa: BLE001 - torch.load fails in many ways on a damaged file
            unreadable.append((path, first_line(e, 160)))
    names = ", ".join(p.name for p, _ in unreadable) or "none"
    raise OpadError(f"no readable checkpoint in {checkpoints_dir(out_dir)} (damaged: {names})")
