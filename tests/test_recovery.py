"""Failures between the Macs: a killed or hung worker, a restarted coordinator.
Real processes, real signals; every wait polls a condition with a deadline."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator

import pytest

from kimizmq.local import LocalCluster, write_config
from kimizmq.tokenring import TOKEN_HWM
from tests.support import log_events, open_stream, running_cluster, wait_until, worker_stats

PROMPT = [11, 22, 33, 44, 55, 66, 77, 88, 99, 111, 222, 333]
N_TOKENS = 160
FAST_LIVENESS = {"heartbeat_interval_s": 0.2, "liveness_timeout_s": 1.0, "prefill_chunk": 4}


def sse(base: str, body: dict) -> Iterator[dict]:
    with open_stream(base, body) as r:
        for raw in r:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                return
            if line.startswith("data: "):
                yield json.loads(line[6:])


def stream_ids(base: str, n: int = N_TOKENS, on_chunk=None) -> tuple[list[int], dict | None]:
    """Greedy token ids of a streamed completion, and the error event if any."""
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "logprobs": 1, "ignore_eos": True}
    ids = []
    for i, chunk in enumerate(sse(base, body)):
        if "error" in chunk:
            return ids, chunk["error"]
        for c in chunk["choices"]:
            if c.get("logprobs"):
                ids += c["logprobs"]["token_ids"]
        if on_chunk is not None:
            on_chunk(i)
    return ids, None


def health_status(cluster: LocalCluster) -> str:
    try:
        return cluster.health()[1].get("status", "?")
    except OSError:
        return "unreachable"


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    yield from running_cluster(tmp_path_factory.mktemp("recovery"), tiny_model, 2, runtime=FAST_LIVENESS)


@pytest.fixture(scope="module")
def undisturbed(cluster):
    ids, err = stream_ids(cluster.api)
    assert err is None and len(ids) == N_TOKENS
    return ids


def test_kill_9_worker_mid_stream_then_restart_completes_identically(cluster, undisturbed):
    victim = cluster.workers["w1"]
    replays = len(log_events(cluster, "coordinator", "request_replayed"))

    def on_chunk(i):
        if i == 20:
            victim.send_signal(signal.SIGSTOP)  # freeze it mid-generation, then kill it
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            wait_until(lambda: health_status(cluster) == "degraded", "the coordinator to notice", timeout=6)
            cluster.start_worker("w1")

    ids, err = stream_ids(cluster.api, on_chunk=on_chunk)
    assert err is None
    assert ids == undisturbed
    assert len(log_events(cluster, "coordinator", "request_replayed")) == replays + 1
    assert len(log_events(cluster, "worker-w1", "load_started")) == 2  # the first load, and the new process reloading
    wait_until(lambda: health_status(cluster) == "ready", "ready again", timeout=30)


def test_sigstop_sigcont_worker_mid_stream_completes_identically(cluster, undisturbed):
    victim = cluster.workers["w0"]
    noticed = {}

    def on_chunk(i):
        if i == 10:
            t0 = time.monotonic()
            victim.send_signal(signal.SIGSTOP)
            wait_until(
                lambda: health_status(cluster) == "degraded", "the coordinator to notice a hung worker", timeout=6
            )
            noticed["s"] = time.monotonic() - t0
            victim.send_signal(signal.SIGCONT)

    replays = len(log_events(cluster, "coordinator", "request_replayed"))
    ids, err = stream_ids(cluster.api, on_chunk=on_chunk)
    assert err is None
    assert ids == undisturbed
    assert noticed["s"] <= 5.5
    assert len(log_events(cluster, "coordinator", "request_replayed")) == replays + 1


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 6},
    },
    "required": ["name", "tags"],
    "additionalProperties": False,
}


def constrained_stream(base: str, on_chunk=None) -> tuple[str, str | None]:
    """A streamed chat answer constrained to PERSON (seeded, sampled), and its finish reason."""
    body = {
        "messages": [{"role": "user", "content": "Invent a person."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        "presence_penalty": 0.5,
        "max_tokens": 400,
        "temperature": 1.0,
        "seed": 9,
    }
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    text, finish, chunks = "", None, 0
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
            if on_chunk is not None and choice["delta"].get("content"):
                on_chunk(chunks)
                chunks += 1
    return text, finish


def test_a_constrained_request_replayed_after_a_kill_9_resumes_its_grammar_and_penalties(cluster):
    undisturbed, finish = constrained_stream(cluster.api)
    assert finish == "stop" and set(json.loads(undisturbed)) == {"name", "tags"}
    victim = cluster.workers["w1"]  # the last stage: the grammar's and the penalties' state
    replays = len(log_events(cluster, "coordinator", "request_replayed"))

    def on_chunk(i):
        if i == 3:
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            wait_until(lambda: health_status(cluster) == "degraded", "the coordinator to notice", timeout=6)
            cluster.start_worker("w1")

    text, finish = constrained_stream(cluster.api, on_chunk=on_chunk)
    assert len(log_events(cluster, "coordinator", "request_replayed")) == replays + 1
    assert finish == "stop" and text == undisturbed  # same seed, same state after the replay: the same answer
    wait_until(lambda: health_status(cluster) == "ready", "ready again", timeout=30)


def _loads(cluster: LocalCluster) -> dict[str, int]:
    return {name: len(log_events(cluster, f"worker-{name}", "load_started")) for name in cluster.workers}


def test_restarted_coordinator_adopts_loaded_workers(cluster, undisturbed):
    before = _loads(cluster)
    # idle restart
    cluster._stop(cluster.coordinator)
    cluster.start_coordinator()
    cluster.wait_ready(60)
    assert _loads(cluster) == before, "workers must keep their shards"

    # restart during a request: the client's stream breaks, the cluster does not
    def on_chunk(i):
        if i == 5:
            cluster._stop(cluster.coordinator)

    got: list[int] = []
    with contextlib.suppress(OSError, http.client.HTTPException):
        got, _ = stream_ids(cluster.api, on_chunk=on_chunk)
    assert len(got) < N_TOKENS
    cluster.start_coordinator()
    cluster.wait_ready(60)
    assert _loads(cluster) == before
    ids, err = stream_ids(cluster.api)
    assert err is None and ids == undisturbed


def test_a_ring_whose_coordinator_died_stops_and_its_stages_stay_responsive(tiny_model, tmp_path):
    """Decode runs around the ring without the coordinator. With the coordinator
    killed mid-request, the last stage stops the ring once TOKEN_HWM tokens wait
    unread, instead of blocking on each send, and every stage answers its control
    socket throughout; a new coordinator frees what the other stages still hold."""
    long = 3000
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2, runtime={"max_context": 4096})
    with LocalCluster(cfg) as cluster:

        def on_chunk(i):
            if i == 5:
                os.kill(cluster.coordinator.pid, signal.SIGKILL)

        with contextlib.suppress(OSError, http.client.HTTPException):
            stream_ids(cluster.api, n=long, on_chunk=on_chunk)
        stopped = wait_until(
            lambda: (s := worker_stats(cluster.cfg, timeout=2.0))["w1"]["coordinator_not_reading"] and s,
            "the last stage to stop the ring",
            timeout=120,
        )
        assert TOKEN_HWM <= stopped["w1"]["tokens_sampled"] < long
        assert not stopped["w1"]["active_requests"]
        assert len(log_events(cluster, "worker-w1", "coordinator_not_reading")) == 1

        cluster.start_coordinator()
        cluster.wait_ready(60)
        wait_until(
            lambda: all(not s["active_requests"] for s in worker_stats(cluster.cfg).values()),
            "the new coordinator to free the orphaned caches",
        )


def test_worker_that_never_comes_back_ends_the_request_with_an_error(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2, runtime={**FAST_LIVENESS, "recovery_timeout_s": 2.0})
    with LocalCluster(cfg) as c:

        def on_chunk(i):
            if i == 3:
                c.workers["w1"].kill()

        t0 = time.monotonic()
        ids, err = stream_ids(c.api, on_chunk=on_chunk)
        assert err is not None and "w1" in err["message"]
        assert time.monotonic() - t0 < 30
