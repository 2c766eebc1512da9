"""What the coordinator measures, and GET /metrics (prometheus_client's text format).

Latencies go into fixed-bucket histograms (constant memory however long the
coordinator runs); rates come from counters sampled whenever /health or
/metrics is asked.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sized
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import status

if TYPE_CHECKING:
    from .plan import Plan
    from .prefixcache import PrefixIndex

TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATE_WINDOW_S = 30.0  # a rate covers at most this much of the recent past
MIN_RATE_SPAN_S = 0.5  # samples closer together than this give no rate
MAX_RATE_SAMPLES = 1024
CLUSTER_STATES = ("starting", "loading", "ready", "degraded", "failed", "stopping")
PREFIX = "kimi_"


class Histogram:
    """A Prometheus histogram: counts per upper bound, plus sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it), ending with (+inf, count)."""
        out, total = [], 0
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            total += n
            out.append((bound, total))
        return out

    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None


class RateMeter:
    """Per-second rates of growing counters, from the samples it is shown:
    over the samples of the last `window_s`, none when those are too few."""

    def __init__(self, window_s: float = RATE_WINDOW_S, min_span_s: float = MIN_RATE_SPAN_S):
        self.window_s = window_s
        self.min_span_s = min_span_s
        self.samples: dict[str, deque[tuple[float, float]]] = {}

    def rate(self, key: str, value: float, now: float | None = None) -> float | None:
        """Record `value` for `key` at `now` and return its recent rate, or
        None until samples of the last window span at least min_span_s."""
        now = time.monotonic() if now is None else now
        d = self.samples.setdefault(key, deque(maxlen=MAX_RATE_SAMPLES))
        if d and value < d[-1][1]:
            d.clear()  # the counter started again (a restarted worker)
        d.append((now, value))
        while now - d[0][0] > self.window_s:
            d.popleft()
        t0, v0 = d[0]
        if now - t0 < self.min_span_s:
            return None
        return (value - v0) / (now - t0)


# -- GET /metrics ----------------------------------------------------------------------


class EngineView(Protocol):
    """What /metrics reads of the coordinator's engine."""

    metrics: dict[str, int]
    latency: dict[str, Histogram]
    requests: Sized
    waiting: int
    plan: Plan
    prefix: PrefixIndex


def _histogram(name: str, help_text: str, h: Histogram) -> HistogramMetricFamily:
    buckets = [(floatToGoString(bound), n) for bound, n in h.cumulative()]
    return HistogramMetricFamily(PREFIX + name, help_text, buckets=buckets, sum_value=h.sum)


class _Snapshot(Collector):
    """The engine's counters and the workers' last answers, as metric families."""

    def __init__(self, engine: EngineView, state: str, workers: dict[str, dict]):
        self.engine, self.state, self.workers = engine, state, workers

    def collect(self) -> Iterator[Metric]:
        engine, workers = self.engine, self.workers
        m = engine.metrics
        state = GaugeMetricFamily(PREFIX + "cluster_state", "1 for the state the cluster is in", labels=["state"])
        for s in CLUSTER_STATES:
            state.add_metric([s], int(s == self.state))
        yield state
        yield CounterMetricFamily(PREFIX + "requests_total", "Requests admitted to the pipeline", m["requests_total"])
        yield CounterMetricFamily(
            PREFIX + "requests_failed_total", "Requests that ended with an error", m["requests_failed"]
        )
        yield GaugeMetricFamily(PREFIX + "requests_in_flight", "Requests in the pipeline now", len(engine.requests))
        yield GaugeMetricFamily(PREFIX + "queue_depth", "Requests waiting for a free slot", engine.waiting)
        yield CounterMetricFamily(PREFIX + "prompt_tokens_total", "Prompt tokens admitted", m["prompt_tokens"])
        yield CounterMetricFamily(PREFIX + "generation_tokens_total", "Tokens generated", m["tokens_generated"])
        yield _histogram(
            "time_to_first_token_seconds", "From admission to the first generated token", engine.latency["ttft_s"]
        )
        yield _histogram(
            "inter_token_latency_seconds",
            "Between two generated tokens of one request (a run of tokens shares its gap)",
            engine.latency["itl_s"],
        )

        prefix = engine.prefix.stats()
        for key, help_text in (
            ("hits", "Requests that started from the prefix cache"),
            ("misses", "Requests the prefix cache had nothing for"),
            ("tokens_reused", "Prompt tokens taken from the prefix cache instead of prefilled"),
            ("evictions", "Prefix cache entries evicted (least recently used) to stay within a stage's budget"),
        ):
            yield CounterMetricFamily(PREFIX + f"prefix_cache_{key}_total", help_text, prefix[key])
        yield GaugeMetricFamily(
            PREFIX + "prefix_cache_entries", "Prefix cache entries every stage holds", prefix["entries"]
        )

        layers = {s.worker: f"{s.start}-{s.end}" for s in engine.plan.stages}

        def per_worker(cls, name: str, help_text: str, value: Callable[[dict], object]) -> Metric:
            family = cls(PREFIX + name, help_text, labels=["worker", "layers"])
            for worker, w in workers.items():
                v = value(w)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    family.add_metric([worker, layers.get(worker, "")], v)
            return family

        def stat(key: str) -> Callable[[dict], object]:
            return lambda w: w.get(key) if w.get("up") else None

        def loaded(w: dict) -> float | None:
            p = w.get("progress") or {}
            return p["done_bytes"] / p["total_bytes"] if p.get("total_bytes") else None

        yield per_worker(
            GaugeMetricFamily,
            "worker_up",
            "1 when the worker answered its last control command",
            lambda w: int(bool(w.get("up"))),
        )
        yield per_worker(
            GaugeMetricFamily,
            "worker_ready",
            "1 when the worker holds its shard and serves",
            lambda w: int(status.serving(w)),
        )
        yield per_worker(
            CounterMetricFamily,
            "stage_compute_seconds_total",
            "Seconds the stage spent computing forwards",
            stat("compute_s"),
        )
        yield per_worker(CounterMetricFamily, "stage_forwards_total", "Forward passes the stage ran", stat("forwards"))
        yield per_worker(
            CounterMetricFamily, "stage_tokens_total", "Token positions the stage computed", stat("tokens_in")
        )
        yield per_worker(
            GaugeMetricFamily, "stage_active_requests", "Requests holding a KV cache on the stage", stat("requests")
        )
        yield per_worker(GaugeMetricFamily, "stage_cache_bytes", "Bytes of KV cache on the stage", stat("cache_bytes"))
        yield per_worker(
            GaugeMetricFamily, "prefix_cache_bytes", "Bytes the stage's prefix cache entries hold", stat("prefix_bytes")
        )
        yield per_worker(
            GaugeMetricFamily,
            "prefix_cache_budget_bytes",
            "The stage's prefix cache budget",
            stat("prefix_budget_bytes"),
        )
        yield per_worker(
            GaugeMetricFamily, "worker_memory_bytes", "Memory the worker's arrays hold", stat("memory_bytes")
        )
        yield per_worker(GaugeMetricFamily, "worker_load_progress_ratio", "Share of the shard's bytes loaded", loaded)


def render(engine: EngineView, state: str, workers: dict[str, dict]) -> str:
    """The coordinator's metrics and its process's (CPU, memory, open files) in
    Prometheus text format; `workers` maps a worker's name to its last `stats`
    answer (or what is known of it when it is down)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(engine, state, workers))
    ProcessCollector(registry=registry)
    return generate_latest(registry).decode()
