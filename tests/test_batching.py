"""Requests in flight together: decode steps that meet at a stage run as one
batched forward pass, and give exactly the tokens each request gets alone."""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import numpy as np

from kimizmq import batching
from kimizmq.config import load_config
from kimizmq.local import LocalCluster, write_config
from kimizmq.shard import load_shard
from kimizmq.stage import Stage, Step
from tests.support import complete_ids, worker_stats

N_TOKENS = 40
PROMPTS = [[7 + i, 100 + 3 * i, 5, 64 + i, 9] + [200 + i] * (i % 4) for i in range(6)]


def alone_then_together(cluster: LocalCluster, prompts: list[list[int]], n: int) -> tuple[list, list, dict, dict]:
    """Each prompt's logprobs run alone, then all at once (one thread each),
    and the workers' stats before and after the concurrent run."""
    alone = [complete_ids(cluster.api, p, n)["logprobs"] for p in prompts]
    before = worker_stats(cluster.cfg)
    together: dict[int, dict] = {}

    def run(i: int) -> None:
        together[i] = complete_ids(cluster.api, prompts[i], n)["logprobs"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return alone, [together.get(i) for i in range(len(prompts))], before, worker_stats(cluster.cfg)


def test_concurrent_requests_are_batched_and_token_identical(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2, runtime={"max_concurrent": 8})
    with LocalCluster(cfg) as cluster:
        alone, together, before, after = alone_then_together(cluster, PROMPTS, N_TOKENS)

    ids = [lp["token_ids"] for lp in alone]
    assert [lp and lp["token_ids"] for lp in together] == ids
    assert len({tuple(a) for a in ids}) == len(PROMPTS), "different prompts must give different outputs"
    batched = {n: s["batched_forwards"] - before[n]["batched_forwards"] for n, s in after.items()}
    assert any(b > 0 for b in batched.values()), f"no decode step was batched: {batched}"
    kept = {n: s["kept_batch_steps"] - before[n]["kept_batch_steps"] for n, s in after.items()}
    assert any(k > 0 for k in kept.values()), f"no batch of decode steps was kept for the next step: {kept}"
    assert all(s["active_requests"] == [] for s in after.values())
    # the first stage sent waves on in one batch per stage, so both stages computed at once
    assert after["w0"]["split_waves"] > before["w0"]["split_waves"]
    assert after["w1"]["split_waves"] == 0


def test_prompts_that_arrive_together_are_prefilled_as_one_batch(tiny_model, tmp_path):
    """Equal-length prompts sent at once: their chunks (8, 8, 4 tokens) meet at
    each stage and run as batched passes, and every request gets exactly its
    tokens and logprobs from alone."""
    prompts = [[(37 * i + 11 * j) % 900 + 5 for j in range(20)] for i in range(6)]
    # No prefix cache: the same prompts run together would start from it, one token left each.
    runtime = {"max_concurrent": 8, "prefill_chunk": 8, "prefix_cache_gb": 0}
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2, runtime=runtime)
    with LocalCluster(cfg) as cluster:
        alone, together, before, after = alone_then_together(cluster, prompts, 12)

    for i, ref in enumerate(alone):
        assert together[i] is not None and together[i]["token_ids"] == ref["token_ids"], i
        np.testing.assert_allclose(together[i]["token_logprobs"], ref["token_logprobs"], rtol=1e-4, atol=1e-5)
    batched = {n: s["batched_prompt_steps"] - before[n]["batched_prompt_steps"] for n, s in after.items()}
    assert all(b > 0 for b in batched.values()), f"no prompt chunk was batched: {batched}"


def test_kept_batches_give_each_request_its_tokens_however_the_groups_change(tiny_model):
    """In one process, through Stage: decode steps of three requests run
    together (their batch kept from step to step), then one alone, two
    together, one released mid-batch, the rest alone; every request samples
    exactly what it samples on a stage of its own, and the stage ends holding
    no cache."""
    shard = load_shard(tiny_model, 0, 7)
    prompts = {"a": [3, 14, 15, 92, 65], "b": [35, 89, 79, 32, 38, 46, 26], "c": [2, 7]}

    def alone(req: str, n: int) -> list[tuple[int, float]]:
        stage = Stage(shard, max_requests=4, max_context=256, compiled_decode=True)
        r = stage.forward_many([Step(req, 0, mx.array([prompts[req]], dtype=mx.int32), True, {})])[0]
        out, offset = [(r.token, r.logprob)], len(prompts[req])
        for _ in range(n - 1):
            r = stage.forward_many([Step(req, offset, mx.array([[r.token]], dtype=mx.int32), True, {})])[0]
            out.append((r.token, r.logprob))
            offset += 1
        return out

    stage = Stage(shard, max_requests=4, max_context=256, compiled_decode=True)
    got: dict[str, list[tuple[int, float]]] = {req: [] for req in prompts}
    offsets = {}
    for req, p in prompts.items():
        r = stage.forward_many([Step(req, 0, mx.array([p], dtype=mx.int32), True, {})])[0]
        got[req].append((r.token, r.logprob))
        offsets[req] = len(p)

    def step(*reqs: str) -> None:
        steps = [Step(q, offsets[q], mx.array([[got[q][-1][0]]], dtype=mx.int32), True, {}) for q in reqs]
        for q, r in zip(reqs, stage.forward_many(steps)):
            got[q].append((r.token, r.logprob))
            offsets[q] += 1

    for _ in range(4):
        step("a", "b", "c")
    step("c", "a", "b")  # the same batch, in another order
    step("a")  # a alone: the batch gives every request its cache back
    step("b", "c")
    step("c", "b")
    step("a", "b")
    stage.release("a")  # released while its batch is kept
    step("b")
    step("c")
    step("b", "c")
    assert stage.kept_batch_steps >= 5
    # decode passes, lone and batched, split their time into building and the rest
    assert 0 < stage.decode_build_s <= stage.decode_s <= stage.compute_s
    for req in prompts:
        want = alone(req, len(got[req]))
        assert [t for t, _ in got[req]] == [t for t, _ in want], req
        np.testing.assert_allclose([lp for _, lp in got[req]], [lp for _, lp in want], rtol=1e-4, atol=1e-5)
    for req in ("b", "c"):
        stage.release(req)
    assert stage.requests == {} and stage.kept == {} and stage.cache_bytes() == 0


def test_a_stage_waits_for_the_rest_of_a_kept_batch_and_no_longer(tiny_model, tmp_path, monkeypatch):
    """A worker's data round that caught only some of a kept batch's decode
    steps waits for the others (the previous stage sends them one message
    each); it stops waiting once they are all there, or a release stands in
    for one, or PARTNER_WAIT_S has passed."""
    import zmq

    from kimizmq import wire
    from kimizmq import worker as worker_module

    cfg = load_config(write_config(tmp_path / "kimi.toml", tiny_model, 1))
    w = worker_module.Worker(cfg, cfg.workers[0])
    push = w.ctx.socket(zmq.PUSH)
    try:
        w.cmd_load({"start": 0, "end": 7, "next": cfg.coordinator.result_address})
        while w.loader is not None:
            w._load_step()
        assert w.state == "ready", w.error
        prompts = {"a": [3, 14, 15], "b": [35, 89, 79, 32]}
        for req, p in prompts.items():
            w.stage.forward_many([Step(req, 0, mx.array([p], dtype=mx.int32), True, {})])
        w.stage.forward_many([Step(q, len(p), mx.array([[5]], dtype=mx.int32), True, {}) for q, p in prompts.items()])
        assert list(w.stage.kept) == [frozenset(prompts)]
        push.connect(w.me.data_address)

        def step(req: str) -> list:
            header = {"req": req, "seq": 2, "offset": len(prompts[req]) + 1, "sample": True, "params": {}}
            return wire.encode("forward", header, [mx.array([[7]], dtype=mx.int32)])

        def drain() -> tuple[list, float]:
            assert w.data.poll(5000)
            t0 = time.monotonic()
            got = batching.drain(w.data, w.stage, [], w.counters)
            return got, time.monotonic() - t0

        push.send_multipart(step("a"))
        push.send_multipart(step("b"))
        got, _ = drain()  # both there: no wait
        assert sorted(m.header["req"] for m in got) == ["a", "b"] and w.counters["partner_waits"] == 0

        push.send_multipart(step("a"))
        push.send_multipart(wire.encode("release", {"req": "b"}))  # b will send nothing more
        assert [m.header["req"] for m in drain()[0]] == ["a", "b"] and w.counters["partner_waits"] == 0

        push.send_multipart(step("a"))  # b's step never comes; a message of the wrong kind does
        push.send_multipart(wire.encode("command", {"cmd": "ping", "id": "x"}))
        got, took = drain()
        reqs = [m.header.get("req") for m in got]
        assert reqs == ["a", None] and took >= batching.PARTNER_WAIT_S
        w.handle_data(got[1])  # counted and dropped, as handle_data does with any stray kind
        assert w.counters["bad_messages"] == 1
        assert w.counters["partner_waits"] == 1 and w.counters["partner_waits_expired"] == 1

        monkeypatch.setattr(batching, "PARTNER_WAIT_S", 30.0)
        push.send_multipart(step("a"))
        late = threading.Timer(0.05, lambda: push.send_multipart(step("b")))
        late.start()
        try:
            got, took = drain()  # b comes while a waits for it
        finally:
            late.join()
        assert [m.header["req"] for m in got] == ["a", "b"] and took < 30.0
        assert w.counters["partner_waits"] == 2 and w.counters["partner_waits_expired"] == 1
    finally:
        push.close(linger=0)
        w.close()
