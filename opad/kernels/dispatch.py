"""One switch for every accelerated op: ``OPAD_KERNELS=auto|triton|reference``.

Every op has two implementations: its pure-torch **reference**, and its **accelerated**
implementation, which is the op's Triton kernel (``swd_sorted_l1``, ``kv_proj``) or, for
``feature_pass``, the compiled C++/CUDA extension ``opad._C`` (csrc/). ``triton`` is the
switch's name for "accelerated", so for ``feature_pass`` it forces the extension.

- ``auto`` (the default): a Triton op takes its kernel for CUDA tensors and the reference
  otherwise; the extension op takes the extension wherever it was built for the device (its CPU
  part always, its CUDA part when compiled with nvcc), and falls back to the reference otherwise
  (``Choice.fallback``: the op warns once).
- ``triton``: forces each op's accelerated implementation (a Triton kernel takes CPU tensors only
  under ``TRITON_INTERPRET=1``) and fails with one clear error where it cannot run.
- ``reference``: forces the reference.

Every op asks :func:`choose` and nothing else reads the variable, so tests flip one environment
variable to compare the implementations. ``Choice.impl`` names what runs: ``"triton"``,
``"extension"`` or ``"reference"``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from opad.errors import OpadError

ENV = "OPAD_KERNELS"
MODES = ("auto", "triton", "reference")


@dataclass(frozen=True)
class Op:
    what: str
    accelerated_by: str  # "triton" (the op's Triton kernel) or "extension" (opad._C)
    accelerated: str  # where the accelerated implementation lives, for the report


# the report of ``python -m opad.kernels`` lists them in this order; each op's public module is
# opad/kernels/<op module>.py (reference, autograd, dispatch), its accelerated half beside it
OPS = {
    "swd_sorted_l1": Op("MS-SWD per scale: patch projection, sort, |sorted x - sorted y| (opad/kernels/swd.py)",
                        "triton", "Triton kernel, opad/kernels/_swd_triton.py"),
    "kv_proj": Op("every cross-attention layer's K/V from one context in one launch (opad/kernels/kv_proj.py)",
                  "triton", "Triton kernel, opad/kernels/_kv_proj_triton.py"),
    "feature_pass": Op("every backbone's resized, normalised input from one image, and the summed gradient back "
                       "(opad/kernels/feature_pass.py)", "extension", "C++/CUDA extension opad._C, csrc/"),
}


@dataclass(frozen=True)
class Choice:
    impl: str  # "triton", "extension" or "reference": what runs
    reason: str
    fallback: bool = False  # auto wanted the accelerated implementation but it cannot run here

    @property
    def accelerated(self) -> bool:
        """Whether the op's accelerated implementation runs (its Triton kernel, or opad._C)."""
        return self.impl != "reference"


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


@functools.cache
def _load_extension() -> tuple[ModuleType | None, str]:
    """(opad._C, "") or (None, why it could not be imported); tried once per process."""
    try:
        return importlib.import_module("opad._C"), ""
    except ImportError as e:  # not built, or built against another torch (undefined symbols)
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"opad._C is not importable ({text[:160]}); pip install --no-build-isolation -e . builds it"


def extension() -> ModuleType:
    """The compiled extension; raises ``OpadError`` when it is not built."""
    module, problem = _load_extension()
    if module is None:
        raise OpadError(problem)
    return module


def _extension_problem(device: torch.device) -> str | None:
    """Why opad._C cannot run on ``device``, or None when it can."""
    module, problem = _load_extension()
    if module is None:
        return problem
    if device.type == "cuda":
        return None if module.cuda_built() else "opad._C was built without CUDA (no nvcc at install time)"
    return None if device.type == "cpu" else f"opad._C has no {device.type} implementation"


def _triton_problem(device: torch.device) -> str | None:
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
    if OPS[op].accelerated_by == "extension":
        return _choose_extension(op, device, chosen, unsupported)
    problem = _triton_problem(device) or unsupported
    if chosen == "triton":
        if problem:
            raise OpadError(f"{ENV}=triton but the {op} kernel cannot run here: {problem}")
        return Choice("triton", f"{ENV}=triton")
    if device.type != "cuda":  # the interpreter is for tests, never an automatic choice
        return Choice("reference", f"auto: {device.type} tensors use the reference")
    if problem:
        return Choice("reference", f"auto: {problem}")
    return Choice("triton", "auto: Triton kernel for cuda tensors")


def _choose_extension(op: str, device: torch.device, chosen: str, unsupported: str | None) -> Choice:
    problem = _extension_problem(device) or unsupported
    if chosen == "triton":  # forces the accelerated implementation, which for this op is the extension
        if problem:
            raise OpadError(f"{ENV}=triton but the compiled {op} cannot run here: {problem}")
        return Choice("extension", f"{ENV}=triton forces the accelerated implementation: opad._C")
    if problem:
        return Choice("reference", f"auto: {problem}", fallback=True)
    return Choice("extension", f"auto: opad._C for {device.type} tensors")


def report() -> str:
    """What each op would use on this machine, per device, and why (``python -m opad.kernels``)."""
    mode()  # a bad OPAD_KERNELS value is one error, not a line per op
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [f"{ENV}={os.environ.get(ENV, 'auto')!s}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}  "
             f"triton {'installed' if triton_installed() else 'missing'}  {_extension_summary()}  "
             f"CUDA {'available' if torch.cuda.is_available() else 'not available'}"]
    for op, spec in OPS.items():
        lines.append(f"{op}: {spec.what}")
        lines.append(f"  accelerated = {spec.accelerated}")
        for device in devices:
            try:
                c = choose(op, device)
                lines.append(f"  {device:5s} -> {c.impl:9s} ({c.reason})")
            except OpadError as e:
                lines.append(f"  {device:5s} -> error     ({e})")
    if not torch.cuda.is_available():
        lines.append("  cuda  -> (no CUDA GPU on this machine)")
    return "\n".join(lines)


def _extension_summary() -> str:
    module, _ = _load_extension()
    if module is None:
        return "opad._C missing"
    return f"opad._C built ({'CPU + CUDA' if module.cuda_built() else 'CPU only'})"
