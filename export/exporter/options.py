"""The export script's option checks (``export/export_onnx.py``): every problem is one ``error:``
line before any work starts."""

from __future__ import annotations

import argparse

from opad.export.engines.plan import parse_range

from opad.devices import pick_device
from opad.diffusion.sampling import STUDENT_STEPS
from opad.errors import OpadError
from opad.generate import check_output_options

EXPORTERS = ("dynamo", "torchscript")
MIN_OPSET = 17


def parse_steps(text: str) -> list[int]:
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise OpadError(f"--steps must be a comma-separated list of {STUDENT_STEPS}, got {text!r}") from None
    if not steps or any(s not in STUDENT_STEPS for s in steps):
        raise OpadError(f"--steps must be a comma-separated list of {STUDENT_STEPS}, got {text!r}")
    return steps


def parse_batch(args: argparse.Namespace) -> tuple[int, int]:
    """(min, max) batch: equal for a static batch."""
    if args.batch_range is None:
        if args.batch < 1:
            raise OpadError(f"--batch must be at least 1, got {args.batch}")
        return args.batch, args.batch
    return parse_range(args.batch_range)


def check_args(args: argparse.Namespace) -> None:
    if args.opset < MIN_OPSET:
        raise OpadError(f"--opset must be at least {MIN_OPSET}, got {args.opset}")
    check_output_options(args)
    if args.fp16 and pick_device(args.device).type != "cuda":
        raise OpadError("--fp16 exports trace and check on a GPU: pass --device cuda (the CPU has no fp16 kernels "
                        "for the convolutions)")

