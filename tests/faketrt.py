"""A fake of the part of the TensorRT 10 Python API that opad uses, for tests on the CPU.

TensorRT cannot be installed here, so this stands at that boundary and behaves as TensorRT's
documentation says where opad depends on it:

- ``Builder``/``OnnxParser``/``IBuilderConfig``: records the network's creation flags, builder flags
  (TF32 on by default), refittable weights and profile; refuses FP16 on a strongly typed network.
  The "serialized engine" is a JSON description of that build.
- ``ICudaEngine``/``IExecutionContext``: ``set_input_shape`` returns False outside the profile; an
  enqueue reads each input from the address bound to it (the buffers are CPU tensors here), runs
  the ONNX graph with ONNX Runtime, and writes each output to its address.
- ``Refitter``: refuses a weight that is not refittable, or whose dtype or shape differs from the
  original weight's (the ONNX initializer's), and refits the graph the engine runs.

:func:`make` returns a fresh fake module; ``fake.log`` records builds, contexts and shapes.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
import weakref

import numpy as np
import onnx
from onnx import numpy_helper


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 7


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
_ORT = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(uint8)": DataType.UINT8,
        "tensor(int64)": DataType.INT64, "tensor(int32)": DataType.INT32}


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    TF32 = 7
    REFIT_INDIVIDUAL = 20


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


def make():
    """A fresh fake ``tensorrt`` module."""
    log = {"builds": [], "contexts": [], "shapes": [], "refits": [], "enqueues": []}

    class Logger:
        WARNING = 2

        def __init__(self, level=WARNING):
            self.level = level

    class Network:
        def __init__(self, flags: int):
            self.strongly_typed = bool(flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
            self.path = None
            self.initializers: set[str] = set()
            self.refittable: list[str] = []

        def mark_weights_refittable(self, name: str) -> bool:
            if name not in self.initializers:
                return False
            self.refittable.append(name)
            return True

    class OnnxParser:
        def __init__(self, network: Network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path: str) -> bool:
            self.network.path = path
            self.network.initializers = {t.name for t in onnx.load(path).graph.initializer}
            return True

        def get_error(self, i):
            return None

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self) -> bytes:
            return b"fake timing cache"

    class Config:
        def __init__(self):
            self.flags = {BuilderFlag.TF32}  # TensorRT's default
            self.profiles, self.pools = [], {}

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def get_flag(self, flag) -> bool:
            return flag in self.flags

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch) -> bool:
            return True

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags: int = 0):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network: Network, config: Config):
            flags = sorted(f.name for f in config.flags)
            if network.strongly_typed and "FP16" in flags:  # TensorRT: not allowed on a strongly typed network
                return None
            if network.refittable and "REFIT_INDIVIDUAL" not in flags:
                return None
            spec = {"onnx": network.path, "profile": config.profiles[0].shapes, "flags": flags,
                    "strongly_typed": network.strongly_typed, "refittable": network.refittable}
            log["builds"].append(spec)
            return json.dumps(spec).encode()

    class Engine:
        def __init__(self, spec: dict):
            self.spec = spec
            self.model = onnx.load(spec["onnx"])
            self.original = {t.name: numpy_helper.to_array(t) for t in self.model.graph.initializer
                             if t.name in spec["refittable"]}
            self._session()

        def _session(self):
            import onnxruntime as ort

            self.session = ort.InferenceSession(self.model.SerializeToString(), providers=["CPUExecutionProvider"])
            self.output_shapes: dict = {}
            self.io = [(i.name, TensorIOMode.INPUT, _ORT[i.type]) for i in self.session.get_inputs()]
            self.io += [(o.name, TensorIOMode.OUTPUT, _ORT[o.type]) for o in self.session.get_outputs()]

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, i: int) -> str:
            return self.io[i][0]

        def _io(self, name):
            return next(x for x in self.io if x[0] == name)

        def get_tensor_mode(self, name: str):
            return self._io(name)[1]

        def get_tensor_dtype(self, name: str):
            return self._io(name)[2]

        def get_tensor_profile_shape(self, name: str, profile_index: int):
            return [tuple(s) for s in self.spec["profile"][name]]

        def create_execution_context(self):
            context = Context(self)
            log["contexts"].append(weakref.ref(context))
            return context

    class Context:
        def __init__(self, engine: Engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name: str, shape) -> bool:
            lo, _, hi = self.engine.spec["profile"][name]
            if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = tuple(shape)
            log["shapes"].append((self.engine.spec["onnx"], name, tuple(shape)))
            return True

        def get_tensor_shape(self, name: str):
            """An output's shape for the input shapes set (TensorRT infers it; here ONNX Runtime, once)."""
            key = tuple(sorted(self.shapes.items()))
            if key not in self.engine.output_shapes:
                feeds = {n: np.zeros(shape, _NP[self.engine.get_tensor_dtype(n)]) for n, shape in self.shapes.items()}
                names = [o.name for o in self.engine.session.get_outputs()]
                outs = self.engine.session.run(names, feeds)
                self.engine.output_shapes[key] = {n: o.shape for n, o in zip(names, outs)}
            return self.engine.output_shapes[key][name]

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            inputs = [n for n, mode, _ in self.engine.io if mode == TensorIOMode.INPUT]
            if set(self.shapes) != set(inputs) or set(self.addresses) != {n for n, _, _ in self.engine.io}:
                return False
            feeds = {n: _read(self.addresses[n], self.shapes[n], _NP[self.engine.get_tensor_dtype(n)]) for n in inputs}
            log["enqueues"].append({n: a.shape for n, a in feeds.items()})
            names = [o.name for o in self.engine.session.get_outputs()]
            for name, value in zip(names, self.engine.session.run(names, feeds)):
                want = tuple(self.get_tensor_shape(name))
                if value.shape != want or value.dtype != _NP[self.engine.get_tensor_dtype(name)]:
                    return False
                ctypes.memmove(self.addresses[name], np.ascontiguousarray(value).ctypes.data, value.nbytes)
            return True

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes):
            return Engine(json.loads(bytes(data)))

    class Weights:
        def __init__(self, array: np.ndarray):
            self.array = array

    class Refitter:
        def __init__(self, engine: Engine, logger):
            self.engine, self.pending = engine, {}

        def set_named_weights(self, name: str, weights: Weights) -> bool:
            original = self.engine.original.get(name)
            if original is None or weights.array.dtype != original.dtype or weights.array.shape != original.shape:
                return False  # TensorRT: a refit weight must match the original's type and count
            self.pending[name] = weights.array
            return True

        def refit_cuda_engine(self) -> bool:
            for t in self.engine.model.graph.initializer:
                if t.name in self.pending:
                    t.CopyFrom(numpy_helper.from_array(self.pending[t.name], t.name))
            log["refits"].append(sorted(self.pending))
            self.engine._session()
            return True

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.fake"
    fake.log = log
    for name, value in dict(locals()).items():
        if isinstance(value, type):
            setattr(fake, name, value)
    for value in (DataType, TensorIOMode, BuilderFlag, NetworkDefinitionCreationFlag, MemoryPoolType):
        setattr(fake, value.__name__, value)
    fake.nptype = lambda dtype: _NP[DataType(dtype)]
    fake.live_contexts = lambda: sum(ref() is not None for ref in log["contexts"])
    return fake


def _read(address: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A copy of the array at a (CPU) address."""
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * count).from_address(address), dtype=dtype).reshape(shape).copy()
