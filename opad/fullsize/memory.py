"""The memory a piece of PyTorch work holds, counted op by op: on real tensors, or on fake ones (no memory,
no compute), which is how ``benchmarks/studies/estimate_gpu_memory.py`` sizes a full-size training iteration
without a GPU.

:class:`LiveMemory` is a ``TorchDispatchMode``: every tensor an op returns has its storage counted once
(views and in-place results share it) until Python frees the storage, so the count is what an allocator
holds for the program's live tensors, as ``torch.cuda.max_memory_allocated`` reports it: each block
rounded up to 512 bytes like CUDA's caching allocator, without its segment slack (fragmentation) and
without the CUDA context or library workspaces. Storages that exist before it starts (weights, inputs)
are added with :meth:`LiveMemory.add`; each allocation is labelled with the current :meth:`phase`, and
a parameter's gradient is labelled ``gradients``, so the peak is reported broken down by what held it.

``torch.distributed._tools.mem_tracker.MemTracker`` does this per module, but refuses a module called
twice in one iteration, and OPAD calls the teacher UNet and every backbone twice.

Under fake tensors ``.item()`` has no value to give: :class:`LiveMemory` answers it (a float 0.5, an
integer 1, True), so the code takes its ordinary path (finite losses, steps applied).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to a multiple of this


def _rounded(nbytes: int, block: int) -> int:
    return -(-nbytes // block) * block if block > 1 else nbytes


@dataclass
class _Storage:
    nbytes: int
    label: str
    allocated: int  # sequence number of the allocation
    freed: int | None = None


@dataclass
class MemoryReport:
    """The peak (bytes), what was live at it by label, and each phase's own peak."""

    peak: int
    at_peak: dict[str, int]
    phase_peaks: dict[str, int] = field(default_factory=dict)

    def table(self, unit: float = 2**30, unit_name: str = "GiB") -> str:
        rows = [f"  {label:<34} {nbytes / unit:9.3f} {unit_name}"
                for label, nbytes in sorted(self.at_peak.items(), key=lambda kv: -kv[1])]
        return "\n".join([f"peak {self.peak / unit:.3f} {unit_name}, held by:", *rows])


class LiveMemory(TorchDispatchMode):
    """Counts live tensor storage through every op run inside it (see the module docstring)."""

    def __init__(self, block: int = CUDA_BLOCK) -> None:
        super().__init__()
        self.block = block
        self.storages: dict[int, _Storage] = {}  # id(storage) -> record, live ones only
        self.log: list[_Storage] = []
        self.current = 0
        self.peak = 0
        self.peak_at = 0  # sequence number of the allocation that set the peak
        self.seq = 0
        self.label = "setup"
        self.phase_peaks: dict[str, int] = defaultdict(int)

    # ------------------------------------------------------------------ what to count
    def add(self, tensors: Iterable[Tensor], label: str) -> None:
        """Count storages that already exist (weights, buffers, inputs) under ``label``."""
        for t in tensors:
            self._count(t, label)

    def relabel(self, tensors: Iterable[Tensor], label: str) -> None:
        """Give the storages of ``tensors`` the label ``label`` (counting any not seen yet)."""
        for t in tensors:
            record = self.storages.get(id(t.untyped_storage()))
            if record is None:
                self._count(t, label)
            else:
                record.label = label

    def label_gradients(self, params: Iterable[Tensor], label: str = "gradients") -> list:
        """Label each parameter's gradient storage ``label`` once it is accumulated (hooks; returns their handles)."""
        def hook(p: Tensor) -> None:
            if p.grad is not None:
                self._count(p.grad, label)
                record = self.storages.get(id(p.grad.untyped_storage()))
                if record is not None:
                    record.label = label
        return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]

    def reset_peak(self) -> None:
        """Start the peak afresh from what is live now (e.g. after loading, whose transients differ by loader)."""
        self.peak, self.peak_at = self.current, self.seq
        self.phase_peaks.clear()

    @contextmanager
    def phase(self, label: str) -> Iterator[None]:
        """Label the allocations made inside (and record the phase's own peak)."""
        old, self.label = self.label, label
        try:
            yield
        finally:
            self.label = old

    # ------------------------------------------------------------------ counting
    def _count(self, t: Tensor, label: str | None = None) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.storages:
            return
        self.seq += 1
        record = _Storage(_rounded(storage.nbytes(), self.block), label or self.label, self.seq)
        self.storages[key] = record
        self.log.append(record)
        self.current += record.nbytes
        if self.current > self.peak:
            self.peak, self.peak_at = self.current, self.seq
        self.phase_peaks[self.label] = max(self.phase_peaks[self.label], self.current)
        weakref.finalize(storage, self._free, key, record)

    def _free(self, key: int, record: _Storage) -> None:
        if self.storages.get(key) is record:
            del self.storages[key]
        self.seq += 1
        record.freed = self.seq
        self.current -= record.nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            dtype = args[0].dtype
            return True if dtype == torch.bool else (0.5 if dtype.is_floating_point else 1)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._count(t)
        return out

    # ------------------------------------------------------------------ the result
    def report(self) -> MemoryReport:
        """The peak and, by label, the storages live at it."""
        at_peak: dict[str, int] = defaultdict(int)
        for record in self.log:
            if record.allocated <= self.peak_at and (record.freed is None or record.freed > self.peak_at):
                at_peak[record.label] += record.nbytes
        return MemoryReport(self.peak, dict(at_peak), dict(self.phase_peaks))


def _is_fake(t: object) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or (isinstance(t, Tensor) and t.is_meta)
