"""Loss terms of the OPAD student and discriminators, each returning one value per batch item.

``ms_swd`` is the multiscale sliced Wasserstein distance (He et al., ECCV 2024) on Lab colour:
a Gaussian pyramid of ``num_scales`` levels; at each, every k x k patch (reflect-padded, stride 1)
is projected on ``num_projections`` random unit directions, each projection's values are sorted
and the two images' sorted values compared by mean absolute difference. The per-scale core,
``swd_sorted_l1`` (reference, kernel and their switch), is the op :mod:`opad.kernels.swd`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from opad.kernels.swd import DEFAULT_PATCH, pad, swd_sorted_l1

# sRGB (D65) -> XYZ, and the D65 white point.
_RGB_TO_XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])
_DELTA = 6 / 29


def srgb_to_lab(rgb: Tensor) -> Tensor:
    """(B, 3, H, W) sRGB on the [0, 1] scale to CIE Lab (L in [0, 100] for in-range input).

    No clamp: the raw decoder output overshoots [0, 1], and a clamped pixel would get no gradient.
    Each curve continues its branch out of range (linear below the knee, also for negatives; the
    power law above 1), as the release's MS_SWD.py does; gradients stay finite at black.
    """
    linear = torch.where(rgb > 0.04045, ((rgb.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(rgb), linear) / _WHITE.to(rgb).view(1, 3, 1, 1)
    f = torch.where(
        xyz > _DELTA**3, xyz.clamp(min=_DELTA**3) ** (1 / 3), xyz / (3 * _DELTA**2) + 4 / 29
    )
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def gaussian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """``levels`` images: x, then repeatedly a 5x5 binomial blur and a stride-2 subsample."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 5, 5)
    out = [x]
    for _ in range(levels - 1):
        x = F.conv2d(pad(x, 2), kernel, groups=x.shape[1])[:, :, ::2, ::2]
        out.append(x)
    return out


def random_projections(num: int, channels: int, patch: int, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """``num`` random unit directions in patch space, shaped (num, channels, patch, patch)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    d = torch.randn(num, channels * patch * patch, generator=generator, device=gen_device, dtype=torch.float32)
    d = d / d.norm(dim=1, keepdim=True)
    return d.view(num, channels, patch, patch).to(device=device, dtype=dtype)


def ms_swd(
    x: Tensor,
    y: Tensor,
    *,
    num_scales: int = 5,
    num_projections: int = 128,
    patch_size: int = DEFAULT_PATCH,
    generator: torch.Generator | None = None,
    projections: list[Tensor] | None = None,
) -> Tensor:
    """MS-SWD between sRGB images x, y in [0, 1] (B, 3, H, W): one value per batch item.

    Fresh projections are drawn at every scale from ``generator`` (use a dedicated one, so the
    loss never moves the global RNG); ``projections``, one (P, 3, k, k) tensor per scale,
    replaces the draw so implementations can be compared on identical directions.
    """
    if x.shape != y.shape:
        raise ValueError(f"ms_swd needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    if projections is not None and len(projections) != num_scales:
        raise ValueError(f"got {len(projections)} projection tensors for {num_scales} scales")
    total = x.new_zeros(x.shape[0])
    for level, (xs, ys) in enumerate(zip(gaussian_pyramid(x, num_scales), gaussian_pyramid(y, num_scales))):
        proj = (
            projections[level].to(x)
            if projections is not None
            else random_projections(num_projections, x.shape[1], patch_size, generator, x.device, x.dtype)
        )
        total = total + swd_sorted_l1(srgb_to_lab(xs), srgb_to_lab(ys), proj)
    return total / num_scales


def latent_mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error per batch item."""
    return (a - b).pow(2).flatten(1).mean(1)


def cosine_distance(a: Tensor, b: Tensor, tokens: int = 1) -> Tensor:
    """1 - cos(a, b) per batch item; with ``tokens`` > 1 the features are that many equal tokens,
    compared one by one and averaged (IP-Adapter's 4 image tokens, as the release's identity loss)."""
    a, b = a.flatten(1), b.flatten(1)
    return 1 - F.cosine_similarity(a.view(len(a), tokens, -1), b.view(len(b), tokens, -1), dim=2).mean(1)


def generator_loss(fake_logits: Tensor, kind: str = "bce") -> Tensor:
    """Non-saturating -log D(fake) (= softplus(-logit)) or hinge's -D(fake); per item."""
    fake_logits = fake_logits.flatten(1).mean(1)
    return F.softplus(-fake_logits) if kind == "bce" else -fake_logits


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "bce") -> Tensor:
    """BCE (real -> 1, fake -> 0) or hinge, averaged over the real and the fake side."""
    real, fake = real_logits.flatten(1).mean(1), fake_logits.flatten(1).mean(1)
    if kind == "bce":
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
