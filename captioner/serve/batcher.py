"""Dynamic batching: a bounded queue of requests and ONE batcher task that forms batches of requests with
the same decoding options and runs the model on them in one worker thread, off the event loop.

A batch is formed from the oldest waiting request: it takes the waiting requests with its options (in
arrival order, whole requests only) until `max_batch_size` items are there or the oldest has waited
`max_wait_s`. While the model runs, new requests queue up and form the next batch. Each request gets
its own items' captions back through its future. A request that gave up (timeout, client gone) is
dropped if still waiting, and only loses its answer if already in a batch: the batch goes on. When a
model call fails, each request of the batch is retried alone, so only the one that fails gets the error.
Sampling with a seed is never merged with other requests, so its captions do not depend on neighbours.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from captioner.config import DecodeConfig
from captioner.errors import CaptionerError, one_line

logger = logging.getLogger(__name__)

# (model inputs of the items, decoding options, prompt | None) -> captions per item; runs in the worker thread
RunBatch = Callable[[list, DecodeConfig, "str | None"], "list[list[str]]"]


class QueueFull(CaptionerError):
    """The queue holds as many items as allowed: retry later."""


class NotAccepting(CaptionerError):
    """The server is loading its model or draining for shutdown."""


@dataclasses.dataclass(eq=False)
class Job:
    inputs: list
    decode: DecodeConfig
    prompt: str | None
    key: object
    future: asyncio.Future
    enqueued: float
    abandoned: bool = False  # the request stopped waiting: drop it if it is still queued


def batch_key(decode: DecodeConfig, prompt: str | None) -> object:
    """Requests with equal keys may share a model call."""
    if decode.strategy == "sample" and decode.seed is not None:
        return object()  # seeded draws depend on the whole batch: alone, as `captioner caption` would draw them
    return (dataclasses.astuple(decode), prompt)


class Batcher:
    def __init__(self, run_batch: RunBatch, *, max_batch_size: int, max_wait_s: float, max_queue: int, metrics=None):
        self.run_batch = run_batch
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.metrics = metrics
        self.pending: collections.deque[Job] = collections.deque()
        self.waiting = 0  # items in `pending`
        self.accepting = False
        self.model_calls = 0
        self._closing = False
        self._no_wait = False  # draining: batches no longer wait for more requests
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="captioner-model")  # the one thread the model runs on

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the batcher task (in the running event loop); requests are accepted once `accepting` is set."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="captioner-batcher")

    async def in_worker(self, fn, *args):
        """Run fn(*args) on the model's thread (e.g. loading the model), after what is already there."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def flush(self) -> None:
        """From now on batches form at once (the server is draining; no more requests are coming)."""
        self._no_wait = True
        if self._wake is not None:
            self._wake.set()

    async def close(self, timeout: float) -> None:
        """Refuse new requests, answer every queued one (batches no longer wait), then stop."""
        self.accepting, self._closing = False, True
        if self._task is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                logger.error("requests still queued after %.0f s of draining: dropped", timeout)
                self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ requests

    def submit(self, inputs: list, decode: DecodeConfig, prompt: str | None = None) -> Job:
        """Queue one request's items; raises NotAccepting or QueueFull. Await `job.future` for its captions."""
        if not self.accepting:
            raise NotAccepting("the server is not accepting requests (model loading or shutting down)")
        if self.waiting + len(inputs) > self.max_queue:
            raise QueueFull(f"queue full ({self.waiting} items waiting, limit {self.max_queue}); retry later")
        job = Job(inputs, decode, prompt, batch_key(decode, prompt), asyncio.get_running_loop().create_future(),
                  time.monotonic())
        self.pending.append(job)
        self._count(len(inputs))
        self._wake.set()
        return job

    def abandon(self, job: Job) -> None:
        """The request stopped waiting (timeout, cancelled): a queued job is dropped, a running one finishes."""
        job.abandoned = True

    def _count(self, n: int) -> None:
        self.waiting += n
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.waiting)

    # ------------------------------------------------------------------ the batcher

    async def _run(self) -> None:
        while True:
            self._drop_abandoned()
            if not self.pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self.pending[0]
            deadline = first.enqueued + self.max_wait_s
            while (not (self._closing or self._no_wait or first.abandoned)
                   and self._ready(first.key) < self.max_batch_size):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            jobs = self._take(first.key)
            if jobs:
                await self._serve(jobs)

    def _drop_abandoned(self) -> None:
        for job in [j for j in self.pending if j.abandoned]:
            self.pending.remove(job)
            self._count(-len(job.inputs))

    def _ready(self, key) -> int:
        return sum(len(j.inputs) for j in self.pending if j.key == key and not j.abandoned)

    def _take(self, key) -> list[Job]:
        """The oldest waiting requests with this key, whole, up to max_batch_size items (the first always)."""
        jobs, size = [], 0
        for job in list(self.pending):
            if job.key != key or job.abandoned:
                continue
            if jobs and size + len(job.inputs) > self.max_batch_size:
                break
            jobs.append(job)
            size += len(job.inputs)
            self.pending.remove(job)
            self._count(-len(job.inputs))
        return jobs

    async def _serve(self, jobs: list[Job]) -> None:
        start = time.monotonic()
        if self.metrics is not None:
            for job in jobs:
                self.metrics.queue_wait.observe(start - job.enqueued)
        inputs = [x for job in jobs for x in job.inputs]
        try:
            captions = await self.in_worker(self._call, inputs, jobs[0].decode, jobs[0].prompt)
        except Exception as e:  # noqa: BLE001 (the model failed: the server goes on)
            if len(jobs) > 1:  # one request's input must not fail the others: each is retried alone
                logger.warning("a batch of %d requests failed (%s): each is retried alone", len(jobs), one_line(e))
                for job in jobs:
                    await self._serve([job])
                return
            logger.exception("model call failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        at = 0
        for job in jobs:
            if not job.future.done():  # a request that gave up has a cancelled future: its captions are dropped
                job.future.set_result(captions[at:at + len(job.inputs)])
            at += len(job.inputs)

    def _call(self, inputs: list, decode: DecodeConfig, prompt: str | None) -> list[list[str]]:
        """In the worker thread: the model on `inputs`, at most max_batch_size per call."""
        out = []
        for start in range(0, len(inputs), self.max_batch_size):
            chunk = inputs[start:start + self.max_batch_size]
            t = time.monotonic()
            out.extend(self.run_batch(chunk, decode, prompt))
            self.model_calls += 1
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(chunk))
                self.metrics.model_latency.observe(time.monotonic() - t)
        return out
