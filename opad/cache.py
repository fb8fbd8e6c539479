"""Where opad keeps the files it generates on first use (presets, the world's pipelines, the example
concept, evaluation embeddings): ``$OPAD_CACHE`` or ``~/.cache/opad``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from opad.fsutil import staged_dir

# what decides the models and caches a process sees: passed on to the processes a command starts elsewhere
# (a job's trainer, a Ray task, a Ray Serve replica)
FORWARDED_PREFIXES = ("OPAD_", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE")


def forwarded_env() -> dict[str, str]:
    """This process's environment variables that decide which preset, cache and hub mode a child uses."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}


def cache_root() -> Path:
    """Where opad keeps generated files: ``$OPAD_CACHE`` or ``~/.cache/opad``."""
    return Path(os.environ.get("OPAD_CACHE") or Path.home() / ".cache" / "opad")


def cached_folder(path: Path, write: Callable[[Path], None]) -> Path:
    """``path``, first written by ``write(tmp)`` into a staged folder if it is not there yet (a cache
    entry: complete or absent; when two processes race, the first rename wins and both use it)."""
    if not path.is_dir():
        try:
            with staged_dir(path) as tmp:
                write(tmp)
        except OSError:
            if not path.is_dir():
                raise
    return path
