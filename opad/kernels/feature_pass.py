"""The fused multi-backbone feature pass: one image batch -> every backbone's input, in one op.

Each frozen backbone wants the image resized to its own size (in its own mode) and normalised
with its own mean/std, or scaled to raw [-1, 1]. Done one backbone at a time that is K resizes, K
normalisations and, in backward, K image-sized gradients summed with K-1 additions, each a full
pass over memory. The compiled op (``opad._C``, csrc/) reads the image once and writes all K
inputs; its backward reads the K gradients and writes the summed image gradient once.

:func:`feature_pass` dispatches through :mod:`opad.kernels.dispatch` (op ``feature_pass``):
the extension when it is built (its CPU part always, its CUDA part when compiled with it), else
:func:`feature_pass_reference` (interpolate + normalise; autograd sums the gradients), with one
warning when ``auto`` had to fall back. ``OPAD_KERNELS=reference`` forces the reference, and
``OPAD_KERNELS=triton`` the extension: it is this op's accelerated implementation (it has no
Triton kernel). Importing this module does not import ``opad._C``: ``dispatch`` loads it at the
first call that chooses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from opad.config import RESIZE_MODES
from opad.errors import OpadError, warn
from opad.kernels import dispatch


@dataclass(frozen=True)
class BackboneInput:
    """One backbone's input: a ``size`` × ``size`` resize in mode ``resize``, then ``(x - mean) / std``
    per channel, or, with ``mean``/``std`` None, the raw ``x * 2 - 1`` (images nominally in [0, 1])."""

    size: int
    resize: str = "antialias"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise OpadError(f"unknown resize mode {self.resize!r}; choose from {', '.join(RESIZE_MODES)}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither (raw [-1, 1] input)")

    def affine(self, channels: int) -> tuple[list[float], list[float]]:
        """(scale, bias) per channel with ``input = scale * resized + bias``."""
        if self.mean is None:
            return [2.0] * channels, [-1.0] * channels
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std have {len(self.mean)}/{len(self.std)} values for {channels} channels")
        return [1.0 / s for s in self.std], [-m / s for m, s in zip(self.mean, self.std)]


def resize_images(images: Tensor, size: int, mode: str) -> Tensor:
    """Square resize: ``antialias`` (bilinear with antialiasing), ``area`` (the release's
    discriminators, util_disc.py L41) or ``bilinear`` (the release's identity input, L2390)."""
    if mode == "area":
        return F.interpolate(images, size=(size, size), mode="area")
    if mode in ("antialias", "bilinear"):
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=mode == "antialias")
    raise ValueError(f"unknown resize mode {mode!r}; choose from {', '.join(RESIZE_MODES)}")


def feature_pass_reference(images: Tensor, inputs: Sequence[BackboneInput]) -> list[Tensor]:
    """The pure-torch definition: each input resized and normalised on its own."""
    outs = []
    for spec in inputs:
        x = resize_images(images, spec.size, spec.resize)
        if spec.mean is None:
            outs.append(x * 2 - 1)  # the release's raw [-1, 1]
        else:
            mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            outs.append((x - mean) / std)
    return outs


def _op_args(inputs: Sequence[BackboneInput], channels: int) -> tuple[list, list, list, list, list]:
    sizes = [spec.size for spec in inputs]
    affine = [spec.affine(channels) for spec in inputs]
    return sizes, sizes, [spec.resize for spec in inputs], [a[0] for a in affine], [a[1] for a in affine]


class _FusedFeaturePass(torch.autograd.Function):
    """opad._C's forward and backward; gradients of outputs nobody used are left out of the backward."""

    @staticmethod
    def forward(ctx, images: Tensor, inputs: tuple[BackboneInput, ...]) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.inputs, ctx.image_shape = inputs, images.shape
        return tuple(dispatch.extension().feature_pass_forward(images, *_op_args(inputs, images.shape[1])))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, None]:
        used = [i for i, g in enumerate(grads) if g is not None]
        if not used:
            return None, None
        h, w = ctx.image_shape[-2:]
        inputs = [ctx.inputs[i] for i in used]
        grad = dispatch.extension().feature_pass_backward(
            [grads[i] for i in used], h, w, *_op_args(inputs, ctx.image_shape[1]))
        return grad, None


def feature_pass(images: Tensor, inputs: Sequence[BackboneInput]) -> list[Tensor]:
    """(B, C, H, W) images -> one (B, C, size, size) tensor per input, differentiable in the images."""
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating-point (B, C, H, W) tensor, got {tuple(images.shape)} "
                         f"{images.dtype}")
    if not inputs:
        return []
    choice = dispatch.choose("feature_pass", images.device)
    if choice.fallback:
        _warn_fallback_once(choice.reason)
    if not choice.accelerated:
        return feature_pass_reference(images, inputs)
    return list(_FusedFeaturePass.apply(images, tuple(inputs)))


_warned: set[str] = set()


def _warn_fallback_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warn(f"the fused feature pass falls back to the torch reference: {reason}")
