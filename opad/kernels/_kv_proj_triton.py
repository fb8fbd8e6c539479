"""The Triton half of :mod:`opad.kernels.kv_proj` (imported only when the kernel is chosen)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32


@triton.jit
def _head_split(m, n, S, hd, N):
    # offset of row m = (b, s) and column n = (h, d) in a (B, N // hd, S, hd) tensor
    return ((m // S * (N // hd) + n // hd) * S + m % S) * hd + n % hd


@triton.jit
def _tile(tiles, t, n_of, hd_of):
    # tile t of the table: its weight g, first column n0, and g's width and head size
    g = tl.load(tiles + 2 * t)
    return g, tl.load(tiles + 2 * t + 1), tl.load(n_of + g), tl.load(hd_of + g)


@triton.jit
def _kv_forward_kernel(x_ptr, w_ptrs, out_ptrs, tiles, n_of, hd_of, M, S, D,
                       DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out_g[b, n // hd, s, n % hd] = sum_k x[b, s, k] * w_g[n, k] for the tile's weight g
    pid_m, t = tl.program_id(0), tl.program_id(1)
    g, n0, N, hd = _tile(tiles, t, n_of, hd_of)
    w_ptr = tl.load(w_ptrs + g).to(tl.pointer_type(W_DTYPE))
    out_ptr = tl.load(out_ptrs + g).to(tl.pointer_type(DTYPE))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * D + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < D), other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * D + offs_k[:, None],
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < D), other=0.0).to(DTYPE)
        acc += tl.dot(a, b, input_precision="ieee")
    dst = _head_split(offs_m[:, None], offs_n[None, :], S, hd, N)
    tl.store(out_ptr + dst, acc.to(DTYPE), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _kv_dw_kernel(x_ptr, gout_ptrs, dw_ptrs, tiles, n_of, hd_of, M, S, D,
                  DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    # dw_g[n, k] = sum_m gout_g[b(m), n // hd, s(m), n % hd] * x[m, k]
    t, pid_k = tl.program_id(0), tl.program_id(1)
    g, n0, N, hd = _tile(tiles, t, n_of, hd_of)
    gout_ptr = tl.load(gout_ptrs + g).to(tl.pointer_type(DTYPE))
    dw_ptr = tl.load(dw_ptrs + g).to(tl.pointer_type(W_DTYPE))
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        src = _head_split(offs_m[None, :], offs_n[:, None], S, hd, N)
        go = tl.load(gout_ptr + src, mask=(offs_n[:, None] < N) & (offs_m[None, :] < M), other=0.0)
        xv = tl.load(x_ptr + offs_m[:, None] * D + offs_k[None, :],
                     mask=(offs_m[:, None] < M) & (offs_k[None, :] < D), other=0.0)
        acc += tl.dot(go, xv, input_precision="ieee")
    tl.store(dw_ptr + offs_n[:, None] * D + offs_k[None, :], acc.to(W_DTYPE),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < D))


@triton.jit
def _kv_dx_kernel(gout_ptrs, w_ptrs, n_of, hd_of, G, dx_ptr, M, S, D,
                  DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # dx[m, k] = sum_g sum_n gout_g[b(m), n // hd, s(m), n % hd] * w_g[n, k]
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for g in range(0, G):
        gout_ptr = tl.load(gout_ptrs + g).to(tl.pointer_type(DTYPE))
        w_ptr = tl.load(w_ptrs + g).to(tl.pointer_type(W_DTYPE))
        N = tl.load(n_of + g)
        hd = tl.load(hd_of + g)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            src = _head_split(offs_m[:, None], offs_n[None, :], S, hd, N)
            go = tl.load(gout_ptr + src, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
            wv = tl.load(w_ptr + offs_n[:, None] * D + offs_k[None, :],
                         mask=(offs_n[:, None] < N) & (offs_k[None, :] < D), other=0.0).to(DTYPE)
            acc += tl.dot(go, wv, input_precision="ieee")
    tl.store(dx_ptr + offs_m[:, None] * D + offs_k[None, :], acc.to(DTYPE),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < D))


def _table(values: list[int], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _tiles(sizes: list[int], block: int, device: torch.device) -> tuple[Tensor, int]:
    pairs = [(g, n0) for g, n in enumerate(sizes) for n0 in range(0, n, block)]
    return _table([v for pair in pairs for v in pair], device), len(pairs)


class KVProject(torch.autograd.Function):
    """outputs[g] = (x @ weights[g].T) split into heads[g] heads, for every g in one launch.

    The product runs in x's dtype (weights are converted as they are loaded, as autocast would
    cast them); outputs and dX are in x's dtype, each dW in its weight's dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, heads: list[int], *weights: Tensor) -> tuple[Tensor, ...]:
        B, S, D = x.shape
        x2 = x.detach().contiguous()
        ws = [w.detach().contiguous() for w in weights]
        outs = [torch.empty(B, h, S, w.shape[0] // h, device=x.device, dtype=x.dtype) for w, h in zip(ws, heads)]
        sizes = [w.shape[0] for w in ws]
        hds = [n // h for n, h in zip(sizes, heads)]
        tiles, count = _tiles(sizes, BLOCK_N, x.device)
        _kv_forward_kernel[(triton.cdiv(B * S, BLOCK_M), count)](
            x2, _table([w.data_ptr() for w in ws], x.device), _table([o.data_ptr() for o in outs], x.device),
            tiles, _table(sizes, x.device), _table(hds, x.device), B * S, S, D,
            DTYPE=_TL[x.dtype], W_DTYPE=_TL[ws[0].dtype], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        ctx.save_for_backward(x2, *ws)
        ctx.hds = hds
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x, *ws = ctx.saved_tensors
        B, S, D = x.shape
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        # only the weights that want a gradient and got one take part
        live = [g for g, gr in enumerate(grads) if gr is not None]
        gouts = {g: grads[g].contiguous() for g in live}
        dws: list[Tensor | None] = [None] * len(ws)
        want_w = [g for g in live if needs_w[g]]
        if want_w:
            for g in want_w:
                dws[g] = torch.empty_like(ws[g])
            sizes = [ws[g].shape[0] for g in want_w]
            tiles, count = _tiles(sizes, BLOCK_N, x.device)
            _kv_dw_kernel[(count, triton.cdiv(D, BLOCK_K))](
                x, _table([gouts[g].data_ptr() for g in want_w], x.device),
                _table([dws[g].data_ptr() for g in want_w], x.device), tiles, _table(sizes, x.device),
                _table([ctx.hds[g] for g in want_w], x.device), B * S, S, D,
                DTYPE=_TL[x.dtype], W_DTYPE=_TL[ws[0].dtype], BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M)
        for g, w in enumerate(ws):  # a weight that wants a gradient but got no output gradient
            if needs_w[g] and dws[g] is None:
                dws[g] = torch.zeros_like(w)
        dx = None
        if needs_x:
            dx = torch.zeros_like(x)
            if live:
                _kv_dx_kernel[(triton.cdiv(B * S, BLOCK_M), triton.cdiv(D, BLOCK_K))](
                    _table([gouts[g].data_ptr() for g in live], x.device),
                    _table([ws[g].data_ptr() for g in live], x.device),
                    _table([ws[g].shape[0] for g in live], x.device), _table([ctx.hds[g] for g in live], x.device),
                    len(live), dx, B * S, S, D,
                    DTYPE=_TL[x.dtype], W_DTYPE=_TL[ws[0].dtype], BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
        return (dx, None, *dws)
