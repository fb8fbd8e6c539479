"""Where the mini world's parts live, shared by the build, the check and the preset."""

from __future__ import annotations

from pathlib import Path

TRAIN_WORLD, HELDOUT_WORLD = 0, 1  # world seeds: models train on world 0; quality is measured on world 1
SHIPPED = Path(__file__).parent / "weights"  # a copy of a build's OUT/weights
SUMMARY = "build.json"
