"""All cross-attention layers' K/V projections of one context in one launch: reference, autograd, dispatch.

Every cross-attention layer projects the *same* text context X (B, S, D) with its own weight
(N_g, D). ``kv_project`` takes the list of those weights and returns each projection already
split into heads, (B, heads_g, S, N_g / heads_g) contiguous, the layout attention consumes:

* forward: one launch over a tile table of (weight, column block) pairs; the weights are read in
  place through a table of pointers (no concatenated copy);
* backward: one launch writes every dW_g = dOut_g^T X, and — only when X needs a gradient (the
  teacher step, where the modifier token trains) — a second writes dX = sum_g dOut_g W_g.

The reference is :func:`kv_project_reference` (one ``F.linear`` per weight); the kernels are in
``_kv_proj_triton``, imported only when chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from opad.kernels import dispatch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernel takes, context and weights
AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)  # what CUDA autocast computes a linear layer in


def kernel_dtypes() -> list[tuple[torch.dtype, torch.dtype]]:
    """Every (context, weight) dtype pair :func:`kv_project` can launch the kernel with: equal ones
    outside autocast; under autocast the context in the autocast dtype, the weights in any float
    dtype (opad.kernels.aot compiles each)."""
    pairs = [(d, d) for d in FLOAT_DTYPES] + [(a, w) for a in AUTOCAST_DTYPES for w in FLOAT_DTYPES]
    return list(dict.fromkeys(pairs))


def kv_project_reference(x: Tensor, weights: list[Tensor], heads: list[int]) -> list[Tensor]:
    """One ``F.linear`` per weight, split into heads as diffusers' attention does."""
    B, S, _ = x.shape
    return [F.linear(x, w).view(B, S, h, -1).transpose(1, 2) for w, h in zip(weights, heads)]


def kv_project(x: Tensor, weights: list[Tensor], heads: list[int]) -> list[Tensor]:
    """``kv_project_reference`` or the one-launch kernel, as ``OPAD_KERNELS`` chooses."""
    unsupported = _unsupported(x, weights, heads)
    if dispatch.choose("kv_proj", x.device, unsupported).accelerated:
        kind = x.device.type
        if torch.is_autocast_enabled(kind):  # autocast's rule for a linear layer: compute in its dtype
            x = x.to(torch.get_autocast_dtype(kind))
        with torch.autocast(kind, enabled=False):
            return list(KVProject.apply(x, heads, *weights))
    return kv_project_reference(x, weights, heads)


class KVProject(torch.autograd.Function):
    """outputs[g] = (x @ weights[g].T) split into heads[g] heads, for every g in one launch.

    The product runs in x's dtype (weights are converted as they are loaded, as autocast would
    cast them); outputs and dX are in x's dtype, each dW in its weight's dtype. The outputs are
    views into one buffer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, heads: list[int], *weights: Tensor) -> tuple[Tensor, ...]:
        from opad.kernels import _kv_proj_triton  # imports Triton: only on the kernel's path

        x2 = x.detach().contiguous()
        ws = [w.detach().contiguous() for w in weights]
        outs = _kv_proj_triton.forward(x2, ws, heads)
        ctx.save_for_backward(x2, *ws)
        ctx.hds = [w.shape[0] // h for w, h in zip(ws, heads)]
        return outs

    @staticmethod
    def backward(ctx, *grads: Tensor):
        from opad.kernels import _kv_proj_triton

        x, *ws = ctx.saved_tensors
        dx, dws = _kv_proj_triton.backward(x, ws, ctx.hds, grads, ctx.needs_input_grad[0],
                                           ctx.needs_input_grad[2:])
        return (dx, None, *dws)


def _unsupported(x: Tensor, weights: list[Tensor], heads: list[int]) -> str | None:
    if x.dim() != 3:
        return f"context must be (B, S, D), got {tuple(x.shape)}"
    if len({w.dtype for w in weights}) != 1 or weights[0].dtype not in FLOAT_DTYPES or x.dtype not in FLOAT_DTYPES:
        return f"needs float weights of one dtype and a float context, got {sorted({str(w.dtype) for w in weights})}"
    if any(w.device != x.device for w in weights):
        return "weights on another device than the context"
    if any(w.dim() != 2 or w.shape[1] != x.shape[2] or w.shape[0] % h for w, h in zip(weights, heads)):
        return "a weight is not (heads * head_dim, D)"
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != weights[0].dtype:
        return f"context {x.dtype} and weights {weights[0].dtype} differ (outside autocast)"
    return None
