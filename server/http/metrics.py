"""Prometheus metrics: collectors fed from the engine's plain stats and from finished requests.

The only module that knows about Prometheus. Per-request counters and latency histograms are recorded
by the serving layer as requests finish; engine gauges and cache counters are read from
`Engine.stats()` when /metrics is scraped, so the engine's hot loop never touches a metric.
Labels carry the adapter that served a request (a task, "zero-shot", "mix-…"), never a raw model name,
so a client cannot blow up the number of series by inventing names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from server.engine.outputs import Result

JOB_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """Every metric of one server process, in its own registry."""

    def __init__(self, engine_stats: Callable[[], object], zero_shot_source: Callable[[], str] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mhr_requests", "Finished requests by serving adapter and outcome.",
                                ["adapter", "status"], registry=r)
        self.rejections = Counter("mhr_rejected_requests", "Requests refused before they ran, by reason.",
                                  ["reason"], registry=r)
        self.prompt_tokens = Counter("mhr_prompt_tokens", "Prompt tokens of finished requests.",
                                     ["adapter"], registry=r)
        self.generated_tokens = Counter("mhr_generated_tokens", "Tokens generated, by serving adapter.",
                                        ["adapter"], registry=r)
        self.queue_seconds = Histogram("mhr_queue_seconds", "Time from arrival to joining the running batch.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.first_token_seconds = Histogram("mhr_time_to_first_token_seconds",
                                             "Time from arrival to the first generated token.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("mhr_request_seconds", "End-to-end time of finished requests.",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.token_seconds = Histogram("mhr_time_per_output_token_seconds",
                                       "Mean time between a request's generated tokens after the first, per request.",
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.job_seconds = Histogram("mhr_adapt_job_seconds", "Time from start to end of ended adaptation jobs, "
                                     "by how they ended.", ["state"], buckets=JOB_BUCKETS, registry=r)
        self.job_steps = Counter("mhr_adapt_steps", "Optimizer steps run by adaptation jobs (its rate: steps "
                                 "per second).", registry=r)
        self._jobs: Callable[[], dict[str, int]] = dict
        r.register(_EngineCollector(engine_stats, zero_shot_source))
        r.register(_JobsCollector(lambda: self._jobs()))

    def finished(self, adapter: str, result: Result, seconds: float) -> None:
        self.requests.labels(adapter, result.finish_reason).inc()
        self.prompt_tokens.labels(adapter).inc(result.prompt_tokens)
        self.generated_tokens.labels(adapter).inc(len(result.tokens))
        self.request_seconds.observe(seconds)
        if result.queue_seconds is not None:
            self.queue_seconds.observe(result.queue_seconds)
        if result.first_token_seconds is not None:
            self.first_token_seconds.observe(result.first_token_seconds)
        if result.after_first_token_seconds is not None:
            self.token_seconds.observe(result.after_first_token_seconds / (len(result.tokens) - 1))

    def watch_jobs(self, counts: Callable[[], dict[str, int]]) -> None:
        """Report adaptation jobs by state from `counts()` at scrape time."""
        self._jobs = counts

    def job_step(self) -> None:
        self.job_steps.inc()

    def job_ended(self, state: str, seconds: float) -> None:
        self.job_seconds.labels(state).observe(seconds)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the engine's stats at scrape time."""

    def __init__(self, engine_stats: Callable[[], object], zero_shot_source: Callable[[], str] | None) -> None:
        self._stats, self._zero_shot_source = engine_stats, zero_shot_source

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gauges = {
            "mhr_running_requests": ("Requests in the running batch.", s.running),
            "mhr_waiting_requests": ("Requests waiting for admission.", s.waiting),
            "mhr_adapter_slots": ("Adapter slots per layer (slot 0, the empty adapter, included).", s.slots),
            "mhr_adapter_slots_in_use": ("Slots holding an adapter.", s.slots_in_use),
            "mhr_tasks": ("Tasks served from the bundle.", s.tasks),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        if self._zero_shot_source is not None:
            info = GaugeMetricFamily("mhr_zero_shot_adapter", "The zero-shot adapter's candidate (backbone, average, "
                                     "trained), as 1 under its label.", labels=["source"])
            info.add_metric([self._zero_shot_source()], 1)
            yield info
        cache = s.cache
        counters = {
            "mhr_adapter_cache_hits": ("Adapter lookups served from a slot.", cache.hits),
            "mhr_adapter_cache_misses": ("Adapter lookups that loaded the adapter into a slot.", cache.misses),
            "mhr_adapter_cache_waits": ("Adapter lookups that waited because every slot was in use.", cache.waits),
            "mhr_adapter_cache_evictions": ("Adapters dropped from a slot to make room.", cache.evictions),
            "mhr_materialize_seconds": ("Time spent materializing and writing adapters into slots.",
                                        cache.load_seconds),
            "mhr_engine_steps": ("Engine steps run (one forward each: new prompts, a chunk, running rows' tokens).",
                                 s.steps),
            "mhr_batch_rows": ("Rows given a token, summed over steps (divide by steps: mean batch size).",
                               s.batch_rows),
        }
        if s.prefix is not None:
            counters |= {
                "mhr_prefix_cache_lookups": ("Prompts looked up in the prefix cache.", s.prefix.lookups),
                "mhr_prefix_cache_hits": ("Prompts that found a cached prefix.", s.prefix.hits),
                "mhr_prefix_cache_hit_tokens": ("Prompt tokens not prefilled, their prefix cached.",
                                                s.prefix.hit_tokens),
            }
            yield GaugeMetricFamily("mhr_prefix_cache_bytes", "Bytes of cached prefixes' keys and values.",
                                    value=s.prefix.bytes)
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class _JobsCollector:
    """Adaptation jobs by state, read at scrape time (none without the admin routes)."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("mhr_adapt_jobs", "Adaptation jobs by state (ended ones: those still listed).",
                                 labels=["state"])
        for state, n in self._counts().items():
            jobs.add_metric([state], n)
        yield jobs
