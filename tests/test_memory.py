"""A worker checks free memory before loading and refuses cleanly instead of
swapping; the coordinator's error names the worker; freed memory is bounded
and a dropped stage gives its weights back at once."""

from __future__ import annotations

import gc

import mlx.core as mx
import pytest

from kimizmq.local import LocalCluster, write_config
from kimizmq.memory import available_memory_bytes
from kimizmq.plan import make_plan
from kimizmq.shard import load_shard
from tests.support import complete_ids, log_events, worker_stats


def test_worker_refuses_a_shard_whose_reserve_exceeds_free_memory(tiny_model, tmp_path):
    # The plan trusts memory_gb (a huge machine on paper); the KV reserve for
    # 131072 tokens x 512 requests does not fit this machine's real free memory.
    cfg_path = write_config(
        tmp_path / "kimi.toml",
        tiny_model,
        2,
        memory_gb=100_000,
        runtime={"max_context": 131072, "max_concurrent": 512},
    )
    cluster = LocalCluster(cfg_path, ready_timeout=60)
    plan = make_plan(cluster.cfg)
    assert all(s.reserved_bytes > available_memory_bytes() for s in plan.stages)
    with pytest.raises(RuntimeError, match=r"worker w\d failed to load: not enough free memory"):
        cluster.start()
    assert all(p.poll() is not None for p in cluster.workers.values())  # start() cleaned up


@pytest.mark.parametrize("limit_gb", [None, 0])
def test_cache_limit_bounds_the_memory_a_worker_keeps_freed(tiny_model, tmp_path, limit_gb):
    """runtime.cache_limit_gb (for workers that share a GPU) reaches MLX: with
    0 a worker keeps no freed buffers after requests; by default it keeps some."""
    runtime = {} if limit_gb is None else {"cache_limit_gb": limit_gb}
    cfg_path = write_config(tmp_path / "kimi.toml", tiny_model, 2, runtime=runtime)
    with LocalCluster(cfg_path) as cluster:
        complete_ids(cluster.api, list(range(1, 40)), 16)
        stats = worker_stats(cluster.cfg)
        started = [log_events(cluster, f"worker-{n}", "worker_started")[-1] for n in stats]
    if limit_gb is None:
        assert all(e["cache_limit_bytes"] is None for e in started)
        assert all(s["cache_memory_bytes"] > 0 for s in stats.values()), stats
    else:
        assert all(e["cache_limit_bytes"] == 0 for e in started)
        assert all(s["cache_memory_bytes"] == 0 for s in stats.values()), stats


def test_a_dropped_shard_frees_its_weights_at_once_after_compiled_decode(tiny_model):
    """Compiled decode keeps its traces on the Shard; they hold the modules, not
    the Shard, so an unload (dropping the stage) frees the weights at once rather
    than at some later garbage collection, when a new shard may be loading."""
    base = mx.get_active_memory()
    gc.disable()
    try:
        shard = load_shard(tiny_model, 0, 7)
        cache = shard.make_cache()
        shard(mx.array([[1, 2, 3]], dtype=mx.int32), cache)
        for _ in range(3):
            mx.eval(shard.decode(mx.array([[5]], dtype=mx.int32), cache))
        loaded = mx.get_active_memory()
        assert loaded - base > shard.nbytes // 2
        del shard, cache
        assert mx.get_active_memory() - base < 64 * 1024
    finally:
        gc.enable()
