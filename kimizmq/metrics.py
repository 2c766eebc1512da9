"""What the coordinator measures, and GET /metrics in Prometheus text format.

Latencies go into fixed-bucket histograms (constant memory however long the
coordinator runs); rates come from counters sampled whenever /health or
/metrics is asked.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .coordinator import Engine

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


# -- Prometheus text format ---------------------------------------------------------


def _label_value(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


class Exposition:
    """Builds the text: one HELP and TYPE per family, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        name = PREFIX + name
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            self.lines.append(self._sample(name, labels, value))

    def histogram(self, name: str, help_text: str, h: Histogram) -> None:
        name = PREFIX + name
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for bound, n in h.cumulative():
            self.lines.append(self._sample(f"{name}_bucket", {"le": _number(bound)}, n))
        self.lines.append(self._sample(f"{name}_sum", {}, h.sum))
        self.lines.append(self._sample(f"{name}_count", {}, h.count))

    @staticmethod
    def _sample(name: str, labels: dict, value: float) -> str:
        if labels:
            inner = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            return f"{name}{{{inner}}} {_number(value)}"
        return f"{name} {_number(value)}"

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(engine: Engine, state: str, workers: dict[str, dict]) -> str:
    """The coordinator's metrics; `workers` maps a worker's name to its last
    `stats` answer (or what is known of it when it is down)."""
    m = engine.metrics
    out = Exposition()
    out.family(
        "cluster_state",
        "gauge",
        "1 for the state the cluster is in",
        [({"state": s}, int(s == state)) for s in CLUSTER_STATES],
    )
    out.family("requests_total", "counter", "Requests admitted to the pipeline", [({}, m["requests_total"])])
    out.family("requests_failed_total", "counter", "Requests that ended with an error", [({}, m["requests_failed"])])
    out.family("requests_in_flight", "gauge", "Requests in the pipeline now", [({}, len(engine.requests))])
    out.family("queue_depth", "gauge", "Requests waiting for a free slot", [({}, engine.waiting)])
    out.family("prompt_tokens_total", "counter", "Prompt tokens admitted", [({}, m["prompt_tokens"])])
    out.family("generation_tokens_total", "counter", "Tokens generated", [({}, m["tokens_generated"])])
    out.histogram(
        "time_to_first_token_seconds", "From admission to the first generated token", engine.latency["ttft_s"]
    )
    out.histogram(
        "inter_token_latency_seconds",
        "Between two generated tokens of one request (a run of tokens shares its gap)",
        engine.latency["itl_s"],
    )

    layers = {s.worker: f"{s.start}-{s.end}" for s in engine.plan.stages}

    def per_worker(key: str, only_up: bool = True) -> list[tuple[dict, float]]:
        rows = []
        for name, w in workers.items():
            v = w.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (w.get("up") or not only_up):
                rows.append(({"worker": name, "layers": layers.get(name, "")}, v))
        return rows

    up = [({"worker": n, "layers": layers.get(n, "")}, int(bool(w.get("up")))) for n, w in workers.items()]
    out.family("worker_up", "gauge", "1 when the worker answered its last control command", up)
    ready = [({"worker": n, "layers": layers.get(n, "")}, int(w.get("state") == "ready")) for n, w in workers.items()]
    out.family("worker_ready", "gauge", "1 when the worker holds its shard and serves", ready)
    out.family(
        "stage_compute_seconds_total", "counter", "Seconds the stage spent computing forwards", per_worker("compute_s")
    )
    out.family("stage_forwards_total", "counter", "Forward passes the stage ran", per_worker("forwards"))
    out.family("stage_tokens_total", "counter", "Token positions the stage computed", per_worker("tokens_in"))
    out.family("stage_active_requests", "gauge", "Requests holding a KV cache on the stage", per_worker("requests"))
    out.family("stage_cache_bytes", "gauge", "Bytes of KV cache on the stage", per_worker("cache_bytes"))
    out.family("worker_memory_bytes", "gauge", "Memory the worker's arrays hold", per_worker("memory_bytes"))
    progress = []
    for name, w in workers.items():
        p = w.get("progress") or {}
        if p.get("total_bytes"):
            progress.append(({"worker": name, "layers": layers.get(name, "")}, p["done_bytes"] / p["total_bytes"]))
    out.family("worker_load_progress_ratio", "gauge", "Share of the shard's bytes loaded", progress)
    return out.text()
