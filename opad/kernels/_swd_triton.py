"""The Triton half of :mod:`opad.kernels.swd` (imported only when the kernel is chosen).

Fused sliced-Wasserstein core of MS-SWD: the kernels and their host wrappers. The
reference is :func:`opad.kernels.swd.swd_sorted_l1_reference`: conv2d of the reflect-padded image
with P unit directions (P, C, k, k), a sort of each direction's H*W values, and the mean of
|sorted x - sorted y|. :mod:`opad.kernels.swd` pads the images (its padding rule) and its
autograd, ``SwdSortedL1``, calls :func:`forward` and :func:`backward`. Here:

* ``_project_kernel`` computes the projections as an implicit GEMM straight from the padded
  image (no unfolded patch tensor); directions are processed in chunks so only a chunk's
  projections and sort buffers are alive at a time.
* small levels sort in registers (``_sorted_diff_in_registers_kernel``: tl.sort of the float's
  order key packed with its index, so the permutation comes with it; NaNs order last as in
  torch.sort, so a NaN input gives a NaN loss) and reduce in the same program, with a warp count
  per size (``register_sort_warps``); large ones use torch's sort (a segmented radix sort on CUDA), then
  ``_abs_diff_kernel`` reduces |sorted x - sorted y| to per-block partial sums (no atomics:
  deterministic) and scatters sign(sorted x - sorted y) back through x's sort permutation as
  int8 — the only per-value state kept for backward (1 byte a value; the reference keeps an
  int64 index and the fp32 projections).
* ``_project_back_kernel`` is the transposed implicit GEMM: grad of the padded image from the
  int8 signs and the directions, scaled per batch item; the reflect pad's own backward (folding
  the border into the image) stays torch's.

Only x gets a gradient (the student image); y (the teacher image) never needs one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from opad.kernels.launch import on_device

# Directions per chunk: bounds the live projections and sort buffers to a chunk's worth.
CHUNK = 32
# Levels with at most this many pixels sort in registers (one program per direction, tl.sort on
# packed key+index); larger ones use torch's segmented sort. NOT YET MEASURED on a GPU:
# benchmarks/bench_swd.py --sort-sweep times both per level size, and this constant should
# follow it. 4096 = the two smallest levels of a 512 px pyramid (64^2, 32^2).
REGISTER_SORT_MAX = 4096
# The largest level the register sort can hold at all, whatever ``register_sort_max`` asks: up
# to 4096 values it compiles without spills (``register_sort_warps``); at 8192 it spills at any
# warp count (sm_90: 132 bytes at 16 warps, 84 at 32), and at 16384 ptxas runs for minutes.
# benchmarks/kernel_resources.py measures it (opad.kernels.aot).
REGISTER_SORT_CAP = 4096
# Launch shapes of the other kernels (opad.kernels.aot compiles exactly these).
PROJECT_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}
ABS_DIFF_BLOCK = 1024
PROJECT_BACK_BLOCKS = {"BLOCK_M": 64, "BLOCK_K": 32}
NUM_WARPS = 4  # Triton's default, stated so the AOT compile and the launches agree
# Order keys: every NaN gets one key above +inf's (0x7F800000), as torch.sort puts NaNs last; the
# padding gets the largest key, and the largest indices, so it always sorts after every real value.
_NAN_KEY = tl.constexpr(0x7FC00000)
_PAD_KEY = tl.constexpr(0x7FFFFFFF)


def register_sort_block(n: int) -> int:
    """The register sort's BLOCK for a level of ``n`` values."""
    return triton.next_power_of_2(n)


def register_sort_warps(block: int) -> int:
    """Warps for a register sort of ``block`` values: 8 values a thread from 1024 on (4 warps below).

    Measured (ptxas 12.9, benchmarks/results/kernel_resources.csv): BLOCK 4096 takes 255 registers (the cap)
    with 4 warps on sm_90, 206 with 8, and 122 (sm_90) / 128 (sm_80) with 16; 2048 takes 162 with 4
    and 126 / 122 with 8; 1024 takes 80 / 96 with 4. No spills at the counts chosen here; at 8192
    values it spills at 16 and 32 warps alike (hence :data:`REGISTER_SORT_CAP`).
    """
    return max(NUM_WARPS, min(16, block // 256))


def register_sort_blocks() -> list[int]:
    """Every BLOCK the wrapper can choose: the powers of two up to :data:`REGISTER_SORT_CAP`."""
    return [1 << i for i in range(REGISTER_SORT_CAP.bit_length())]


def project_back_block_c(channels: int) -> int:
    """``_project_back_kernel``'s BLOCK_C for images of ``channels`` channels."""
    return max(16, triton.next_power_of_2(channels))


@triton.jit
def _project_kernel(x_ptr, w_ptr, out_ptr, C, Hp, Wp, W, HW, P, K,
                    KS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[b, n, m] = sum_k xpad[b, c(k), h(m) + i(k), w(m) + j(k)] * w[n, k]
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h, w = offs_m // W, offs_m % W
    x_base = x_ptr + b.to(tl.int64) * C * Hp * Wp
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        c, r = offs_k // (KS * KS), offs_k % (KS * KS)
        i, j = r // KS, r % KS
        a_ptrs = x_base + c[None, :] * Hp * Wp + (h[:, None] + i[None, :]) * Wp + (w[:, None] + j[None, :])
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < HW) & (offs_k[None, :] < K), other=0.0)
        wt = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None],
                     mask=(offs_n[None, :] < P) & (offs_k[:, None] < K), other=0.0)
        acc += tl.dot(a, wt, input_precision="ieee")
    out_ptrs = out_ptr + b.to(tl.int64) * P * HW + offs_n[None, :] * HW + offs_m[:, None]
    tl.store(out_ptrs, acc, mask=(offs_m[:, None] < HW) & (offs_n[None, :] < P))


@triton.jit
def _sign_i8(d):
    return tl.where(d > 0, 1, tl.where(d < 0, -1, 0)).to(tl.int8)


@triton.jit
def _abs_diff_kernel(sx_ptr, sy_ptr, idx_ptr, sign_ptr, partial_ptr, N, P_CHUNK, P_TOTAL, p0, NBLOCKS,
                     BLOCK: tl.constexpr):
    # partial[b, p, blk] = sum |sx - sy| over the block; sign[b, p0 + p, idx] = sign(sx - sy)
    blk, p, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row = (b.to(tl.int64) * P_CHUNK + p) * N
    sx = tl.load(sx_ptr + row + offs, mask=mask, other=0.0)
    sy = tl.load(sy_ptr + row + offs, mask=mask, other=0.0)
    idx = tl.load(idx_ptr + row + offs, mask=mask, other=0)
    d = sx - sy
    tl.store(sign_ptr + (b.to(tl.int64) * P_TOTAL + p0 + p) * N + idx, _sign_i8(d), mask=mask)
    tl.store(partial_ptr + (b * P_CHUNK + p) * NBLOCKS + blk, tl.sum(tl.abs(d), axis=0))


@triton.jit
def _order_key(v, mask):
    # float32 -> int32 with the same order as torch.sort: negatives flip their magnitude bits, every
    # NaN (either sign, any payload) takes one key above +inf, and positions past N the padding key
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, _NAN_KEY, key)  # NaN: exponent all ones, mantissa not 0
    return tl.where(mask, key, _PAD_KEY)


@triton.jit
def _key_value(key):
    # the inverse of _order_key for real values (a NaN comes back as the canonical +NaN)
    return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)


@triton.jit
def _sorted_diff_in_registers_kernel(px_ptr, py_ptr, sign_ptr, partial_ptr, N, P_CHUNK, P_TOTAL, p0,
                                     BLOCK: tl.constexpr):
    # One direction of one item per program, all N values in registers: sort x with its
    # permutation (order key and index packed in one int64), sort y's keys, then as _abs_diff_kernel.
    # The padding sorts last (largest key, then largest index), so the first N sorted positions hold
    # exactly the N real indices: each is written once, none past N.
    p, b = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    row = (b.to(tl.int64) * P_CHUNK + p) * N
    vx = tl.load(px_ptr + row + offs, mask=mask, other=0.0)
    vy = tl.load(py_ptr + row + offs, mask=mask, other=0.0)
    packed = tl.sort((_order_key(vx, mask).to(tl.int64) << 32) | offs.to(tl.int64))
    idx = (packed & 0xFFFFFFFF).to(tl.int32)
    sx = _key_value((packed >> 32).to(tl.int32))
    sy = _key_value(tl.sort(_order_key(vy, mask)))
    d = tl.where(mask, sx - sy, 0.0)  # past N both hold the padding: never summed
    tl.store(sign_ptr + (b.to(tl.int64) * P_TOTAL + p0 + p) * N + idx, _sign_i8(d), mask=mask)
    tl.store(partial_ptr + b * P_CHUNK + p, tl.sum(tl.abs(d), axis=0))


@triton.jit
def _project_back_kernel(sign_ptr, scale_ptr, w_ptr, out_ptr, C, Hp, Wp, H, W, P, K,
                         KS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[b, c, q] = scale[b] * sum_{p,i,j} sign[b, p, y(q) - i, x(q) - j] * w[p, c, i, j]
    pid_m, b = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    yy, xx = offs_m // Wp, offs_m % Wp
    HW = H * W
    sign_base = sign_ptr + b.to(tl.int64) * P * HW
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    PKK = P * KS * KS
    for k0 in range(0, PKK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        p, r = offs_k // (KS * KS), offs_k % (KS * KS)
        i, j = r // KS, r % KS
        sy_, sx_ = yy[:, None] - i[None, :], xx[:, None] - j[None, :]
        valid = (offs_m[:, None] < Hp * Wp) & (offs_k[None, :] < PKK)
        valid = valid & (sy_ >= 0) & (sy_ < H) & (sx_ >= 0) & (sx_ < W)
        g = tl.load(sign_base + p[None, :] * HW + sy_ * W + sx_, mask=valid, other=0).to(tl.float32)
        wt = tl.load(w_ptr + p[:, None] * K + offs_c[None, :] * (KS * KS) + r[:, None],
                     mask=(offs_k[:, None] < PKK) & (offs_c[None, :] < C), other=0.0)
        acc += tl.dot(g, wt, input_precision="ieee")
    acc = acc * tl.load(scale_ptr + b)
    out_ptrs = out_ptr + b.to(tl.int64) * C * Hp * Wp + offs_c[None, :] * Hp * Wp + offs_m[:, None]
    tl.store(out_ptrs, acc, mask=(offs_m[:, None] < Hp * Wp) & (offs_c[None, :] < C))


def _project(xpad: Tensor, w: Tensor, k: int, H: int, W: int) -> Tensor:
    """(B, C, Hp, Wp) padded image, (n, C*k*k) directions -> (B, n, H*W) projections, fp32."""
    B, C, Hp, Wp = xpad.shape
    n, K = w.shape
    out = torch.empty(B, n, H * W, device=xpad.device, dtype=torch.float32)
    grid = (triton.cdiv(H * W, PROJECT_BLOCKS["BLOCK_M"]), triton.cdiv(n, PROJECT_BLOCKS["BLOCK_N"]), B)
    with on_device(xpad.device):
        _project_kernel[grid](xpad, w, out, C, Hp, Wp, W, H * W, n, K, KS=k, **PROJECT_BLOCKS, num_warps=NUM_WARPS)
    return out


def _sorted_diff(px: Tensor, py: Tensor, sign: Tensor, p0: int, register_sort_max: int) -> Tensor:
    """Sum of |sorted px - sorted py| per item; writes the signs of directions p0.. into ``sign``.

    Levels of at most ``register_sort_max`` values sort in registers, never more than
    :data:`REGISTER_SORT_CAP` (past it the kernel spills): larger ones take torch's sort.
    """
    B, n, N = px.shape
    P = sign.shape[1]
    if N <= min(register_sort_max, REGISTER_SORT_CAP):
        partial = torch.empty(B, n, device=px.device, dtype=torch.float32)
        block = register_sort_block(N)
        with on_device(px.device):
            _sorted_diff_in_registers_kernel[(n, B)](px, py, sign, partial, N, n, P, p0,
                                                     BLOCK=block, num_warps=register_sort_warps(block))
        return partial.sum(dim=1, dtype=torch.float64)
    sx, idx = px.sort(dim=2)  # NaNs last, as the register sort's keys
    sy = py.sort(dim=2).values
    nblocks = triton.cdiv(N, ABS_DIFF_BLOCK)
    partial = torch.empty(B, n, nblocks, device=px.device, dtype=torch.float32)
    with on_device(px.device):
        _abs_diff_kernel[(nblocks, n, B)](sx, sy, idx, sign, partial, N, n, P, p0, nblocks,
                                          BLOCK=ABS_DIFF_BLOCK, num_warps=NUM_WARPS)
    return partial.sum(dim=(1, 2), dtype=torch.float64)


def forward(xpad: Tensor, ypad: Tensor, w: Tensor, k: int, H: int, W: int,
             register_sort_max: int) -> tuple[Tensor, Tensor]:
    """Per-item loss (B,) and the int8 signs (B, P, H*W) in x's original (unsorted) order: the
    forward of :class:`opad.kernels.swd.SwdSortedL1` (w: the directions flattened, fp32)."""
    B, P, N = xpad.shape[0], w.shape[0], H * W
    sign = torch.empty(B, P, N, device=xpad.device, dtype=torch.int8)
    total = torch.zeros(B, device=xpad.device, dtype=torch.float64)
    for p0 in range(0, P, CHUNK):
        wc = w[p0:p0 + CHUNK]
        total += _sorted_diff(_project(xpad, wc, k, H, W), _project(ypad, wc, k, H, W), sign, p0, register_sort_max)
    return (total / (P * N)).to(torch.float32), sign


def backward(sign: Tensor, scale: Tensor, w: Tensor, k: int, C: int, Hp: int, Wp: int, H: int, W: int) -> Tensor:
    """The gradient of the padded x (B, C, Hp, Wp) from the signs, each item's scaled by ``scale[b]``."""
    B, P = sign.shape[0], w.shape[0]
    out = torch.empty(B, C, Hp, Wp, device=sign.device, dtype=torch.float32)
    with on_device(sign.device):
        _project_back_kernel[(triton.cdiv(Hp * Wp, PROJECT_BACK_BLOCKS["BLOCK_M"]), B)](
            sign, scale, w, out, C, Hp, Wp, H, W, P, w.shape[1],
            KS=k, BLOCK_C=project_back_block_c(C), **PROJECT_BACK_BLOCKS, num_warps=NUM_WARPS)
    return out

