"""The Triton half of :mod:`opad.kernels.kv_proj` (imported only when the kernel is chosen): the
kernels and the launches of its autograd's :func:`forward` and :func:`backward`.

The kernels read the weights, and write the outputs, through small device tables (pointers, sizes,
tile lists). Building one from a Python list is a blocking host-to-device copy, and a training
step calls this 5-10 times, so (:class:`_TableCache`):

* the weight tables (pointers, widths, head sizes, tiles) are cached per weight set;
* the forward's outputs are views into one buffer allocated per call, so their table is a list of
  fixed column offsets into it (cached with the weights' tables): a forward copies nothing to the
  device once warm, and can be captured in a CUDA graph;
* backward's tables hold the incoming gradients' and the new dW's pointers, new every call: they go
  up from pinned host memory without blocking (:func:`_upload`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from opad.kernels.launch import on_device

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32


def num_warps(dtype: torch.dtype) -> int:
    """Warps of every K/V launch for a context of ``dtype`` (the AOT compile, opad.kernels.aot, asks too).

    fp32 contexts take 8: their exact fp32 dots hold more in registers, and with 4 warps triton 3.6 (the
    GPU image's) spills the dX kernel at the 255-register cap (3.8: 188 / 218 registers on sm_80 / sm_90;
    with 8, 234 on 3.6 and 128 on 3.8, no spills). Half contexts keep Triton's default 4."""
    return 8 if dtype == torch.float32 else 4


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
def _kv_forward_kernel(x_ptr, w_ptrs, out_base, out_cols, tiles, n_of, hd_of, M, S, D,
                       DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    # out_g[b, n // hd, s, n % hd] = sum_k x[b, s, k] * w_g[n, k] for the tile's weight g; out_g
    # starts M * (the widths of the weights before g) elements into the one output buffer
    pid_m, t = tl.program_id(0), tl.program_id(1)
    g, n0, N, hd = _tile(tiles, t, n_of, hd_of)
    w_ptr = tl.load(w_ptrs + g).to(tl.pointer_type(W_DTYPE))
    out_ptr = out_base + M * tl.load(out_cols + g)
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
                  DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_M: tl.constexpr):
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
                  DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_N: tl.constexpr):
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


# ------------------------------------------------------------------ the tables
def _upload(values: list[int], device: torch.device) -> Tensor:
    """An int64 device table of ``values`` for this call's launches, on the current stream. On CUDA
    from pinned memory without blocking: the caching host allocator keeps the pinned block until the
    copy has run, so it may be dropped at once."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    return torch.tensor(values, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)


class _WeightTables:
    """The device tables of one weight set: pointers, widths, head sizes, the (weight, first
    column) tile list, and each weight's first column in a buffer of all outputs side by side."""

    def __init__(self, ptrs: tuple[int, ...], sizes: tuple[int, ...], hds: tuple[int, ...],
                 device: torch.device) -> None:
        tiles = [(g, n0) for g, n in enumerate(sizes) for n0 in range(0, n, BLOCK_N)]
        cols = [sum(sizes[:g]) for g in range(len(sizes))]
        # one blocking copy for all five, sliced: built once per weight set, complete before any
        # stream reads it (a CUDA graph captures after the warm-up built it)
        flat = torch.tensor([*ptrs, *sizes, *hds, *cols, *(v for tile in tiles for v in tile)],
                            dtype=torch.int64, device=device)
        self.ptrs, self.sizes, self.hds, self.cols, self.tiles = flat.split([len(ptrs)] * 4 + [2 * len(tiles)])
        self.tile_count = len(tiles)


class _TableCache:
    """A small LRU of :class:`_WeightTables`, keyed by exactly what a table holds.

    The key is the weights' data pointers, widths, head sizes, dtype and device. The weights'
    version counters are deliberately not in it: a table holds where the weights are, not their
    values, and a kernel reads the values through the pointers at launch, so an in-place update
    (an optimizer step) needs no new table. A replaced weight (new storage) has another pointer and
    gets a new table; a freed weight's memory taken over by another of the same width and dtype
    gives an equal key, and the cached pointer is then the new weight's, which is right too.
    """

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self.builds = 0  # tables built (tests count them)
        self._tables: OrderedDict[tuple, _WeightTables] = OrderedDict()
        self._lock = threading.Lock()  # the server may project from several threads

    def get(self, weights: list[Tensor], hds: list[int]) -> _WeightTables:
        device = weights[0].device
        ptrs, sizes = tuple(w.data_ptr() for w in weights), tuple(w.shape[0] for w in weights)
        key = (device, weights[0].dtype, ptrs, sizes, tuple(hds))
        with self._lock:
            tables = self._tables.get(key)
            if tables is None:
                tables = self._tables[key] = _WeightTables(ptrs, sizes, tuple(hds), device)
                self.builds += 1
                if len(self._tables) > self.capacity:
                    self._tables.popitem(last=False)  # freed in stream order: a queued launch still reads it
            self._tables.move_to_end(key)
            return tables

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()
            self.builds = 0

    def __len__(self) -> int:
        return len(self._tables)


TABLES = _TableCache()


def forward(x: Tensor, ws: list[Tensor], heads: list[int]) -> tuple[Tensor, ...]:
    """The forward of :class:`opad.kernels.kv_proj.KVProject` for a contiguous context (B, S, D) and
    contiguous weights: one launch; the outputs, in x's dtype, are views into one buffer."""
    B, S, D = x.shape
    M = B * S
    hds = [w.shape[0] // h for w, h in zip(ws, heads)]
    tables = TABLES.get(ws, hds)
    buffer = torch.empty(M * sum(w.shape[0] for w in ws), device=x.device, dtype=x.dtype)
    outs, start = [], 0
    for w, h in zip(ws, heads):
        outs.append(buffer[start:start + M * w.shape[0]].view(B, h, S, w.shape[0] // h))
        start += M * w.shape[0]
    with on_device(x.device):
        _kv_forward_kernel[(triton.cdiv(M, BLOCK_M), tables.tile_count)](
            x, tables.ptrs, buffer, tables.cols, tables.tiles, tables.sizes, tables.hds, M, S, D,
            DTYPE=_TL[x.dtype], W_DTYPE=_TL[ws[0].dtype], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            num_warps=num_warps(x.dtype))
    return tuple(outs)


def backward(x: Tensor, ws: list[Tensor], hds: list[int], grads: tuple[Tensor | None, ...], needs_x: bool,
             needs_w: tuple[bool, ...]) -> tuple[Tensor | None, list[Tensor | None]]:
    """(dX, every dW) of :class:`opad.kernels.kv_proj.KVProject`: dW in one launch, dX in a second,
    each only where wanted; ``hds`` are the weights' head sizes."""
    B, S, D = x.shape
    # only the weights that want a gradient and got one take part
    live = [g for g, gr in enumerate(grads) if gr is not None]
    want_w = [g for g in live if needs_w[g]]
    dx_from = live if needs_x else []
    gouts = {g: grads[g].contiguous() for g in live}
    dws: list[Tensor | None] = [None] * len(ws)
    for g in want_w:
        dws[g] = torch.empty_like(ws[g])
    if want_w or dx_from:
        # the pointers that change every call, in one non-blocking upload: gradients and dW for
        # the dW launch, gradients for the dX launch
        ptrs = _upload([*(gouts[g].data_ptr() for g in want_w), *(dws[g].data_ptr() for g in want_w),
                        *(gouts[g].data_ptr() for g in dx_from)], x.device)
        gout_w, dw_ptrs, gout_x = ptrs.split([len(want_w), len(want_w), len(dx_from)])
    if want_w:
        tables = TABLES.get([ws[g] for g in want_w], [hds[g] for g in want_w])
        with on_device(x.device):
            _kv_dw_kernel[(tables.tile_count, triton.cdiv(D, BLOCK_K))](
                x, gout_w, dw_ptrs, tables.tiles, tables.sizes, tables.hds, B * S, S, D,
                DTYPE=_TL[x.dtype], W_DTYPE=_TL[ws[0].dtype], BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                BLOCK_M=BLOCK_M, num_warps=num_warps(x.dtype))
    for g, w in enumerate(ws):  # a weight that wants a gradient but got no output gradient
        if needs_w[g] and dws[g] is None:
            dws[g] = torch.zeros_like(w)
    dx = None
    if needs_x:
        dx = torch.zeros_like(x)
        if dx_from:
            tables = TABLES.get([ws[g] for g in dx_from], [hds[g] for g in dx_from])
            with on_device(x.device):
                _kv_dx_kernel[(triton.cdiv(B * S, BLOCK_M), triton.cdiv(D, BLOCK_K))](
                    gout_x, tables.ptrs, tables.sizes, tables.hds, len(dx_from), dx, B * S, S, D,
                    DTYPE=_TL[x.dtype], W_DTYPE=_TL[ws[0].dtype], BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
                    BLOCK_N=BLOCK_N, num_warps=num_warps(x.dtype))
    return dx, dws
