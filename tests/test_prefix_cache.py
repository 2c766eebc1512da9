"""The prefix cache across real workers: a turn that repeats an earlier
conversation prefills only what is new, on every stage, and still gives
exactly what single-process mlx-lm gives for the whole prompt."""

from __future__ import annotations

import os
import signal
import threading
import urllib.request

import numpy as np
import pytest
import zmq

from kimizmq import wire
from kimizmq.local import LocalCluster, write_config
from tests.support import greedy_body, log_events, post_json, running_cluster, wait_until, worker_stats
from tests.test_pipeline import reference_greedy

N = 12
FIRST = [5, 17, 99, 230, 41, 7, 300, 12, 64, 8, 150, 77, 3, 201, 45, 11, 90, 33, 120, 6, 250, 19, 88, 140, 31, 72, 14]
USER = [402, 17, 380, 56, 9, 233, 71, 18, 604, 25, 333, 47, 12, 95, 260, 3, 77, 150, 42]


def turn(base: str, prompt: list[int], n: int = N) -> tuple[list[int], list[float], int]:
    """One greedy completion: its token ids, their logprobs and the prompt tokens it took from the cache."""
    status, out = post_json(base, "/v1/completions", greedy_body(prompt, n))
    assert status == 200, out
    lp = out["choices"][0]["logprobs"]
    return lp["token_ids"], lp["token_logprobs"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


def assert_oracle(model, prompt: list[int], tokens: list[int], logprobs: list[float], n: int = N) -> None:
    ref_tokens, ref_logprobs = reference_greedy(model, prompt, n)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logprobs, ref_logprobs, rtol=1e-4, atol=1e-4)


def conversation(base: str, model) -> list[int]:
    """Two turns and a repeat; checks each against mlx-lm; the second turn's prompt."""
    tokens, logprobs, cached = turn(base, FIRST)
    assert cached == 0
    assert_oracle(model, FIRST, tokens, logprobs)
    # The next turn sends the conversation again: everything the stages ran of
    # the first (its prompt and all replies but the last token) comes from the
    # cache, a prompt chunk boundary falling anywhere in between.
    second = FIRST + tokens + USER
    tokens2, logprobs2, cached = turn(base, second)
    assert cached == len(FIRST) + N - 1
    assert_oracle(model, second, tokens2, logprobs2)
    # The same prompt again: all of it but its last token, which must run for its logits.
    again, logprobs3, cached = turn(base, second)
    assert cached == len(second) - 1
    assert again == tokens2
    np.testing.assert_allclose(logprobs3, logprobs2, rtol=1e-4, atol=1e-4)
    # Diverging inside a cached entry: the shared part only.
    other = FIRST[:20] + USER
    tokens4, logprobs4, cached = turn(base, other)
    assert cached == 20
    assert_oracle(model, other, tokens4, logprobs4)
    return second


@pytest.mark.parametrize("n_workers,layers", [(1, None), (3, [(0, 2), (2, 5), (5, 7)])], ids=["1-stage", "3-stages"])
def test_a_cache_hit_gives_mlx_lm_output_on_one_and_three_stages(tiny_model, tmp_path, n_workers, layers):
    with LocalCluster(write_config(tmp_path / "kimi.toml", tiny_model, n_workers, layers=layers)) as cluster:
        conversation(cluster.api, tiny_model)
        stats = worker_stats(cluster.cfg)
    for s in stats.values():
        assert s["prefix_hits"] == 3 and s["prefix_tokens_reused"] > 0
        assert 0 < s["prefix_bytes"] <= s["prefix_budget_bytes"]
        assert s["stage_errors"] == 0


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    yield from running_cluster(tmp_path_factory.mktemp("prefix"), tiny_model, 2)


def test_a_cache_hit_gives_mlx_lm_output_on_two_stages_and_shows_everywhere(cluster, tiny_model):
    conversation(cluster.api, tiny_model)
    stats = worker_stats(cluster.cfg)
    assert all(s["prefix_hits"] >= 3 and s["prefix_entries"] >= 1 for s in stats.values()), stats
    health = cluster.health()[1]
    prefix = health["coordinator"]["prefix_cache"]
    assert prefix["hits"] >= 3 and prefix["tokens_reused"] >= len(FIRST) + N - 1 + 20
    assert prefix["entries"] >= 1 and all(b > 0 for b in prefix["bytes_by_worker"].values())
    with urllib.request.urlopen(cluster.api + "/metrics", timeout=30) as r:
        text = r.read().decode()
    for name in (
        "kimi_prefix_cache_hits_total",
        "kimi_prefix_cache_tokens_reused_total",
        "kimi_prefix_cache_evictions_total",
        "kimi_prefix_cache_bytes",
    ):
        assert name in text, name


def test_concurrent_requests_share_a_cached_prefix_batched_with_misses(cluster, tiny_model):
    """One system prompt cached, then four requests that start with it and two
    that do not, all at once: each is mlx-lm's answer for its own prompt."""
    system = [7, 300, 12, 64, 8, 150, 77, 3, 201, 45, 11, 90, 33, 120, 6, 250, 19, 88, 140, 31, 72, 14, 5, 17]
    turn(cluster.api, system)
    prompts = [system + USER[i : i + 5] for i in range(4)] + [USER[::-1], FIRST[::-1]]
    results: dict[int, tuple] = {}

    def run(i: int) -> None:
        results[i] = turn(cluster.api, prompts[i])

    before = worker_stats(cluster.cfg)["w1"]["batched_forwards"]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == len(prompts)
    for i, prompt in enumerate(prompts):
        tokens, logprobs, cached = results[i]
        assert cached == (len(system) if i < 4 else 0), i
        assert_oracle(tiny_model, prompt, tokens, logprobs)
    assert worker_stats(cluster.cfg)["w1"]["batched_forwards"] > before  # they did meet in batches


def test_a_stage_that_lost_an_entry_makes_the_request_run_without_it(cluster, tiny_model):
    """The last stage forgets every entry behind the coordinator's back (a
    peer's drop): the next hit fails there, is run again from the start on
    every stage, and still gives mlx-lm's output."""
    second = FIRST + turn(cluster.api, FIRST)[0] + USER
    # the turn's release (which keeps its entry) has reached w1 before the peer's drop does
    wait_until(lambda: worker_stats(cluster.cfg)["w1"]["active_requests"] == [], "w1 to release the turn")
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 20_000)  # delivered before term returns, however busy the machine
        push.connect(cluster.cfg.worker("w1").data_address)
        push.send_multipart(wire.encode("drop", {"all": True}))
        push.close()
    finally:
        ctx.term()
    wait_until(lambda: worker_stats(cluster.cfg)["w1"]["prefix_entries"] == 0, "w1 to drop its entries")
    tokens, logprobs, cached = turn(cluster.api, second)
    assert cached == 0  # it ran from the start in the end
    assert_oracle(tiny_model, second, tokens, logprobs)
    assert log_events(cluster, "coordinator", "prefix_missing")


def test_a_request_begun_from_the_cache_survives_a_kill_9_and_the_index_refills(cluster, tiny_model):
    """A turn that started from a cached prefix loses a worker mid-stream: it
    is replayed once the worker is back (whose cache is empty, so the index
    is emptied) and ends exactly as mlx-lm's; the next turn hits again."""
    n = 120
    second = FIRST + turn(cluster.api, FIRST)[0] + USER
    result: dict = {}
    before = worker_stats(cluster.cfg)["w1"]["tokens_sampled"]
    client = threading.Thread(
        target=lambda: result.update(zip(("tokens", "logprobs", "cached"), turn(cluster.api, second, n)))
    )
    client.start()
    try:
        wait_until(lambda: worker_stats(cluster.cfg)["w1"]["tokens_sampled"] > before + 5, "the stream to be under way")
        victim = cluster.workers["w0"]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        cluster.start_worker("w0")
    finally:
        client.join(timeout=180)
    assert_oracle(tiny_model, second, result["tokens"], result["logprobs"], n)
    wait_until(lambda: cluster.health()[1]["coordinator"]["prefix_cache"]["entries"] <= 1, "the index to be emptied")
    third = second + result["tokens"] + USER[:7]
    tokens, logprobs, cached = turn(cluster.api, third)
    assert cached == len(second) + n - 1
    assert_oracle(tiny_model, third, tokens, logprobs)


def test_entries_are_evicted_within_the_budget_and_a_miss_is_still_exact(tiny_model, tmp_path):
    """A budget of a few entries (1 MiB; one here takes about 0.3 MiB on w0), many conversations: every stage stays within
    it, the coordinator evicts least recently used entries, and a conversation
    whose entry was evicted runs from the start, exactly."""
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2, runtime={"prefix_cache_gb": 1 / 1024})
    with LocalCluster(cfg) as cluster:
        first_second = FIRST + turn(cluster.api, FIRST)[0] + USER
        for k in range(12):
            prompt = [(t * (k + 3)) % 900 + 1 for t in FIRST * 4]
            turn(cluster.api, prompt)
            for name, s in worker_stats(cluster.cfg).items():
                assert s["prefix_bytes"] <= s["prefix_budget_bytes"], (name, s)
        prefix = cluster.health()[1]["coordinator"]["prefix_cache"]
        assert prefix["evictions"] > 0
        # room was made before each keep (the drop travels ahead of the release): nothing refused, nothing missing
        assert all(s["prefix_refused"] == 0 for s in worker_stats(cluster.cfg).values())
        assert not log_events(cluster, "coordinator", "prefix_missing")
        tokens, logprobs, cached = turn(cluster.api, first_second)
        assert cached == 0  # evicted long ago
        assert_oracle(tiny_model, first_second, tokens, logprobs)


def test_off_when_the_budget_is_zero(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2, runtime={"prefix_cache_gb": 0})
    with LocalCluster(cfg) as cluster:
        tokens, _, _ = turn(cluster.api, FIRST)
        second = FIRST + tokens + USER
        tokens, logprobs, cached = turn(cluster.api, second)
        assert cached == 0
        assert_oracle(tiny_model, second, tokens, logprobs)
        assert all(s["prefix_entries"] == 0 for s in worker_stats(cluster.cfg).values())
