"""Running TensorRT engines on torch CUDA buffers (TensorRT 10 API), shared by the build's parity
check and the runner's ``tensorrt`` backend. **Unverified**: TensorRT cannot be installed where
opad is developed; this is written against its documented API and has never run."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from opad.errors import OpadError


def tensorrt():
    """The tensorrt module when it and a CUDA GPU are here, else one sentence saying which is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise OpadError("TensorRT is not installed (pip install tensorrt needs NVIDIA's package index); the ONNX "
                        "export runs on ONNX Runtime instead: Runner('onnxruntime', onnx=...)") from None
    if not torch.cuda.is_available():
        raise OpadError("TensorRT needs a CUDA GPU and none is available here")
    return trt


def tensor_dtype(trt, engine, name: str) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype


def bind(trt, engine, feeds: dict[str, Tensor]) -> tuple[object, dict[str, Tensor]]:
    """An execution context with each input bound to its feed (cast to the engine's dtype, on the
    GPU) and each output to a new buffer; returns (context, every buffer by name)."""
    context = engine.create_execution_context()
    buffers = {name: t.to("cuda", tensor_dtype(trt, engine, name)).contiguous() for name, t in feeds.items()}
    for name, tensor in buffers.items():
        context.set_input_shape(name, tuple(tensor.shape))
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=tensor_dtype(trt, engine, name),
                                        device="cuda")
        context.set_tensor_address(name, buffers[name].data_ptr())
    return context, buffers


def execute(trt, engine, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
    """One inference; returns the outputs by name (on the GPU, after the stream finished)."""
    context, buffers = bind(trt, engine, feeds)
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise OpadError("TensorRT failed to run the engine")
    stream.synchronize()
    return {k: v for k, v in buffers.items() if k not in feeds}
