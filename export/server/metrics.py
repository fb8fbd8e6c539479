"""The server's Prometheus metrics (``GET /metrics``), one registry per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# the stage label of opad_stage_seconds: queue, conditioning, then denoise and decode (eager) or
# denoise_decode (the backends that run both as one graph), encode
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, max_batch: int) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("opad_requests", "HTTP requests answered, by route and status", ["route", "status"],
                                registry=r)
        self.errors = Counter("opad_errors", "error answers, by status and OpenAI error code", ["status", "code"],
                              registry=r)
        self.queue_depth = Gauge("opad_queue_depth", "generation requests waiting for the model", registry=r)
        self.batch_images = Histogram("opad_batch_images", "images per denoise+decode batch",
                                      buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.images = Counter("opad_images", "images generated", registry=r)
        self.stage_seconds = Histogram("opad_stage_seconds", "seconds per generation request and stage", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("opad_request_seconds", "seconds per generation request, end to end",
                                         buckets=LATENCY_BUCKETS, registry=r)
        # opad serve --ray: the images each Ray Serve replica made (the replica id each answer carries)
        self.replica_images = Counter("opad_replica_images", "images generated, by Ray Serve replica", ["replica"],
                                      registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
