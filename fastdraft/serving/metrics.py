"""Serving metrics, recorded twice: for the app's own `GET /metrics` and for Ray's Prometheus export.

`GET /metrics` renders this replica's registry in Prometheus text format (scrape it directly when the
ingress has one replica). The same values go to `ray.util.metrics`, which Ray's metrics agent exports
for the whole cluster (names prefixed `ray_`) next to Serve's own `ray_serve_*` request metrics; scrape
that endpoint when there are several ingress replicas.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram

disable_created_metrics()  # no `*_created` series: they double the output and no dashboard uses them

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
RATE_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


class _Metric:
    """One metric in both systems, with the same name, help text and tags."""

    def __init__(self, kind: str, name: str, doc: str, tags: tuple[str, ...] = (), buckets: list[float] | None = None,
                 registry: CollectorRegistry | None = None):
        from ray.util import metrics as ray_metrics

        self.kind, self.tags = kind, tags
        if kind == "counter":
            self.prom = PromCounter(name, doc, tags, registry=registry)
            self.ray = ray_metrics.Counter(name, doc, tag_keys=tags)
        elif kind == "gauge":
            self.prom = PromGauge(name, doc, tags, registry=registry)
            self.ray = ray_metrics.Gauge(name, doc, tag_keys=tags)
        else:
            self.prom = PromHistogram(name, doc, tags, buckets=buckets, registry=registry)
            self.ray = ray_metrics.Histogram(name, doc, boundaries=buckets, tag_keys=tags)

    def record(self, value: float, **tags: str) -> None:
        prom = self.prom.labels(**tags) if self.tags else self.prom
        if self.kind == "counter":
            if value <= 0:  # Ray's counters refuse 0 (and counters never go down)
                return
            prom.inc(value)
            self.ray.inc(value, tags=tags or None)
        elif self.kind == "gauge":
            prom.set(value)
            self.ray.set(value, tags=tags or None)
        else:
            prom.observe(value)
            self.ray.observe(value, tags=tags or None)


class ServeMetrics:
    """The server's metrics: requests, tokens, speculative counters (AR, tau) and latencies."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = _Metric("counter", "fastdraft_requests", "HTTP requests by endpoint and status code",
                                ("endpoint", "status"), registry=r)
        self.prompt_tokens = _Metric("counter", "fastdraft_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = _Metric("counter", "fastdraft_completion_tokens", "tokens returned to clients", registry=r)
        self.drafted = _Metric("counter", "fastdraft_drafted_tokens", "tokens proposed by the draft (D)", registry=r)
        self.accepted = _Metric("counter", "fastdraft_accepted_tokens", "draft tokens accepted by the target (A)", registry=r)
        self.passes = _Metric("counter", "fastdraft_target_passes", "target verification passes (F)", registry=r)
        self.emitted = _Metric("counter", "fastdraft_emitted_tokens", "tokens emitted by the engine (N)", registry=r)
        self.acceptance_rate = _Metric("gauge", "fastdraft_acceptance_rate", "AR = A / D since start", registry=r)
        self.tau = _Metric("gauge", "fastdraft_tau", "tau = N / F (tokens per target pass) since start", registry=r)
        self.latency = _Metric("histogram", "fastdraft_request_latency_seconds", "request latency", ("endpoint",),
                               LATENCY_BUCKETS, registry=r)
        self.ttft = _Metric("histogram", "fastdraft_time_to_first_token_seconds", "time to the first token",
                            ("endpoint",), LATENCY_BUCKETS, registry=r)
        self.queue = _Metric("histogram", "fastdraft_queue_time_seconds",
                             "time a generation waited in the model replica before its batch started", (), LATENCY_BUCKETS,
                             registry=r)
        self.batch_rows = _Metric("histogram", "fastdraft_batch_rows",
                                  "sequences sharing one engine call (and its forward passes)", (), BATCH_BUCKETS,
                                  registry=r)
        self.tokens_per_s = _Metric("histogram", "fastdraft_output_tokens_per_second",
                                    "output tokens per second of each request, first token to last", (), RATE_BUCKETS,
                                    registry=r)
        self.ignored = _Metric("counter", "fastdraft_requests_with_ignored_fields",
                               "requests that carried fields neither OpenAI's schema nor the extensions know (ignored)",
                               registry=r)
        self._totals = {"drafted": 0, "accepted": 0, "target_passes": 0, "emitted": 0}

    def record_generation(self, spec: dict, queue_s: float | None, batch_rows: int | None = None) -> None:
        """Add one choice's engine counters (usage.speculative), its queue time and batch size."""
        for key, metric in (("drafted", self.drafted), ("accepted", self.accepted), ("target_passes", self.passes),
                            ("emitted", self.emitted)):
            self._totals[key] += spec.get(key, 0)
            metric.record(spec.get(key, 0))
        t = self._totals
        if t["drafted"]:
            self.acceptance_rate.record(t["accepted"] / t["drafted"])
        if t["target_passes"]:
            self.tau.record(t["emitted"] / t["target_passes"])
        if queue_s is not None:
            self.queue.record(queue_s)
        if batch_rows is not None:
            self.batch_rows.record(batch_rows)

    def record_request(self, endpoint: str, status: int, latency_s: float, prompt_tokens: int = 0,
                       completion_tokens: int = 0, ttft_s: float | None = None) -> None:
        """One answered request; status 499 (nginx's "client closed request") counts a client that went away."""
        self.requests.record(1, endpoint=endpoint, status=str(status))
        if status >= 400:
            return
        self.latency.record(latency_s, endpoint=endpoint)
        self.prompt_tokens.record(prompt_tokens)
        self.completion_tokens.record(completion_tokens)
        if ttft_s is not None:
            self.ttft.record(ttft_s, endpoint=endpoint)
            if completion_tokens > 1 and latency_s > ttft_s:
                self.tokens_per_s.record((completion_tokens - 1) / (latency_s - ttft_s))

    def render(self) -> bytes:
        return generate_latest(self.registry)
