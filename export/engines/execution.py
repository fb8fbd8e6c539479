"""Running TensorRT engines on torch buffers (TensorRT 10 API), shared by the build's parity check and
the runner's ``tensorrt`` backend (:mod:`opad.export.runtime.tensorrt`).

Everything happens on the device it is given (``cuda:N``): TensorRT allocates on the current CUDA
device, so deserializing, creating contexts and enqueueing run under :func:`on_device`.

**Unverified**: TensorRT cannot be installed where opad is developed; this is written against its
documented API and checked only against a fake of it (tests/faketrt.py) on the CPU.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor

from opad.errors import OpadError


def tensorrt(device: torch.device | str = "cuda"):
    """The tensorrt module when it, a CUDA GPU and a CUDA ``device`` are here, else one sentence
    saying which is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise OpadError("TensorRT is not installed (pip install tensorrt needs NVIDIA's package index); the ONNX "
                        "export runs on ONNX Runtime instead: Runner('onnxruntime', onnx=...)") from None
    if not torch.cuda.is_available():
        raise OpadError("TensorRT needs a CUDA GPU and none is available here")
    if torch.device(device).type != "cuda":
        raise OpadError(f"TensorRT runs on a CUDA device (cuda or cuda:N), not {device}")
    return trt


def on_device(device: torch.device):
    """The block runs with ``device`` as the current CUDA device (nothing to switch for another type)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def stream_handle(device: torch.device) -> int:
    """The device's current stream, as the handle TensorRT enqueues on (0: no CUDA stream)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def tensor_dtype(trt, engine, name: str) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype


def io_names(trt, engine) -> tuple[list[str], list[str]]:
    """(input names, output names) of an engine."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    return inputs, [n for n in names if n not in inputs]


def profile_shapes(engine, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(min, max) shape of an input in the engine's (first) optimization profile."""
    lo, _, hi = engine.get_tensor_profile_shape(name, 0)
    return tuple(int(d) for d in lo), tuple(int(d) for d in hi)


def bind(trt, engine, shapes: dict[str, tuple[int, ...]], device: torch.device) -> tuple[object, dict[str, Tensor]]:
    """A new execution context for these input shapes, every input and output bound to a new buffer
    on ``device``; returns (context, every buffer by name). A shape outside the engine's profile is
    refused in one sentence (TensorRT's ``set_input_shape`` says so by returning False)."""
    with on_device(device):
        context = engine.create_execution_context()
        if context is None:
            raise OpadError("TensorRT could not create an execution context (out of GPU memory?)")
        buffers = {}
        for name, shape in shapes.items():
            if not context.set_input_shape(name, tuple(shape)):
                lo, hi = profile_shapes(engine, name)
                raise OpadError(f"the engine refuses {name} of shape {tuple(shape)}: its profile takes {lo} to {hi}")
            buffers[name] = torch.empty(tuple(shape), dtype=tensor_dtype(trt, engine, name), device=device)
        inputs, outputs = io_names(trt, engine)
        missing = [n for n in inputs if n not in buffers]
        if missing:
            raise OpadError(f"the engine wants input(s) {missing[:3]} that were not given")
        for name in outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=tensor_dtype(trt, engine, name), device=device)
        for name, buffer in buffers.items():
            if not context.set_tensor_address(name, buffer.data_ptr()):
                raise OpadError(f"TensorRT refuses the buffer of {name}")
    return context, buffers


def enqueue(context, device: torch.device, stream: int | None = None) -> None:
    """One inference enqueued on ``stream`` (default: the device's current stream)."""
    if not context.execute_async_v3(stream_handle(device) if stream is None else stream):
        raise OpadError("TensorRT failed to run the engine (its log above says why)")


def execute(trt, engine, feeds: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """One inference on ``device``; returns the outputs by name (after the stream finished)."""
    context, buffers = bind(trt, engine, {name: tuple(t.shape) for name, t in feeds.items()}, device)
    with on_device(device):
        for name, t in feeds.items():
            buffers[name].copy_(t)
        enqueue(context, device)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
    return {k: v for k, v in buffers.items() if k not in feeds}
