"""The interface every backend of :class:`opad.export.runtime.Runner` implements, and the helpers
they share (the seeded noise, the token ids).

A backend runs the two halves of the split graph: the conditioning (a) once per (concept, prompt),
and the concept-agnostic denoise+decode (b) for a batch of any concepts. :class:`Backend` lists
everything the Runner reads or calls on one; each backend subclasses it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

KV = list  # one backend's per-layer K/V: torch tensors or numpy arrays, (batch, heads, tokens, head_dim) each


class Backend(ABC):
    """What :class:`~opad.export.runtime.Runner` uses of a backend.

    Attributes (set by every backend):

    - ``concepts``: name (``None``: the base student) -> (tokenizer, token table, the concept's own
      conditioning part); the Runner checks names against it and reads the tokenizer (``[0]``).
    - ``resolution``: the image size in pixels; ``steps``: the step counts it has a graph for.
    - ``device``: where its inputs (the K/V) live; a PyTorch conditioning beside it runs there.
    - ``denoiser_concept`` and ``student_hashes``: what its denoise+decode was made from ("base" and
      ``{}`` unless an export says otherwise), checked before a PyTorch conditioning is paired with it.
    """

    concepts: dict[str | None, tuple]
    resolution: int
    steps: tuple[int, ...]
    device: torch.device
    denoiser_concept: str = "base"
    student_hashes: Mapping[str, str] = MappingProxyType({})

    @abstractmethod
    def conditioning(self, concept: str | None, prompt: str) -> KV:
        """(a): every cross-attention layer's K and V for one (concept, prompt), batch 1."""

    @abstractmethod
    def denoise_decode(self, kv: KV, seeds: list[int], steps: int) -> tuple[np.ndarray, dict[str, float]]:
        """(b): uint8 images (B, H, W, 3), image i from ``seeds[i]`` and row i of ``kv``, and the seconds
        per stage (``denoise`` and ``decode``, or ``denoise_decode`` where one graph runs both)."""

    def warm_up_batches(self, max_batch: int) -> list[int]:
        """Batch sizes worth running once before serving batches of up to ``max_batch``: one image,
        unless the backend compiles per shape."""
        return [1]


def seeded_noise(shape: tuple[int, ...], seeds: list[int], dtype: torch.dtype) -> Tensor:
    """One latent per seed, drawn as ``opad.diffusion.sampling.initial_noise`` draws it (CPU generator, float32,
    then cast)."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s), dtype=torch.float32)
                      for s in seeds]).to(dtype)


def token_ids(tokenizer, prompt: str) -> np.ndarray:
    """The prompt's (1, max_length) token ids, padded and truncated as the text encoder takes them."""
    return tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="np").input_ids


def baked_concept(record: dict) -> str:
    """The concept an export's denoise+decode graph holds (a lora/unet one), or "base"."""
    return record.get("denoiser_concept") or "base"
