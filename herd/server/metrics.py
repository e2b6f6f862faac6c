"""Prometheus metrics named like vLLM's (`vllm:x` -> `herd:x`), so existing dashboards carry over.

Engine state (requests running and waiting, KV-cache use, prefix-cache counters, preemptions) is
read from `engine.stats()` at scrape time; per-request figures (tokens, TTFT, time per output
token, end-to-end latency, finish reasons) are recorded by the routes through RequestMetrics.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's exposition has no `_created` series; dashboards do not expect them.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 1000000)


class _EngineCollector:
    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        s = self.engine.stats()
        labels = ["model_name"]
        values = [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("herd:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("herd:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("herd:kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent.", s.kv_usage)
        yield gauge("herd:gpu_cache_usage_perc", "KV-cache usage (vLLM's older name).", s.kv_usage)
        yield gauge("herd:kv_cache_blocks_used", "KV-cache blocks in use, all pools.", s.kv_blocks_used)
        yield gauge("herd:kv_cache_blocks_total", "KV-cache blocks, all pools.", s.kv_blocks_total)
        yield counter("herd:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_queries)
        yield counter("herd:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_hits)
        yield counter("herd:num_preemptions", "Preemptions of running requests.", s.num_preemptions)


class Metrics:
    """One registry per app, so several apps can live in one process (tests do)."""

    def __init__(self, engine, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        r = self.registry
        labels = ["model_name"]
        self.prompt_tokens = Counter("herd:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("herd:generation_tokens", "Tokens generated.", labels, registry=r)
        self.request_success = Counter(
            "herd:request_success", "Finished requests, by finish reason.", labels + ["finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "herd:time_to_first_token_seconds", "Time to first token.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "herd:time_per_output_token_seconds",
            "Time per output token after the first.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "herd:inter_token_latency_seconds", "Time between outputs.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "herd:e2e_request_latency_seconds", "End-to-end request latency.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.request_prompt_tokens = Histogram(
            "herd:request_prompt_tokens", "Prompt tokens per request.", labels, buckets=_TOKEN_BUCKETS, registry=r
        )
        self.request_generation_tokens = Histogram(
            "herd:request_generation_tokens", "Generated tokens per request.", labels, buckets=_TOKEN_BUCKETS, registry=r
        )

    def request(self, prompt_tokens: int) -> RequestMetrics:
        return RequestMetrics(self, prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Timing of one engine request, fed every output it produces."""

    def __init__(self, metrics: Metrics, prompt_tokens: int):
        self.m = metrics
        self.prompt_tokens = prompt_tokens
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.done = False
        metrics.prompt_tokens.labels(metrics.model_name).inc(prompt_tokens)

    def on_output(self, out) -> None:
        now = time.monotonic()
        new = sum(len(o.delta_token_ids) for o in out.outputs)
        name = self.m.model_name
        if new:
            if self.first is None:
                self.first = now
                self.m.ttft.labels(name).observe(now - self.start)
            elif self.last is not None:
                self.m.itl.labels(name).observe(now - self.last)
                self.m.tpot.labels(name).observe((now - self.last) / new)
            self.last = now
            self.tokens += new
            self.m.generation_tokens.labels(name).inc(new)
        if out.finished:
            self.finish([o.finish_reason or "abort" for o in out.outputs])

    def finish(self, reasons: list[str]) -> None:
        if self.done:
            return
        self.done = True
        name = self.m.model_name
        self.m.e2e.labels(name).observe(time.monotonic() - self.start)
        self.m.request_prompt_tokens.labels(name).observe(self.prompt_tokens)
        self.m.request_generation_tokens.labels(name).observe(self.tokens)
        for reason in reasons:
            self.m.request_success.labels(name, reason).inc()
