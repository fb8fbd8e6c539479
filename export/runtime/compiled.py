"""The ``compiled`` backend: ``eager`` with the denoise+decode graph through ``torch.compile``
(inductor; on a GPU ``max-autotune`` with CUDA graphs, channels-last, the half precision given as
``dtype``), one compiled variant per (steps, batch padded to a power of two), each its own dynamo
region with its own recompile limit; a variant that would fall back to eager raises instead. Within
one level of 255 of ``eager``.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable

import numpy as np
import torch
from opad.export.runtime.batch_plan import compiled_batch, take_rows
from opad.export.runtime.eager import EagerBackend
from torch import Tensor

from opad.errors import OpadError

# compilations allowed per compiled (steps, batch) variant: its one, and one spare for a guard that
# changes after a first call; past it torch.compile raises (fullgraph) instead of running eager
RECOMPILE_LIMIT = 2
# torch.compile's own region per call site came with torch 2.14 (isolate_recompiles); before it (the
# GPU image's torch 2.11) every variant shares the code object's limit, which _recompile_limit lifts
ISOLATED_RECOMPILES = "isolate_recompiles" in inspect.signature(torch.compile).parameters
# variants compiled in this process: without isolated regions they all share DenoiseDecodeGraph.forward's
# cache, whichever runner made them
_variants_made = 0


class CompiledBackend(EagerBackend):
    """The eager split with the denoise+decode graph compiled per step count and batch size (shapes
    are static, as CUDA graphs want).

    Every ``DenoiseDecodeGraph`` shares one ``forward`` code object, and dynamo counts compilations
    per code object (8 by default, ``torch._dynamo.config.recompile_limit``): through one compiled
    module the 9th of the 12 (steps x batch) variants would silently run eager. So each variant is
    its own ``torch.compile`` region (``isolate_recompiles``) with its own limit, and ``fullgraph``
    makes going past it (or a graph break) an error instead of a fall back (before torch 2.14, which
    has no such regions, the shared limit is lifted to cover every variant while one runs; see
    :func:`_recompile_limit`). ``backend`` is
    torch.compile's (inductor; the tests count compilations with their own)."""

    def __init__(self, *args, backend: str | Callable = "inductor", mode: str | None = None) -> None:
        super().__init__(*args)
        self.backend = backend
        self.mode = mode  # inductor's mode; None: max-autotune (CUDA graphs, autotuned kernels) on a GPU
        self.variants: dict[tuple[int, int], Callable] = {}  # (steps, batch) -> its compiled graph
        self.cuda = self.bundle.device.type == "cuda"
        if self.cuda:  # cuDNN's fast convolution layout
            self.bundle.student_unet.to(memory_format=torch.channels_last)
            self.bundle.vae.to(memory_format=torch.channels_last)

    def variant(self, steps: int, batch: int) -> Callable:
        """The compiled denoise+decode graph of ``steps`` for batches of exactly ``batch``."""
        key = (steps, batch)
        if key not in self.variants:
            mode = self.mode or ("max-autotune" if self.cuda else "default")
            options = {"mode": mode} if self.backend == "inductor" else {}
            if ISOLATED_RECOMPILES:
                options.update(isolate_recompiles=True, recompile_limit=RECOMPILE_LIMIT)
            self.variants[key] = torch.compile(super().graph(steps), backend=self.backend, dynamic=False,
                                               fullgraph=True, **options)
            global _variants_made
            _variants_made += 1
        return self.variants[key]

    def warm_up_batches(self, max_batch: int) -> list[int]:
        """Every batch shape :meth:`denoise_decode` compiles for batches up to ``max_batch``."""
        return sorted({compiled_batch(n) for n in range(1, max_batch + 1)})

    def graph(self, steps: int):
        """The ``steps`` graph as one callable: each batch size runs its own compiled variant."""
        def run(noise: Tensor, *kv: Tensor) -> tuple[Tensor, Tensor]:
            from torch._dynamo.exc import FailOnRecompileLimitHit

            compiled = self.variant(steps, noise.shape[0])
            limit, context = _recompile_limit()
            try:
                with context:
                    return compiled(noise, *kv)
            except FailOnRecompileLimitHit as e:
                allowed = f"{limit}" if ISOLATED_RECOMPILES else f"the {limit} all variants share"
                raise OpadError(f"the compiled {steps}-step graph for batch {noise.shape[0]} needed more than "
                                f"{allowed} compilations (a guard keeps failing; TORCH_LOGS=recompiles says which); "
                                "refusing to run it uncompiled") from e
        return run

    def denoise_decode(self, kv: list[Tensor], seeds: list[int], steps: int) -> tuple[np.ndarray, dict[str, float]]:
        """Batches padded to a power of two (the last image repeated, then dropped): a server's
        batches of 1..N images compile log2(N) + 1 shapes, not N."""
        n = len(seeds)
        size = compiled_batch(n)
        if size != n:
            kv = [take_rows(t, 0, n, size) for t in kv]
            seeds = seeds + [seeds[-1]] * (size - n)
        images, stages = super().denoise_decode(kv, seeds, steps)
        return images[:n], stages

    def run_graph(self, graph, noise: Tensor, kv: list[Tensor]) -> tuple[np.ndarray, dict[str, float]]:
        start = time.perf_counter()  # one compiled graph: denoise and decode are not apart
        images = graph(noise, *kv)[0].cpu().numpy()
        return images, {"denoise_decode": time.perf_counter() - start}


def _recompile_limit() -> tuple[int, contextlib.AbstractContextManager]:
    """The compilations a variant may use, and the context its call runs in.

    With isolated regions each variant has RECOMPILE_LIMIT of its own. Without (torch < 2.14) they
    share the code object's limit: while a variant runs it is RECOMPILE_LIMIT for each variant made
    in this process (never below the global setting), and passing it raises instead of falling back
    to eager."""
    if ISOLATED_RECOMPILES:
        return RECOMPILE_LIMIT, contextlib.nullcontext()
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    limit = max(getattr(config, name), RECOMPILE_LIMIT * _variants_made)
    patch = {name: limit}
    if hasattr(config, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    return limit, config.patch(**patch)
