"""The documented import path of the concept API (README "Python API"); it lives in
:mod:`opad.concept`."""

from opad.concept import (
    add_modifier_tokens,
    concept_format,
    enable_kv_training,
    load_concept,
    read_concept,
    save_concept,
)

__all__ = ["add_modifier_tokens", "concept_format", "enable_kv_training", "load_concept", "read_concept", "save_concept"]
