"""A bounded burst beyond capacity: every request completes or is told to come
back later (429); nothing hangs, and afterwards no stage holds a cache."""

from __future__ import annotations

import threading
import time
from collections import Counter

from kimizmq.local import LocalCluster, write_config
from tests.support import post_json, worker_stats

CLIENTS = 10
DURATION_S = 6.0
REQUEST_TIMEOUT_S = 60.0


def one_request(base: str, i: int) -> tuple[int, dict]:
    body = {"prompt": [1 + i % 50, 2, 3, 4, 5], "max_tokens": 8 + i % 8, "temperature": 0, "ignore_eos": True}
    return post_json(base, "/v1/completions", body, timeout=REQUEST_TIMEOUT_S)


def test_burst_beyond_capacity_completes_or_gets_429(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2, runtime={"max_concurrent": 2, "max_queue": 3})
    results: list[tuple[int, dict]] = []
    lock = threading.Lock()
    with LocalCluster(cfg) as cluster:
        deadline = time.monotonic() + DURATION_S

        def client(k: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                try:
                    r = one_request(cluster.api, k * 1000 + n)
                except Exception as e:  # noqa: BLE001 - every failure is a result to report
                    r = (-1, {"exception": repr(e)})
                n += 1
                with lock:
                    results.append((r[0], {**r[1], "asked": 8 + (k * 1000 + n - 1) % 8}))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DURATION_S + REQUEST_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in threads), "a request hung"

        codes = Counter(code for code, _ in results)
        assert set(codes) <= {200, 429}, codes
        assert codes[200] >= CLIENTS, codes
        assert codes[429] >= 1, f"10 clients against 2 slots + 3 queue places must overflow: {codes}"
        for code, body in results:
            if code == 200:
                choice = body["choices"][0]
                assert choice["finish_reason"] == "length"
                assert body["usage"]["completion_tokens"] == body["asked"]
            else:
                assert body["error"]["code"] == "queue_full"

        status, health = cluster.health()
        assert status == 200 and health["requests_in_flight"] == 0 and health["queue_depth"] == 0


def test_a_stage_frees_a_request_nobody_drives(tiny_model, tmp_path):
    import mlx.core as mx
    import zmq

    from kimizmq import wire

    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 1, runtime={"request_idle_timeout_s": 0.5})
    with LocalCluster(cfg) as cluster:
        w = cluster.cfg.workers[0]
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        try:
            push.connect(w.data_address)
            header = {"req": "orphan", "seq": 0, "offset": 0, "sample": False, "params": {}}
            push.send_multipart(wire.encode("forward", header, [mx.array([[1, 2, 3]], dtype=mx.int32)]))
            deadline = time.monotonic() + 5
            while "orphan" not in worker_stats(cluster.cfg)[w.name]["active_requests"]:
                assert time.monotonic() < deadline, "the request never opened"
                time.sleep(0.05)
            deadline = time.monotonic() + 15
            while "orphan" in worker_stats(cluster.cfg)[w.name]["active_requests"]:
                assert time.monotonic() < deadline, "the idle request was never freed"
                time.sleep(0.1)
        finally:
            push.close()
