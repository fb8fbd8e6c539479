"""One inference runner over the split graphs (DESIGN.md §5), with interchangeable backends.

``Runner(backend).generate(prompt, concept, seed, steps, batch)`` returns uint8 images
(B, H, W, 3), image i drawn from seed + i exactly as ``python -m opad.generate`` draws it;
``run_batch([(concept, prompt, seed), ...], steps)`` makes images of any concepts and prompts in
one denoise+decode call (the server's batches).
Every backend runs the same split: the conditioning (token embeddings -> every cross-attention
layer's K/V) once per (concept, prompt), cached here, and one concept-agnostic denoise+decode for
all concepts. The backends, each a :class:`~opad.export.runtime.backend.Backend` in its own module:

- ``eager`` (:mod:`.eager`): the PyTorch graphs; equal to ``opad.generate``.
- ``compiled`` (:mod:`.compiled`): ``eager`` with denoise+decode through ``torch.compile``.
- ``onnxruntime`` (:mod:`.onnxruntime`): the folders of ``python export/export_onnx.py``.
- ``tensorrt`` (:mod:`.tensorrt`): the engines of ``python export/build_trt.py`` on ``device``
  (cuda:N). **Unverified**: TensorRT cannot be installed where opad is developed; without it (or a
  GPU) this backend raises one clear error.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
import torch
from opad.export.runtime.backend import Backend
from opad.export.runtime.compiled import CompiledBackend
from opad.export.runtime.eager import EagerBackend
from opad.export.runtime.onnxruntime import OnnxRuntimeBackend

from opad.devices import pick_device
from opad.diffusion.sampling import STUDENT_STEPS
from opad.errors import OpadError

BACKENDS = ("eager", "compiled", "onnxruntime", "tensorrt")
KV_CACHE_SIZE = 256  # (concept, prompt) pairs whose K/V stay cached

Item = tuple  # (concept, prompt, seed): one image of a batch


def _concat(parts: list) -> object:
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


class Runner:
    """Images from the student with any of its concepts, on one backend (see the module docstring).

    ``concepts`` maps a name to a concept folder (eager) and, for ``onnxruntime``, optionally to
    the concept each export folder must have been made from (checked against its sidecar);
    ``onnx`` maps names to export folders (``None`` is the base student).

    ``torch_conditioning=True`` computes the conditioning (a) in PyTorch from the concept folders
    whatever the backend, which then runs only the concept-agnostic denoise+decode (b): one export
    (of the base student) serves every concept, and concepts can be added while running
    (:meth:`add_concept`). The server runs this way.
    """

    def __init__(self, backend: str = "eager", *, student: str | None = None,
                 concepts: Mapping[str, str] | None = None, onnx: Mapping[str | None, str] | None = None,
                 engines: str | None = None, device: str = "auto", dtype: str = "auto",
                 torch_conditioning: bool = False, compile_backend: str | Callable = "inductor",
                 compile_mode: str | None = None) -> None:
        if backend not in BACKENDS:
            raise OpadError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.backend = backend
        self._kv_cache: OrderedDict[tuple[str | None, str], list] = OrderedDict()  # least recently used first
        concepts = dict(concepts or {})
        split = torch_conditioning and backend in ("onnxruntime", "tensorrt")
        self._impl: Backend
        if backend == "eager":
            self._impl = EagerBackend(student, concepts, device, dtype)
        elif backend == "compiled":
            self._impl = CompiledBackend(student, concepts, device, dtype, backend=compile_backend, mode=compile_mode)
        elif backend == "tensorrt":
            if not engines:
                raise OpadError("the tensorrt backend needs the engines folder of export/build_trt.py (engines=DIR)")
            from opad.export.runtime.tensorrt import TensorRTBackend  # tensorrt itself is optional

            self._impl = TensorRTBackend(engines, {} if split else concepts, pick_device(device))
        else:
            if not onnx:
                raise OpadError("the onnxruntime backend needs export folders (onnx={name: folder})")
            self._impl = OnnxRuntimeBackend(dict(onnx), {} if split else concepts, dtype)
        self._cond: Backend = self._impl
        if split:  # (a) in PyTorch beside the backend's (b), on the device the backend's inputs live on
            conditioner = EagerBackend(student, concepts, str(self._impl.device), "float32")
            conditioner.check_denoiser(self._impl)
            self._cond = conditioner

    @property
    def concepts(self) -> list[str | None]:
        return list(self._cond.concepts)

    @property
    def resolution(self) -> int:
        return self._impl.resolution

    @property
    def steps(self) -> tuple[int, ...]:
        """The step counts this runner has a denoise+decode graph (or engine) for."""
        return self._impl.steps

    def warm_up_batches(self, max_batch: int) -> list[int]:
        """Batch sizes worth running once before serving: every shape the compiled backend compiles
        for batches up to ``max_batch``; one image for the others."""
        return self._impl.warm_up_batches(max_batch)

    def warm_up_plan(self, max_batch: int) -> list[tuple[int, int]]:
        """(steps, images) to run once before serving, in the order to run them: every step count at
        every batch shape :meth:`warm_up_batches` names, the fewest steps (the default) first."""
        return [(steps, size) for steps in sorted(self.steps) for size in self.warm_up_batches(max_batch)]

    def add_concept(self, name: str, folder: str) -> None:
        """Read (and check) a concept folder and serve it as ``name``, replacing one of that name."""
        if not isinstance(self._cond, EagerBackend):
            raise OpadError("concepts can be added only while the conditioning runs in PyTorch "
                            "(backend eager or compiled, or torch_conditioning=True)")
        self._cond.add_concept(name, folder)
        self._drop_cached(name)

    def remove_concept(self, name: str) -> None:
        if isinstance(self._cond, EagerBackend):
            self._cond.concepts.pop(name, None)
        self._drop_cached(name)

    def _drop_cached(self, name: str | None) -> None:
        for key in [k for k in self._kv_cache if k[0] == name]:
            del self._kv_cache[key]

    def fit_prompt(self, concept: str | None, prompt: str) -> str | None:
        """The prompt as the text encoder will see it when it is over its token limit (else None)."""
        tokenizer = self._cond.concepts[concept][0]
        tokens = tokenizer(prompt, truncation=False, return_offsets_mapping=True, verbose=False)
        limit = tokenizer.model_max_length
        if len(tokens.input_ids) <= limit:
            return None
        return prompt[:tokens.offset_mapping[limit - 2][1]]  # up to the last token kept before the end token

    def generate(self, prompt: str, concept: str | None = None, seed: int = 0, steps: int = 1,
                 batch: int = 1) -> np.ndarray:
        if batch < 1:
            raise OpadError(f"batch must be at least 1, got {batch}")
        return self.run_batch([(concept, prompt, seed + i) for i in range(batch)], steps)[0]

    def run_batch(self, items: list[Item], steps: int) -> tuple[np.ndarray, dict[str, float]]:
        """One denoise+decode call for images of any concepts and prompts, ``(concept, prompt, seed)``
        each; returns the uint8 images in order and the seconds per stage: ``conditioning``, then
        ``denoise`` and ``decode`` (eager) or ``denoise_decode`` (the backends that run them as one graph)."""
        for concept, _, _ in items:
            if concept not in self._cond.concepts:
                known = ", ".join(repr(c) for c in self._cond.concepts)
                raise OpadError(f"unknown concept {concept!r}; this runner has {known}")
        if steps not in STUDENT_STEPS:
            raise OpadError(f"steps must be one of {STUDENT_STEPS}, got {steps}")
        if not items:
            raise OpadError("a batch needs at least one image")
        start = time.perf_counter()
        kvs = [self._conditioning(concept, prompt) for concept, prompt, _ in items]
        batched = [_concat([kv[j] for kv in kvs]) for j in range(len(kvs[0]))]
        conditioned = time.perf_counter()
        images, stages = self._impl.denoise_decode(batched, [seed for _, _, seed in items], steps)
        return images, {"conditioning": conditioned - start, **stages}

    def _conditioning(self, concept: str | None, prompt: str) -> list:
        key = (concept, prompt)
        if key in self._kv_cache:
            self._kv_cache.move_to_end(key)
        else:  # once per (concept, prompt), the oldest dropped past KV_CACHE_SIZE
            self._kv_cache[key] = self._cond.conditioning(concept, prompt)
            if len(self._kv_cache) > KV_CACHE_SIZE:
                self._kv_cache.popitem(last=False)
        return self._kv_cache[key]
