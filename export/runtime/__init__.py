"""The inference runner (DESIGN.md §5): :class:`Runner` (:mod:`.runner`) over one backend, each a
:class:`Backend` (:mod:`.backend`) in its own module -- :mod:`.eager`, :mod:`.compiled`,
:mod:`.onnxruntime`, :mod:`.tensorrt` -- and :mod:`.batch_plan`, how every backend cuts a batch into
the calls its graph takes."""

from opad.export.runtime.backend import Backend, seeded_noise
from opad.export.runtime.runner import BACKENDS, KV_CACHE_SIZE, Runner

__all__ = ["BACKENDS", "KV_CACHE_SIZE", "Backend", "Runner", "seeded_noise"]
