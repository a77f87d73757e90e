"""Prometheus metrics: what was served (counters, histograms) and what is going on (read at scrape time).

Router-facing gauges follow vLLM's semantics under mixserve's prefix, so that an adapter-aware router (e.g. the
Kubernetes Gateway API inference extension) can be pointed at them: `mixserve:num_requests_waiting`,
`mixserve:num_requests_running`, `mixserve:kv_cache_usage_perc` and `mixserve:lora_requests_info`.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.engine.sequence import Sequence

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    """One server's metrics, in a registry of its own. Its `observe_*` methods are the hooks the registry and the
    engine are built with; `watch` adds the gauges read from the running server at scrape time."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "mixserve:requests", "HTTP requests, by route and status", ["route", "status"], registry=registry
        )
        self.request_seconds = Histogram(
            "mixserve:request_duration_seconds", "HTTP request latency", ["route"], buckets=LATENCY, registry=registry
        )
        self.queue_seconds = Histogram(
            "mixserve:request_queue_time_seconds", "Time from arrival to admission", buckets=LATENCY, registry=registry
        )
        self.ttft = Histogram(
            "mixserve:time_to_first_token_seconds",
            "Time from arrival to the first token",
            buckets=LATENCY,
            registry=registry,
        )
        self.tpot = Histogram(
            "mixserve:time_per_output_token_seconds",
            "Mean time per token after the first",
            buckets=PER_TOKEN,
            registry=registry,
        )
        self.prompt_tokens = Counter("mixserve:prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.generation_tokens = Counter("mixserve:generation_tokens", "Tokens generated", registry=registry)
        self.finished = Counter(
            "mixserve:request_success",
            "Requests that finished, by finish reason",
            ["finished_reason"],
            registry=registry,
        )
        self.adapter_loads = Counter(
            "mixserve:adapter_loads", "Adapter loads, by outcome", ["outcome"], registry=registry
        )
        self.adapter_load_seconds = Histogram(
            "mixserve:adapter_load_seconds", "Adapter load latency", buckets=LATENCY, registry=registry
        )
        self.adapter_evictions = Counter(
            "mixserve:adapter_evictions", "Adapters unloaded to make room", registry=registry
        )
        self.adapter_fetches = Counter(
            "mixserve:adapter_fetches",
            "Adapter fetches from remote sources, by outcome (success, or the failure's reason)",
            ["outcome"],
            registry=registry,
        )
        self.adapter_fetch_seconds = Histogram(
            "mixserve:adapter_fetch_seconds", "Remote adapter fetch latency", buckets=LATENCY, registry=registry
        )
        self.adapter_fetch_bytes = Counter(
            "mixserve:adapter_fetch_bytes", "Bytes of adapters fetched from remote sources", registry=registry
        )

    def watch(self, state) -> None:
        """state: the ServerState whose engine and registry the gauges read."""
        self.registry.register(_Live(state))

    def observe_finished(self, seq: Sequence) -> None:
        self.finished.labels(seq.finish_reason).inc()
        self.prompt_tokens.inc(len(seq.request.prompt_ids))
        self.generation_tokens.inc(len(seq.tokens))
        if seq.admitted_at is not None:
            self.queue_seconds.observe(seq.admitted_at - seq.submitted_at)
        if seq.first_token_at is not None:
            self.ttft.observe(seq.first_token_at - seq.submitted_at)
            if len(seq.tokens) > 1 and seq.finished_at is not None:
                self.tpot.observe((seq.finished_at - seq.first_token_at) / (len(seq.tokens) - 1))

    def observe_load(self, seconds: float | None, outcome: str) -> None:
        self.adapter_loads.labels(outcome).inc()
        if seconds is not None:
            self.adapter_load_seconds.observe(seconds)

    def observe_evict(self, name: str) -> None:
        self.adapter_evictions.inc()

    def observe_fetch(self, seconds: float | None, size: int, outcome: str) -> None:
        self.adapter_fetches.labels(outcome).inc()
        if seconds is not None:
            self.adapter_fetch_seconds.observe(seconds)
            self.adapter_fetch_bytes.inc(size)


class _Live:
    """Gauges read from the engine and the registry when scraped."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        engine, registry = self.state.engine, self.state.registry
        running, waiting = engine.adapters_in_use()
        loaded = registry.loaded()
        yield _gauge("mixserve:num_requests_waiting", "Requests waiting to be admitted", engine.queued)
        yield _gauge("mixserve:num_requests_running", "Sequences in the running batch", engine.running)
        pool = engine.runner.cache.pool
        used, total = pool.used, pool.total
        yield _gauge("mixserve:kv_cache_usage_perc", "KV cache blocks in use, as a fraction of all", used / total)
        yield _gauge("mixserve:kv_cache_blocks_used", "KV cache blocks held by sequences", used)
        yield _gauge("mixserve:kv_cache_blocks_total", "KV cache blocks (MIXSERVE_KV_CACHE_MEMORY)", total)
        yield _gauge("mixserve:prefix_cache_blocks", "KV cache blocks cached for their prefix (reusable)", pool.cached)
        runner = engine.runner
        yield CounterMetricFamily(
            "mixserve:prefix_cache_queries",
            "Prefilled tokens looked up in the prefix cache (MIXSERVE_PREFIX_CACHE)",
            value=runner.prefix_queried_tokens,
        )
        yield CounterMetricFamily(
            "mixserve:prefix_cache_hits",
            "Prefilled tokens found in the prefix cache, not computed again",
            value=runner.prefix_hit_tokens,
        )
        yield CounterMetricFamily(
            "mixserve:num_preemptions",
            "Running sequences preempted for lack of KV cache blocks (recomputed later)",
            value=engine.preemptions,
        )
        yield _gauge("mixserve:adapters_resident", "Adapters loaded in the model", len(loaded))
        yield _gauge(
            "mixserve:adapter_bytes_resident", "Bytes of the loaded adapters", sum(a.built.nbytes for a in loaded)
        )
        allocated, held = registry.model.rank_pool_bytes()
        pools = GaugeMetricFamily(
            "mixserve:rank_pool_bytes",
            "Bytes of the low-rank adapters' rank pools: allocated, and held by adapters (the rest is free ranks)",
            labels=["what"],
        )
        pools.add_metric(["allocated"], allocated)
        pools.add_metric(["held"], held)
        yield pools
        yield _tiers(registry, self.state.store)
        info = GaugeMetricFamily(
            "mixserve:lora_requests_info",
            "Adapters of running and waiting requests (value: update time)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        info.add_metric([",".join(running), ",".join(waiting), str(registry.capacity)], time.time())
        yield info


def _tiers(registry, store) -> GaugeMetricFamily:
    """Adapters and bytes per tier: device (attached to the model), host (evicted to host memory), disk (the
    disk tier of fetched adapters; the local store is not counted)."""
    host = [a for a in (registry.get(name) for name in registry.known()) if a is not None and not a.resident]
    loaded = registry.loaded()
    disk_count, disk_bytes = store.disk_usage()
    family = GaugeMetricFamily(
        "mixserve:adapter_tier",
        "Adapters (what=adapters) and their bytes (what=bytes) per tier",
        labels=["tier", "what"],
    )
    for tier, count, size in (
        ("device", len(loaded), sum(a.nbytes for a in loaded)),
        ("host", len(host), sum(a.nbytes for a in host)),
        ("disk", disk_count, disk_bytes),
    ):
        family.add_metric([tier, "adapters"], count)
        family.add_metric([tier, "bytes"], size)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
