"""A worker checks free memory before loading and refuses cleanly instead of
swapping; the coordinator's error names the worker."""

from __future__ import annotations

import pytest

from kimizmq.local import LocalCluster, write_config
from kimizmq.plan import available_memory_bytes, make_plan


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
