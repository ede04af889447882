"""Prometheus metrics of one server process (``GET /metrics``), on a registry of its own."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class Metrics:
    """Request, queue, batch and throughput metrics.

    Parameters
    ----------
    queue_depth : callable
        Returns the number of requests waiting (read at scrape time).
    max_batch : int
        Largest batch (sets the batch-size histogram buckets).
    """

    def __init__(self, queue_depth: Callable[[], int], max_batch: int, window_s: float = 60.0) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sdkern_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sdkern_request_latency_seconds",
            "Time from request to response of the generation endpoints",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        buckets = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, max_batch) if b <= max_batch})
        self.batch_size = Histogram(
            "sdkern_batch_size", "Images per U-Net batch", buckets=buckets, registry=self.registry
        )
        self.batch_seconds = Histogram(
            "sdkern_batch_seconds",
            "Seconds per batch",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.images = Counter("sdkern_images", "Images generated", registry=self.registry)
        depth = Gauge("sdkern_queue_depth", "Requests waiting with no image started", registry=self.registry)
        depth.set_function(lambda: float(queue_depth()))
        self.window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()
        ips = Gauge(
            "sdkern_images_per_second",
            f"Images generated per second over the last {window_s:g} s",
            registry=self.registry,
        )
        ips.set_function(self.images_per_second)

    def on_batch(self, size: int, seconds: float) -> None:
        """Record one finished batch of ``size`` images."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)
        self._recent.append((time.monotonic(), size))

    def images_per_second(self) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / self.window_s

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
