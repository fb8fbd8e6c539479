"""The values a TrainConfig field may take, where a set is named outside its one field."""

from __future__ import annotations

import re

from opad.train.methods import BASELINES, METHOD_CLASSES

DISCRIMINATORS = ("dino_v1", "dino_v2", "clip")
ID_ENCODERS = DISCRIMINATORS
RESIZE_MODES = ("antialias", "area", "bilinear")
MAX_SEED = 2**32 - 1
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# --method: the method registry's names (OPAD, teacher-first, the Table-5 baselines on the student alone)
METHODS: tuple[str, ...] = tuple(METHOD_CLASSES)

__all__ = ["BASELINES", "DEVICE_PATTERN", "DISCRIMINATORS", "ID_ENCODERS", "MAX_SEED", "METHODS", "RESIZE_MODES"]
