"""Requests in flight together: decode steps that meet at a stage run as one
batched forward pass, and give exactly the tokens each request gets alone."""

from __future__ import annotations

import json
import threading
import urllib.request

import zmq

from kimizmq import wire
from kimizmq.local import LocalCluster, write_config

N_TOKENS = 40
PROMPTS = [[7 + i, 100 + 3 * i, 5, 64 + i, 9] + [200 + i] * (i % 4) for i in range(6)]


def greedy(base: str, prompt: list[int]) -> list[int]:
    body = {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "logprobs": 1, "ignore_eos": True}
    req = urllib.request.Request(
        base + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["logprobs"]["token_ids"]


def worker_stats(address: str) -> dict:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        s.connect(address)
        s.send_multipart(wire.encode("command", {"cmd": "stats", "id": "t"}))
        return wire.decode(s.recv_multipart()).header["result"]
    finally:
        s.close()


def test_concurrent_requests_are_batched_and_token_identical(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2, runtime={"max_concurrent": 8})
    with LocalCluster(cfg) as cluster:
        alone = [greedy(cluster.api, p) for p in PROMPTS]
        before = {w.name: worker_stats(w.control_address)["batched_forwards"] for w in cluster.cfg.workers}
        together: dict[int, list[int]] = {}

        def run(i: int) -> None:
            together[i] = greedy(cluster.api, PROMPTS[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        after = {w.name: worker_stats(w.control_address) for w in cluster.cfg.workers}

    assert [together[i] for i in range(len(PROMPTS))] == alone
    assert len({tuple(a) for a in alone}) == len(PROMPTS), "different prompts must give different outputs"
    batched = {n: s["batched_forwards"] - before[n] for n, s in after.items()}
    assert any(b > 0 for b in batched.values()), f"no decode step was batched: {batched}"
    assert all(s["active_requests"] == [] for s in after.values())
