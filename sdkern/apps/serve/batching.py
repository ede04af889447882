"""Dynamic batching: a bounded queue of requests whose images run in shared U-Net batches.

A request is a list of :class:`~sdkern.apps.serve.engine.ImageJob` (``n`` images). Its jobs wait in one
FIFO queue. A single worker takes the oldest job, waits up to ``batch_wait_ms`` for more jobs with the
same batch key (size, steps, scheduler, guidance on/off), takes up to ``max_batch`` of them in arrival
order and runs them as one batch on a dedicated thread (the pipeline is used by one thread only).
A request whose client went away or timed out is withdrawn: its queued jobs are removed and never run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sdkern.apps.serve.engine import ImageJob

logger = logging.getLogger("sdkern")


class QueueFull(Exception):
    """The queue holds ``queue_size`` requests already; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the request queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass(eq=False)
class Ticket:
    """One submitted request: its jobs, their results and a future completed when all are done."""

    jobs: list[ImageJob]
    future: asyncio.Future[list[Any]]
    submitted: float = field(default_factory=time.monotonic)
    results: list[Any] = field(default_factory=list)
    done_count: int = 0
    withdrawn: bool = False
    started: bool = False

    def __post_init__(self) -> None:
        self.results = [None] * len(self.jobs)


@dataclass
class _Item:
    ticket: Ticket
    index: int
    key: tuple[Any, ...]


class Batcher:
    """The request queue and its batching worker.

    Parameters
    ----------
    run : callable
        ``run(jobs) -> images`` for jobs sharing a batch key (``Engine.generate``); called on one
        worker thread.
    key : callable
        ``key(job) -> tuple``: jobs with equal keys may share a batch (``Engine.batch_key``).
    max_batch : int
        Most images per batch.
    batch_wait_ms : float
        How long the oldest job waits for batch partners.
    queue_size : int
        Most requests waiting (not yet started); more raise :class:`QueueFull`.
    on_batch : callable, optional
        ``on_batch(batch_size, seconds)`` after each batch (metrics).
    """

    def __init__(
        self,
        run: Callable[[list[ImageJob]], list[Any]],
        key: Callable[[ImageJob], tuple[Any, ...]],
        max_batch: int = 4,
        batch_wait_ms: float = 10.0,
        queue_size: int = 64,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or batch_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be >= 1 and batch_wait_ms >= 0")
        self.run, self.key = run, key
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000.0
        self.queue_size = queue_size
        self.on_batch = on_batch
        self._items: list[_Item] = []
        self._waiting: set[int] = set()  # ids of tickets with no job started yet
        self._wakeup = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdkern-serve")
        self._task: asyncio.Task[None] | None = None
        self.accepting = True
        self.busy = False
        self.batch_seconds = 1.0  # running mean of a batch's time, for Retry-After

    # ------------------------------------------------------------------ API
    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="sdkern-batcher")

    async def stop(self) -> None:
        """Stop taking requests, finish every queued and running job, then stop the worker."""
        self.accepting = False
        while self._items or self.busy:
            await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    @property
    def depth(self) -> int:
        """Requests waiting with no image started."""
        return len(self._waiting)

    @property
    def queued_images(self) -> int:
        return len(self._items)

    def retry_after(self) -> int:
        """Seconds a client should wait before retrying when the queue is full (>= 1)."""
        batches = max(1, self.queued_images // self.max_batch)
        return max(1, round(batches * self.batch_seconds))

    def submit(self, jobs: list[ImageJob]) -> Ticket:
        """Queue a request.

        Raises
        ------
        NotAccepting
            While shutting down.
        QueueFull
            When ``queue_size`` requests are already waiting.
        """
        if not self.accepting:
            raise NotAccepting("the server is shutting down")
        if len(self._waiting) >= self.queue_size:
            raise QueueFull(self.retry_after())
        t = Ticket(jobs=list(jobs), future=asyncio.get_running_loop().create_future())
        self._waiting.add(id(t))
        self._items.extend(_Item(t, i, self.key(j)) for i, j in enumerate(jobs))
        self._wakeup.set()
        return t

    def withdraw(self, ticket: Ticket) -> int:
        """Remove the queued jobs of ``ticket`` (client gone or timed out); return how many were removed.

        Jobs already running finish, their images are dropped.
        """
        ticket.withdrawn = True
        self._waiting.discard(id(ticket))
        before = len(self._items)
        self._items = [it for it in self._items if it.ticket is not ticket]
        if not ticket.future.done():
            ticket.future.cancel()
        return before - len(self._items)

    def withdraw_queued(self, ticket: Ticket) -> None:
        """Drop the still-queued jobs of a failed request."""
        self._waiting.discard(id(ticket))
        self._items = [it for it in self._items if it.ticket is not ticket]

    # ------------------------------------------------------------------ worker
    def _take(self, key: tuple[Any, ...]) -> list[_Item]:
        batch: list[_Item] = []
        rest: list[_Item] = []
        for it in self._items:
            if len(batch) < self.max_batch and it.key == key:
                batch.append(it)
            else:
                rest.append(it)
        self._items = rest
        return batch

    def _count(self, key: tuple[Any, ...]) -> int:
        return sum(1 for it in self._items if it.key == key)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._items:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key = self._items[0].key
            deadline = loop.time() + self.batch_wait
            while self._items and self._count(key) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take(key)
            if not batch:  # the oldest request was withdrawn while waiting
                continue
            for it in batch:
                it.ticket.started = True
                self._waiting.discard(id(it.ticket))
            self.busy = True
            try:
                await self._run_batch(loop, batch)
            finally:
                self.busy = False

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        t0 = time.perf_counter()
        jobs = [it.ticket.jobs[it.index] for it in batch]
        try:
            images = await loop.run_in_executor(self._pool, self.run, jobs)
            dt = time.perf_counter() - t0
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * dt
            if self.on_batch is not None:
                self.on_batch(len(batch), dt)
            for it, im in zip(batch, images, strict=True):
                self._deliver(it, im)
        except Exception as e:
            tickets = list(dict.fromkeys(it.ticket for it in batch))
            if len(tickets) == 1:
                logger.exception("sdkern serve: a batch of %d image(s) failed", len(batch))
                self._fail(tickets[0], e)
                self.withdraw_queued(tickets[0])
                return
            logger.warning("sdkern serve: a batch of %d requests failed (%s); rerunning each alone", len(tickets), e)
            for t in tickets:
                await self._run_batch(loop, [it for it in batch if it.ticket is t])

    def _deliver(self, it: _Item, image: Any) -> None:
        t = it.ticket
        t.results[it.index] = image
        t.done_count += 1
        if t.done_count == len(t.jobs) and not t.future.done():
            t.future.set_result(t.results)

    @staticmethod
    def _fail(t: Ticket, e: BaseException) -> None:
        if not t.future.done():
            t.future.set_exception(e)
