"""The sliced-Wasserstein core of MS-SWD, one value per batch item: reference, padding rule, dispatch.

``swd_sorted_l1(x, y, projections)``: every k x k patch of x and y (B, C, H, W), padded by
:func:`pad` so that every pixel has one, is projected on P directions (P, C, k, k); each
direction's H*W values are sorted and the two images' sorted values compared by mean absolute
difference. :func:`swd_sorted_l1_reference` is the pure-torch definition; the Triton kernel
(:class:`SwdSortedL1` over ``_swd_triton``'s launches, imported only when chosen) computes the
same without the unfolded patches and keeps 1 byte a value for backward, and gives y (the teacher
image) no gradient. :func:`swd_sorted_l1` asks :mod:`opad.kernels.dispatch` (op
``swd_sorted_l1``) which of the two runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from opad.kernels import dispatch

# MS-SWD's patch size (He et al., ECCV 2024): opad.train.losses.ms_swd's default
DEFAULT_PATCH = 11


def pad(x: Tensor, p: int) -> Tensor:
    """``p`` pixels on every side: reflect, or replicate where reflect needs ``p`` < the side (tiny
    pyramid levels). The padding rule of the reference, the kernel and MS-SWD's pyramid blur."""
    mode = "reflect" if min(x.shape[-2:]) > p else "replicate"
    return F.pad(x, (p, p, p, p), mode=mode)


def swd_sorted_l1_reference(x: Tensor, y: Tensor, projections: Tensor) -> Tensor:
    """The pure-torch definition: conv2d projections, a full sort per direction, mean |difference|."""
    p = projections.shape[-1] // 2
    px = F.conv2d(pad(x, p), projections).flatten(2)  # (B, P, H*W)
    py = F.conv2d(pad(y, p), projections).flatten(2)
    return (px.sort(dim=2).values - py.sort(dim=2).values).abs().mean(dim=(1, 2))


class SwdSortedL1(torch.autograd.Function):
    """loss[b] = mean over directions and pixels of |sort(proj x) - sort(proj y)| of padded images,
    by the Triton kernels; grad to x only (saved for backward: x's int8 signs and the directions)."""

    @staticmethod
    def forward(ctx, xpad: Tensor, ypad: Tensor, projections: Tensor, H: int, W: int,
                register_sort_max: int) -> Tensor:
        from opad.kernels import _swd_triton  # imports Triton

        k = projections.shape[-1]
        w = projections.detach().flatten(1).float().contiguous()
        loss, sign = _swd_triton.forward(xpad.detach().float().contiguous(), ypad.detach().float().contiguous(),
                                         w, k, H, W, register_sort_max)
        ctx.save_for_backward(sign, w)
        ctx.shape = (k, *xpad.shape[1:], H, W)
        ctx.dtype = xpad.dtype
        return loss.to(xpad.dtype)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        from opad.kernels import _swd_triton

        sign, w = ctx.saved_tensors
        k, C, Hp, Wp, H, W = ctx.shape
        scale = (grad_loss.float() / (w.shape[0] * H * W)).contiguous()
        grad = _swd_triton.backward(sign, scale, w, k, C, Hp, Wp, H, W)
        return grad.to(ctx.dtype), None, None, None, None, None


def swd_sorted_l1_triton(x: Tensor, y: Tensor, projections: Tensor, register_sort_max: int | None = None) -> Tensor:
    """The Triton kernel, whatever ``OPAD_KERNELS`` says (imports Triton); y gets no gradient.

    Levels of at most ``register_sort_max`` pixels (default ``_swd_triton.REGISTER_SORT_MAX``;
    never more than ``_swd_triton.REGISTER_SORT_CAP``) sort in registers, larger ones with torch's
    segmented sort. A NaN in x or y makes that item's loss NaN, as in the reference (torch.sort puts
    NaNs last).
    """
    from opad.kernels import _swd_triton  # imports Triton: only on the kernel's path

    if x.shape != y.shape or x.dim() != 4 or projections.dim() != 4 or projections.shape[1] != x.shape[1]:
        raise ValueError(f"swd_sorted_l1: x {tuple(x.shape)}, y {tuple(y.shape)} and projections "
                         f"{tuple(projections.shape)} do not match (B, C, H, W) and (P, C, k, k)")
    p = projections.shape[-1] // 2
    H, W = x.shape[-2:]
    limit = _swd_triton.REGISTER_SORT_MAX if register_sort_max is None else register_sort_max
    return SwdSortedL1.apply(pad(x, p), pad(y.detach(), p), projections, H, W, limit)


def swd_sorted_l1(x: Tensor, y: Tensor, projections: Tensor) -> Tensor:
    """Sliced Wasserstein-1 between the patch sets of x and y (B, C, H, W): one value per item.

    Patches are k x k (k from ``projections``, (P, C, k, k)), padded by :func:`pad`. The Triton
    kernel or the reference, as ``OPAD_KERNELS`` chooses; the kernel gives y no gradient, so a y
    that wants one takes the reference under ``auto``.
    """
    unsupported = "the kernel computes no gradient for y" if y.requires_grad else None
    if dispatch.choose("swd_sorted_l1", x.device, unsupported).accelerated:
        return swd_sorted_l1_triton(x, y, projections)
    return swd_sorted_l1_reference(x, y, projections)
