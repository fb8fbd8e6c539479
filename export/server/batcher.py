"""Dynamic batching: concurrent generation requests become shared denoise+decode calls.

Each request is split into its images (image *i* drawn from seed + *i*). After the first waiting
image arrives, images that want the same step count are gathered for up to the batch window, or
until ``max_batch`` of them wait, and run as one :meth:`Runner.run_batch` call: any mix of
concepts and prompts, each with its cached K/V. While the model runs, new images queue up, so
under load batches form without waiting. One thread owns the runner (and the concept store):
every model call goes through :class:`ModelThread`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from opad.export.runtime import Runner
from opad.export.server.metrics import Metrics

log = logging.getLogger("opad.serve")


class ModelThread:
    """The one thread every model call runs on, from building the runner on. torch's CPU thread pool
    belongs to the thread that calls it, and a second pool on the same cores makes both 2-3x slower
    (measured: a tiny 1-step image 24 ms on one thread, 60-68 ms once two threads have run torch)."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="opad-model")

    def run(self, fn, *args):
        """``fn(*args)`` on the model thread, waiting for it (start-up)."""
        return self.executor.submit(fn, *args).result()

    async def call(self, fn, *args):
        """``fn(*args)`` on the model thread, awaited (between batches)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class QueueFull(Exception):
    """More requests wait than the queue holds."""


@dataclass
class Job:
    concept: str | None
    prompt: str
    seed: int
    n: int
    steps: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    images: list = field(default_factory=list)
    waiting: int = 0  # images not yet taken into a batch
    done: int = 0
    started: float | None = None
    cancelled: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, over its batches


class Batcher:
    def __init__(self, runner: Runner, model: ModelThread, metrics: Metrics, *, max_batch: int, window_s: float,
                 queue: int) -> None:
        self.runner, self.model, self.metrics = runner, model, metrics
        self.max_batch, self.window_s, self.queue = max_batch, window_s, queue
        self.pending: deque[tuple[Job, int]] = deque()
        self.waiting_jobs = 0
        self.arrived = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.gathering = False  # a batch is being gathered or run

    def busy(self) -> bool:
        """Whether images wait or a batch is being gathered or run (a background warm-up gives way)."""
        return bool(self.pending) or self.gathering

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def submit(self, concept: str | None, prompt: str, seed: int, n: int, steps: int) -> Job:
        if self.waiting_jobs >= self.queue:
            raise QueueFull
        job = Job(concept, prompt, seed, n, steps, asyncio.get_running_loop().create_future())
        job.images = [None] * n
        job.waiting = n
        self.pending.extend((job, i) for i in range(n))
        self._set_waiting(self.waiting_jobs + 1)
        self.arrived.set()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a request's images that have not started (its client gave up or timed out)."""
        job.cancelled = True
        if job.waiting:
            self.pending = deque(item for item in self.pending if item[0] is not job)
            job.waiting = 0
            self._set_waiting(self.waiting_jobs - 1)

    def _set_waiting(self, count: int) -> None:
        self.waiting_jobs = count
        self.metrics.queue_depth.set(count)

    async def _loop(self) -> None:
        while True:
            await self.arrived.wait()
            self.arrived.clear()
            while self.pending:
                self.gathering = True
                try:
                    batch = await self._gather()
                    await self._run(batch)
                finally:
                    self.gathering = False

    async def _gather(self) -> list[tuple[Job, int]]:
        steps = self.pending[0][0].steps
        deadline = self.pending[0][0].enqueued + self.window_s
        while sum(job.steps == steps for job, _ in self.pending) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                break
        batch, rest = [], deque()
        for job, i in self.pending:
            (batch if job.steps == steps and len(batch) < self.max_batch else rest).append((job, i))
        self.pending = rest
        now = time.perf_counter()
        for job, _ in batch:
            job.waiting -= 1
            if job.started is None:
                job.started = now
            if job.waiting == 0:
                self._set_waiting(self.waiting_jobs - 1)
        return batch

    async def _run(self, batch: list[tuple[Job, int]]) -> None:
        items = [(job.concept, job.prompt, job.seed + i) for job, i in batch]
        steps = batch[0][0].steps
        try:
            images, timings = await self.model.call(self.runner.run_batch, items, steps)
        except Exception as e:  # every request of the batch gets the error; the server goes on
            log.exception("a batch of %d images failed", len(batch))
            for job, _ in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        self.metrics.batch_images.observe(len(batch))
        self.metrics.images.inc(len(batch))
        jobs = {id(job): job for job, _ in batch}
        for job in jobs.values():
            for stage, seconds in timings.items():
                job.timings[stage] = job.timings.get(stage, 0.0) + seconds
        for (job, i), image in zip(batch, images):
            job.images[i] = image
            job.done += 1
            if job.done == job.n and not job.future.done():
                job.future.set_result(np.stack(job.images))
