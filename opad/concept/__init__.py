"""Concepts: the concept folder (``folder``: save, read, load, whichever format) and one module per
format's files (``lora``, ``unet``, ``tokens``; Custom Diffusion's K/V file is the folder's own)."""

from opad.concept.folder import (
    add_modifier_tokens,
    concept_format,
    enable_kv_training,
    load_concept,
    read_concept,
    save_concept,
)

__all__ = ["add_modifier_tokens", "concept_format", "enable_kv_training", "load_concept", "read_concept", "save_concept"]
