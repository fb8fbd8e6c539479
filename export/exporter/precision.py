"""Exact float32 where float32 results are compared (the export's and the TensorRT build's parity checks).

On Ampere and later GPUs PyTorch may run float32 convolutions (cuDNN: on by default) and matmuls
(cuBLAS: per ``torch.backends.cuda.matmul``) in TF32, whose 10-bit mantissa differs from exact
float32 by far more than the 1e-3 the parity checks allow against ONNX Runtime's exact float32 on
the CPU. :func:`exact_fp32` switches TF32 off for a block and restores what was set before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# torch >= 2.9 keeps one precision per (backend, op); its legacy flags (allow_tf32,
# set_float32_matmul_precision) write through to these and fail on reading when the two disagree
_OPS = {"matmul": torch.backends.cuda.matmul, "conv": torch.backends.cudnn.conv, "rnn": torch.backends.cudnn.rnn,
        "mkldnn_matmul": torch.backends.mkldnn.matmul}  # the last only because the legacy matmul setter writes it


def tf32_state() -> dict[str, str]:
    """The float32 precision of each op family: ``ieee`` (exact), ``tf32`` or ``none`` (inherited)."""
    return {op: owner.fp32_precision for op, owner in _OPS.items()}


def _legacy(read) -> object:
    try:
        return read()
    except RuntimeError:  # the caller mixed the legacy and new APIs: torch refuses to answer
        return None


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for cuBLAS matmuls and cuDNN convolutions / RNNs inside the block, restored after.

    The legacy flags are switched too (``torch.get_float32_matmul_precision()`` and
    ``torch.backends.cudnn.allow_tf32``): cuBLAS refuses to run while the legacy matmul precision and
    the new per-op one disagree."""
    saved = tf32_state()
    legacy_matmul = _legacy(torch.get_float32_matmul_precision)
    legacy_cudnn = _legacy(lambda: torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")  # legacy "highest" and every matmul "ieee", consistently
    torch.backends.cudnn.allow_tf32 = False  # legacy flag off (conv/rnn inherit)...
    for owner in (torch.backends.cudnn.conv, torch.backends.cudnn.rnn):
        owner.fp32_precision = "ieee"  # ...and exact even where a global tf32 would be inherited
    try:
        yield
    finally:
        if legacy_matmul is not None:
            torch.set_float32_matmul_precision(legacy_matmul)
        if legacy_cudnn is not None:
            torch.backends.cudnn.allow_tf32 = legacy_cudnn
        for op, owner in _OPS.items():
            owner.fp32_precision = saved[op]
