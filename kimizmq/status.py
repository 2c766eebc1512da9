"""Whether the cluster serves, and what a worker's status row says: decided
here alone for the engine's liveness loop, /health (and so the dashboard),
/metrics and `kimi status`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .plan import GIB

if TYPE_CHECKING:
    from .config import WorkerConfig
    from .metrics import RateMeter


def serving(w: dict) -> bool:
    """A worker that answered its last control command and holds its shard."""
    return bool(w.get("up")) and w.get("state") == "ready"


def not_serving(workers: dict[str, dict]) -> dict[str, dict]:
    """The workers that keep the cluster from serving, by name."""
    return {name: w for name, w in workers.items() if not serving(w)}


def cluster_state(engine_state: str, workers: dict[str, dict]) -> str:
    """The engine's state, but "degraded" where it thinks itself ready and a
    worker is not serving."""
    if engine_state == "ready" and not_serving(workers):
        return "degraded"
    return engine_state


def is_up(w: dict) -> bool:
    """Whether the worker answered: the liveness loop says so, or its state does."""
    return bool(w.get("up", w.get("state") not in ("unknown", "down")))


def with_last_stats(worker_state: dict[str, dict], last: dict[str, dict]) -> dict[str, dict]:
    """Every worker's latest answer, filled in with its last full `stats`
    answer (kept in `last`) while the same process is up: pings and load polls
    say less than stats."""
    out = {}
    for name, w in worker_state.items():
        if "tokens_in" in w:  # a stats answer
            last[name] = dict(w)
        up = is_up(w)
        prev = last.get(name, {})
        same_process = prev.get("pid") == w.get("pid", prev.get("pid"))
        out[name] = {**prev, **w, "up": up} if up and same_process else {**w, "up": up}
    return out


def token_rate(rates: RateMeter, name: str, w: dict) -> float | None:
    """The worker's tokens per second from its stats answers, timed by the
    worker's clock when it answered (None until two answers are far enough apart)."""
    if not (w.get("up") and "tokens_in" in w):
        return None
    return rates.rate(f"worker:{name}:{w.get('pid')}", w["tokens_in"], now=w.get("time", time.time()))


def worker_row(w: dict, cfg: WorkerConfig, layers: list[int] | None = None, rate: float | None = None) -> dict:
    """A worker's row: what /health and `kimi status` show of it. `w` is its
    last answer with "up" set (or what is known when it is down), `layers` its
    planned [start, end) where it does not say its own."""
    return {
        "state": w.get("state", "unknown") if w.get("up") or w.get("state") == "unknown" else "down",
        "up": bool(w.get("up")),
        "address": cfg.control_address,
        "data_address": cfg.data_address,
        "layers": w.get("layers") or layers,
        "progress": w.get("progress"),
        "error": w.get("error"),
        "requests": w.get("requests"),
        "memory_bytes": w.get("memory_bytes"),
        "memory_total_bytes": int(cfg.memory_gb * GIB),
        "weight_bytes": w.get("weight_bytes"),
        "cache_bytes": w.get("cache_bytes"),
        "prefix_entries": w.get("prefix_entries"),  # the prefix cache's entries on this stage
        "prefix_bytes": w.get("prefix_bytes"),
        "prefix_budget_bytes": w.get("prefix_budget_bytes"),
        "prefix_hits": w.get("prefix_hits"),
        "tokens_per_s": rate,
        "last_seen": w.get("last_seen") or w.get("time"),  # while loading: the worker's time of its answer
        "pid": w.get("pid"),
        "busy": w.get("busy"),  # the step its main loop runs now (answered by its control thread)
    }
