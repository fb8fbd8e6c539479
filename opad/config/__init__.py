"""The trainer's typed configuration, read from a JSON/YAML file and/or flags.

- ``fields``: the TrainConfig dataclass and its field declarations;
- ``defaults``: every default, filled in one order (``TrainConfig.resolved()``) and quoted by ``--help``;
- ``profiles``: ``--profile {paper,release}``, the two sets of defaults for the profile fields;
- ``checks``: the type and domain checks (``TrainConfig.validate()``);
- ``flags``: the ``--flag`` per field and ``--config FILE``;
- ``choices``: the value sets named outside their field (the method names come from the method registry).
"""

from __future__ import annotations

from opad.config.checks import check_type
from opad.config.choices import (
    BASELINES,
    DEVICE_PATTERN,
    DISCRIMINATORS,
    ID_ENCODERS,
    MAX_SEED,
    METHODS,
    RESIZE_MODES,
)
from opad.config.defaults import FALLBACKS, FROM_PROFILE, METHOD_DEFAULTS, MethodDefaults
from opad.config.fields import TrainConfig, declared
from opad.config.flags import add_config_arguments, config_from_args, read_config_file

__all__ = [
    "BASELINES", "DEVICE_PATTERN", "DISCRIMINATORS", "FALLBACKS", "FROM_PROFILE", "ID_ENCODERS", "MAX_SEED",
    "METHODS", "METHOD_DEFAULTS", "MethodDefaults", "RESIZE_MODES", "TrainConfig", "add_config_arguments",
    "check_type", "config_from_args", "declared", "read_config_file",
]
