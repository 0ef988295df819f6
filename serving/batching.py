"""Dynamic batching: concurrent requests gathered into single model calls on one worker thread.

The model server's `brain-tumor` model submits each request's images here; the batcher's
metrics appear on the server's `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from prometheus_client import Counter, Histogram

log = logging.getLogger("serving")

BATCH_SIZE = Histogram("brainscan_batch_size", "Images per model call made by the dynamic batcher",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
MODEL_LATENCY = Histogram("brainscan_model_call_seconds", "Seconds per batched model call")
QUEUE_WAIT = Histogram("brainscan_queue_wait_seconds", "Seconds a request waited for its batch to start")
REQUESTS = Counter("brainscan_batcher_requests_total", "Requests through the batcher, by outcome", ["outcome"])


class ServerOverloaded(RuntimeError):
    """The batcher's queue is full: answer 503 and let the client retry."""


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Ticket:
    """A request on its way to the batcher (being decoded): worth waiting for when forming a batch.

    `DynamicBatcher.expect()` hands one out; `submit(images, ticket)` or `ticket.close()`
    (the request failed before reaching the model) takes it back, and so does garbage
    collection of a ticket nobody closed, so a lost request cannot make the batcher wait for ever.
    """

    def __init__(self, batcher: "DynamicBatcher"):
        self._batcher = batcher
        self._open = True
        batcher._expected += 1

    def close(self) -> None:
        if self._open:
            self._open = False
            self._batcher._expected -= 1

    def __del__(self):
        self.close()


class DynamicBatcher:
    """Batch concurrent requests into single model calls on one worker thread.

    `submit(images)` enqueues [n, S, S, 3] and awaits its [n, 7] slice of the batch's answer.
    The worker takes the first waiting request, then keeps taking more until the batch holds
    `max_batch_size` images or `max_latency_ms` passed; while the model runs, new requests
    queue up and form the next batch. More than `max_queue` images waiting -> ServerOverloaded.

    It waits for more only while requests are known to be on their way (a `Ticket` from
    `expect()`, taken when a request starts decoding): a lone request goes to the model at
    once instead of idling for `max_latency_ms`, and concurrent ones still share a call.
    """

    def __init__(self, predict_fn: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 32,
                 max_latency_ms: float = 5.0, max_queue: int = 1024):
        if max_batch_size < 1 or max_queue < 1 or max_latency_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_latency_ms >= 0")
        self.predict_fn = predict_fn
        self.max_batch_size = int(max_batch_size)
        self.max_latency_s = float(max_latency_ms) / 1000.0
        self.max_queue = int(max_queue)
        # One thread owns the TF model: no concurrent calls into it, and Grad-CAM shares the thread.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brainscan-model")
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._queued_images = 0
        self._expected = 0  # open tickets: requests being decoded that will submit soon

    def expect(self) -> Ticket:
        """Announce a request that will `submit` soon (call before decoding it)."""
        return Ticket(self)

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="brainscan-batcher")

    async def submit(self, images: np.ndarray, ticket: Ticket | None = None) -> np.ndarray:
        if ticket is not None:
            ticket.close()
        self._ensure_worker()
        if self._queued_images + len(images) > self.max_queue:
            REQUESTS.labels("overloaded").inc()
            raise ServerOverloaded(f"server busy: {self._queued_images} images already queued "
                                   f"(limit {self.max_queue}); retry shortly")
        future = asyncio.get_running_loop().create_future()
        self._queued_images += len(images)
        self._queue.put_nowait(_Pending(images, future))
        return await future

    async def run_exclusive(self, fn, *args):
        """Run fn(*args) on the model thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def map_exclusive(self, fn, items: list) -> list:
        """[fn(item) for item in items] on the model thread, one at a time between batches
        (Grad-CAM). Each item counts as one queued image until it has run, as a predicted image
        does: over `max_queue` -> ServerOverloaded, so explanations cannot starve predictions."""
        if self._queued_images + len(items) > self.max_queue:
            REQUESTS.labels("overloaded").inc()
            raise ServerOverloaded(f"server busy: {self._queued_images} images already queued "
                                   f"(limit {self.max_queue}); retry shortly")
        self._queued_images += len(items)
        waiting = len(items)
        results = []
        try:
            for item in items:
                results.append(await self.run_exclusive(fn, item))
                waiting -= 1
                self._queued_images -= 1
        finally:
            self._queued_images -= waiting  # a failed or cancelled request gives its places back
        return results

    async def _next_batch(self) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        size = len(batch[0].images)
        deadline = loop.time() + self.max_latency_s
        while size < self.max_batch_size:
            if not self._queue.empty():
                item = self._queue.get_nowait()
            else:
                remaining = deadline - loop.time()
                if remaining <= 0 or self._expected <= 0:  # nothing on its way: no reason to wait
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if size + len(item.images) > self.max_batch_size:
                # Would overflow: put it first in line for the next batch.
                self._queue._queue.appendleft(item)  # noqa: SLF001 (asyncio.Queue has no push-front)
                break
            batch.append(item)
            size += len(item.images)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self._queued_images -= sum(len(p.images) for p in batch)
            started = time.perf_counter()
            for pending in batch:
                QUEUE_WAIT.observe(started - pending.queued_at)
            images = np.concatenate([p.images for p in batch], axis=0)
            BATCH_SIZE.observe(len(images))
            try:
                with MODEL_LATENCY.time():
                    probabilities = await loop.run_in_executor(self.executor, self.predict_fn, images)
            except Exception as err:  # the model failed: every waiting request hears it
                log.exception("model call failed for a batch of %d", len(images))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(err)
                REQUESTS.labels("error").inc(len(batch))
                continue
            start = 0
            for pending in batch:
                end = start + len(pending.images)
                if not pending.future.done():  # the client may have gone away
                    pending.future.set_result(probabilities[start:end])
                start = end
            REQUESTS.labels("ok").inc(len(batch))
