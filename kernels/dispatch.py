"""One switch for every accelerated op: ``OPAD_KERNELS=auto|triton|reference``.

``auto`` (the default) takes an op's Triton kernel for CUDA tensors and its pure-torch reference
otherwise; ``triton`` forces the kernel (CPU tensors only under ``TRITON_INTERPRET=1``, set
before the kernels are imported) and fails with one clear error where it cannot run;
``reference`` forces the reference. Every op asks :func:`choose` and nothing else reads the
variable, so tests flip one environment variable to compare the two implementations.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from opad.errors import OpadError

ENV = "OPAD_KERNELS"
MODES = ("auto", "triton", "reference")

# op name -> what it computes (the report of ``python -m opad.kernels`` lists them in this order)
OPS = {
    "swd_sorted_l1": "MS-SWD per scale: patch projection, sort, |sorted x - sorted y| (kernels/swd.py)",
    "kv_proj": "every cross-attention layer's K/V from one context in one launch (kernels/kv_proj.py)",
}


@dataclass(frozen=True)
class Choice:
    impl: str  # "triton" or "reference"
    reason: str

    @property
    def triton(self) -> bool:
        return self.impl == "triton"


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise OpadError(f"{ENV} must be one of {', '.join(MODES)}, got {os.environ.get(ENV)!r}")
    return value


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read when the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _device_problem(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on ``device``, or None when it can."""
    if not triton_installed():
        return "triton is not installed"
    if device.type == "cuda":
        return None if not interpreting() else "TRITON_INTERPRET=1 runs kernels on the CPU only"
    if device.type == "cpu":
        return None if interpreting() else "CPU tensors need TRITON_INTERPRET=1 for the Triton kernel"
    return f"no Triton kernel for {device.type} tensors"


def choose(op: str, device: torch.device | str, unsupported: str | None = None) -> Choice:
    """The implementation of ``op`` for tensors on ``device``.

    ``unsupported`` is the op's own reason the kernel cannot take these inputs (e.g. a gradient
    the kernel does not compute); ``auto`` then falls back, ``triton`` raises.
    """
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}")
    device = torch.device(device)
    chosen = mode()
    if chosen == "reference":
        return Choice("reference", f"{ENV}=reference")
    problem = _device_problem(device) or unsupported
    if chosen == "triton":
        if problem:
            raise OpadError(f"{ENV}=triton but the {op} kernel cannot run here: {problem}")
        return Choice("triton", f"{ENV}=triton")
    if device.type != "cuda":  # the interpreter is for tests, never an automatic choice
        return Choice("reference", f"auto: {device.type} tensors use the reference")
    if problem:
        return Choice("reference", f"auto: {problem}")
    return Choice("triton", "auto: Triton kernel for cuda tensors")


def report() -> str:
    """What each op would use on this machine, per device, and why (``python -m opad.kernels``)."""
    mode()  # a bad OPAD_KERNELS value is one error, not a line per op
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [f"{ENV}={os.environ.get(ENV, 'auto')!s}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}  "
             f"triton {'installed' if triton_installed() else 'missing'}  "
             f"CUDA {'available' if torch.cuda.is_available() else 'not available'}"]
    for op, what in OPS.items():
        lines.append(f"{op}: {what}")
        for device in devices:
            try:
                c = choose(op, device)
                lines.append(f"  {device:5s} -> {c.impl:9s} ({c.reason})")
            except OpadError as e:
                lines.append(f"  {device:5s} -> error     ({e})")
    if not torch.cuda.is_available():
        lines.append("  cuda  -> (no CUDA GPU on this machine)")
    return "\n".join(lines)
