"""The ``tensorrt`` backend of :class:`opad.export.runtime.Runner`: the engines of
``export/build_trt.py`` on one CUDA device (``cuda:N``).

- The conditioning engine is refitted per concept with every K/V weight of the refit map, each in
  its original (ONNX initializer's) dtype, and run per (concept, prompt).
- A batch of any size is cut to the engine's optimization profile (the rule of
  :func:`opad.export.runtime.batch_plan.batch_chunks`, shared with ONNX Runtime): at most its max batch per
  call, padded up to its min batch; the denoise+decode engines' run sizes rounded up to a power of
  two, so that batches of 1..8 on a profile of 1..8 use 4 sizes.
- One execution context per (engine, run size), with its buffers and (on a GPU) its CUDA graph, made
  on first use. Each context holds the engine's activation memory, so at most ``max_contexts`` are
  kept, the least recently used dropped first.

**Unverified**: TensorRT cannot be installed where opad is developed. The splitting, padding,
binding, refitting and context bookkeeping run in the tests against a fake of the TensorRT 10 API
(tests/faketrt.py, on the CPU, without CUDA graphs); the CUDA-graph capture
(:class:`CudaGraphLaunch`) has a test that needs a GPU.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opad.export.engines.execution import bind, enqueue, io_names, on_device, profile_shapes, tensor_dtype, tensorrt
from opad.export.engines.plan import ENGINES, REFIT_MAP, kv_parameter_names, refit_weights
from opad.export.runtime.backend import Backend, baked_concept, seeded_noise, token_ids
from opad.export.runtime.batch_plan import batch_chunks, take_rows
from opad.export.runtime.eager import EagerBackend
from torch import Tensor

from opad.errors import OpadError

MAX_CONTEXTS = 4  # execution contexts (each with the engine's activation memory) kept at once


class DirectLaunch:
    """Each run enqueues the engine on the device's current stream (no CUDA graph)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def prepare(self, context) -> tuple[Callable[[], None], object]:
        """(run, its CUDA graph: none here)."""
        return lambda: enqueue(context, self.device), None


class CudaGraphLaunch:
    """Each context's enqueue captured once as a CUDA graph, replayed on the device's current stream
    (so it is ordered after the copies into its inputs and before the reads of its outputs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def prepare(self, context) -> tuple[Callable[[], None], object]:
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)  # capture needs a stream other than the default one
            side.wait_stream(current)  # the buffers were made (and maybe filled) on the current stream
            with torch.cuda.stream(side):
                enqueue(context, self.device, side.cuda_stream)  # warm-up outside the capture (lazy setup)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    enqueue(context, self.device, side.cuda_stream)
            current.wait_stream(side)

        def replay() -> None:
            with torch.cuda.device(self.device):
                graph.replay()
        return replay, graph


@dataclass
class _Slot:
    """One execution context at one run size, with its buffers and the way it runs."""
    context: object
    buffers: dict[str, Tensor]
    run: Callable[[], None]
    graph: object = None

    def close(self) -> None:
        if self.graph is not None:  # the graph refers to the context's memory: it goes first
            self.graph.reset()
        self.graph = self.context = self.buffers = self.run = None


class ContextPool:
    """At most ``size`` slots, across engines; the least recently used is dropped to make room."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise OpadError(f"at least one TensorRT execution context is needed, got {size}")
        self.size = size
        self.slots: OrderedDict[tuple[str, int], _Slot] = OrderedDict()

    def get(self, key: tuple[str, int], make: Callable[[], _Slot]) -> _Slot:
        if key in self.slots:
            self.slots.move_to_end(key)
            return self.slots[key]
        while len(self.slots) >= self.size:
            self.slots.popitem(last=False)[1].close()
        self.slots[key] = make()
        return self.slots[key]


class EngineRunner:
    """One engine: batches cut to its profile (see the module docstring), run through the pool's slots."""

    def __init__(self, trt, engine, name: str, device: torch.device, pool: ContextPool, launch, *,
                 power_of_two: bool) -> None:
        self.trt, self.engine, self.name, self.device, self.pool, self.launch = trt, engine, name, device, pool, launch
        self.power_of_two = power_of_two
        self.inputs, self.outputs = io_names(trt, engine)
        bounds = {n: profile_shapes(engine, n) for n in self.inputs}
        self.rest = {n: hi[1:] for n, (_, hi) in bounds.items()}  # the dimensions after the batch
        batch = {(lo[0], hi[0]) for lo, hi in bounds.values()}
        if len(batch) != 1:
            raise OpadError(f"the {name} engine's inputs have different batch ranges {sorted(batch)}")
        self.batch = batch.pop()

    def input_dtype(self, name: str) -> torch.dtype:
        return tensor_dtype(self.trt, self.engine, name)

    def _slot(self, size: int) -> _Slot:
        context, buffers = bind(self.trt, self.engine, {n: (size, *self.rest[n]) for n in self.inputs}, self.device)
        run, graph = self.launch.prepare(context)
        return _Slot(context, buffers, run, graph)

    def run(self, feeds: dict[str, Tensor | np.ndarray]) -> dict[str, Tensor]:
        """The outputs for a batch of any size (on the device), the feeds' rows in order."""
        n = len(next(iter(feeds.values())))
        parts = []
        with on_device(self.device):
            for start, count, size in batch_chunks(n, *self.batch, power_of_two=self.power_of_two):
                slot = self.pool.get((self.name, size), lambda size=size: self._slot(size))
                for name in self.inputs:
                    slot.buffers[name].copy_(torch.as_tensor(take_rows(feeds[name], start, count, size)))
                slot.run()
                # copied out: the next chunk (or call) writes the same buffers
                parts.append({k: slot.buffers[k][:count].clone() for k in self.outputs})
        return {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in self.outputs}


def concept_refits(entries: list[dict], unet, concepts: dict) -> dict[str | None, dict[str, np.ndarray]]:
    """Per concept, the conditioning engine's refit weights (each in its ONNX initializer's dtype)."""
    names = kv_parameter_names(unet)
    return {name: refit_weights(entries, {n: w.float().numpy() for n, w in zip(names, kv)})
            for name, (_, _, kv) in concepts.items()}


class TensorRTBackend(Backend):
    """The engines of one ``build_trt.py`` folder on ``device`` (see the module docstring)."""

    def __init__(self, engines: str, concepts: dict[str, str], device: torch.device, *,
                 max_contexts: int | None = None) -> None:
        trt = tensorrt(device)  # one sentence when TensorRT, the GPU or a CUDA device is missing
        folder = Path(engines)
        if not (folder / ENGINES).is_file():
            raise OpadError(f"{engines} is not an engines folder of export/build_trt.py: it has no {ENGINES}")
        self.record = json.loads((folder / ENGINES).read_text())
        if not self.record.get("built"):
            raise OpadError(f"{engines} holds a --plan-only build: no engines to run")
        self.denoiser_concept = baked_concept(self.record)
        if self.denoiser_concept != "base":  # its base conditioning below would be the plain student's
            raise OpadError(f"{engines} were built from an export with a {self.record.get('concept_format')} "
                            "concept baked into its denoise graph; run that export with the onnxruntime backend")
        entries = json.loads((folder / REFIT_MAP).read_text())
        # tokenizers, token tables and each concept's refit weights come from the student itself
        self.cpu = EagerBackend(self.record["student"], concepts, "cpu", "float32")
        self.concepts = self.cpu.concepts
        self.refits = concept_refits(entries, self.cpu.bundle.student_unet, self.concepts)
        self.trt, self.device = trt, device
        self.pool = ContextPool(max_contexts or MAX_CONTEXTS)
        graphs = CudaGraphLaunch(device) if device.type == "cuda" else DirectLaunch(device)
        with on_device(device):
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.conditioning_engine = self._load(runtime, folder / "conditioning.plan")
            # the conditioning engine runs without a CUDA graph: it is refitted between runs
            self.conditioner = EngineRunner(trt, self.conditioning_engine, "conditioning", device, self.pool,
                                            DirectLaunch(device), power_of_two=False)
            self.denoisers = {steps: EngineRunner(trt, self._load(runtime, folder / f"denoise_decode_{steps}step.plan"),
                                                  f"denoise_decode_{steps}step", device, self.pool, graphs,
                                                  power_of_two=True) for steps in self.record["steps"]}
        self.resolution, self.steps = self.cpu.resolution, tuple(self.record["steps"])
        self.student_hashes = {}  # the engines record their student by path (checked when built)
        self.current: object = ()  # the concept the conditioning engine holds now

    @staticmethod
    def _load(runtime, path: Path):
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise OpadError(f"TensorRT cannot load {path} (built by another TensorRT version or for another GPU?)")
        return engine

    def _refit(self, concept: str | None) -> None:
        if self.current == concept:
            return
        if self.device.type == "cuda":  # nothing enqueued may still read the weights being replaced
            torch.cuda.synchronize(self.device)
        refitter = self.trt.Refitter(self.conditioning_engine, self.trt.Logger(self.trt.Logger.WARNING))
        for name, weight in self.refits[concept].items():  # every concept-owned weight, changed or not
            if not refitter.set_named_weights(name, self.trt.Weights(weight)):
                raise OpadError(f"TensorRT refuses to refit {name} ({weight.dtype}, {weight.shape})")
        with on_device(self.device):
            if not refitter.refit_cuda_engine():
                raise OpadError(f"TensorRT could not refit the conditioning engine for concept {concept!r}")
        self.current = concept

    def conditioning(self, concept: str | None, prompt: str) -> list[Tensor]:
        tokenizer, table, _ = self.concepts[concept]
        self._refit(concept)
        embeds = table[torch.from_numpy(token_ids(tokenizer, prompt))]
        outs = self.conditioner.run({"token_embeds": embeds})
        return [outs[name] for name in self.record["kv_names"]]

    def denoise_decode(self, kv: list[Tensor], seeds: list[int], steps: int) -> tuple[np.ndarray, dict[str, float]]:
        if steps not in self.denoisers:
            raise OpadError(f"no {steps}-step engine (built: {self.record['steps']})")
        start = time.perf_counter()  # one engine (one CUDA graph per run size) for both
        runner = self.denoisers[steps]
        noise = seeded_noise(tuple(self.record["shapes"]["noise"]), seeds, runner.input_dtype("noise"))
        outs = runner.run({"noise": noise, **dict(zip(self.record["kv_names"], kv))})
        images = outs["image"].cpu().numpy()
        return images, {"denoise_decode": time.perf_counter() - start}
