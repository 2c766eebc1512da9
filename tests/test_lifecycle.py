"""A request's life under real timing: a busy worker is not a dead one, a
released id stays released on every stage, slots never leak, a full stage is
never a client-visible error, and a request that stops moving is acted on.
Real processes on loopback; every wait polls a condition with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import signal
import threading
import time
import urllib.error

import mlx.core as mx
import pytest
import zmq

from kimizmq import wire
from kimizmq.checkpoint import CheckpointError
from kimizmq.config import load_config
from kimizmq.local import LocalCluster, write_config
from kimizmq.sizes import layer_sizes
from kimizmq.worker import Worker
from tests.support import complete_ids, log_events, open_stream, post_json, wait_until, worker_stats

FAST_LIVENESS = {"heartbeat_interval_s": 0.2, "liveness_timeout_s": 1.0}
N_TOKENS = 24


def stream(base: str, prompt: list[int], n: int, *, stop_after: int | None = None) -> tuple[list[int], dict | None]:
    """A greedy streamed completion's token ids and its error event, if any;
    `stop_after`: close the connection after that many chunks."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 1, "ignore_eos": True}
    ids: list[int] = []
    try:
        r = open_stream(base, body)
    except urllib.error.HTTPError as e:  # an error before the first token
        return ids, {**json.loads(e.read())["error"], "status": e.code, "retry_after": e.headers.get("Retry-After")}
    with r:
        for i, raw in enumerate(r):
            line = raw.decode().strip()
            if line == "data: [DONE]":
                break
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return ids, chunk["error"]
            for c in chunk["choices"]:
                if c.get("logprobs"):
                    ids += c["logprobs"]["token_ids"]
            if stop_after is not None and i >= stop_after:
                break
    return ids, None


def all_free(cluster: LocalCluster) -> bool:
    return all(not s["active_requests"] for s in worker_stats(cluster.cfg).values())


def in_threads(fn, args: list) -> list:
    """fn(*a) for every a in args, one thread each; their results in order."""
    out: list = [None] * len(args)

    def run(i: int) -> None:
        try:
            out[i] = fn(*args[i])
        except Exception as e:  # noqa: BLE001 - reported to the test as the result
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def test_a_step_longer_than_the_liveness_window_is_reported_not_replayed(tiny_model, tmp_path):
    """One prompt chunk of 700 tokens takes far longer than liveness_timeout_s
    plus a heartbeat on this CPU: the worker's control thread keeps answering,
    the coordinator logs it busy, nobody is called down, nothing is replayed."""
    runtime = {**FAST_LIVENESS, "prefill_chunk": 1024, "max_context": 2048, "max_concurrent": 2}
    prompt = [(7 * i) % 1200 + 3 for i in range(700)]
    with LocalCluster(write_config(tmp_path / "kimi.toml", tiny_model, 2, runtime=runtime)) as cluster:
        got = complete_ids(cluster.api, prompt, 4)
        assert len(got["logprobs"]["token_ids"]) == 4
        long_steps = [e for w in ("w0", "w1") for e in log_events(cluster, f"worker-{w}", "long_step")]
        window = FAST_LIVENESS["liveness_timeout_s"] + FAST_LIVENESS["heartbeat_interval_s"]
        assert long_steps and max(e["seconds"] for e in long_steps) > window, (
            f"this machine ran the 700-token chunk within {window} s: the test proves nothing here ({long_steps})"
        )
        assert log_events(cluster, "coordinator", "worker_busy")
        assert not log_events(cluster, "coordinator", "workers_down")
        assert not log_events(cluster, "coordinator", "request_replayed")
        wait_until(lambda: all_free(cluster), "every stage to free the request")


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    """Two stages, four slots: a budget small enough to fill."""
    runtime = {**FAST_LIVENESS, "prefill_chunk": 4, "max_concurrent": 4, "request_stall_timeout_s": 5.0}
    folder = tmp_path_factory.mktemp("lifecycle")
    with LocalCluster(write_config(folder / "kimi.toml", tiny_model, 2, runtime=runtime)) as c:
        yield c


PROMPTS = [[5 + i, 90 + 7 * i, 13, 250 + i, 31, 77] + [400 + i] * (6 + i % 5) for i in range(8)]


@pytest.fixture(scope="module")
def undisturbed(cluster) -> list[list[int]]:
    return [complete_ids(cluster.api, p, N_TOKENS)["logprobs"]["token_ids"] for p in PROMPTS]


def test_client_disconnects_under_concurrency_leak_no_slots(cluster, undisturbed):
    """24 streams on 4 slots, most of them dropped by their client at a random
    point: no stream sees an error, every one that finishes is token-identical,
    every stage ends with nothing held, and the next request runs at once."""
    rng = random.Random(7)
    stalls = len(log_events(cluster, "coordinator", "request_stalled"))
    jobs = [(i % len(PROMPTS), rng.choice([None, 0, 1, 2, 4, 8])) for i in range(24)]
    results = in_threads(lambda p, cut: stream(cluster.api, PROMPTS[p], N_TOKENS, stop_after=cut), jobs)
    for (p, cut), result in zip(jobs, results):
        assert not isinstance(result, Exception), result
        ids, err = result
        assert err is None, err
        if cut is None:
            assert ids == undisturbed[p]
    wait_until(lambda: all_free(cluster), "every stage to free every slot")
    assert len(log_events(cluster, "coordinator", "request_stalled")) == stalls, "time in the queue is no stall"
    assert complete_ids(cluster.api, PROMPTS[0], N_TOKENS)["logprobs"]["token_ids"] == undisturbed[0]


def test_sigstop_of_a_stage_during_prefill_then_continue_strands_nothing(cluster, undisturbed):
    """A stage frozen while four prompts prefill (chunks of 4 tokens), long
    enough to be called down, then resumed: every request is replayed and
    completes token-identically; no stage is left full."""
    victim = cluster.workers["w1"]
    replays = len(log_events(cluster, "coordinator", "request_replayed"))

    def freeze() -> None:
        wait_until(lambda: worker_stats(cluster.cfg)["w1"]["active_requests"], "a prompt to reach w1", interval=0.01)
        victim.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: cluster.health()[1]["status"] == "degraded", "the coordinator to notice", timeout=10)
        finally:
            victim.send_signal(signal.SIGCONT)

    freezer = threading.Thread(target=freeze)
    freezer.start()
    results = in_threads(lambda p: stream(cluster.api, PROMPTS[p], N_TOKENS), [(p,) for p in range(4)])
    freezer.join()
    assert [r for r in results] == [(undisturbed[p], None) for p in range(4)]
    assert len(log_events(cluster, "coordinator", "request_replayed")) > replays
    wait_until(lambda: all_free(cluster), "every stage to free every slot")


def forge_release(cluster: LocalCluster, worker: str, wire_id: str) -> None:
    """A release on a worker's data socket from a peer that is not the
    coordinator (possible without CURVE)."""
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    try:
        push.connect(cluster.cfg.worker(worker).data_address)
        push.send_multipart(wire.encode("release", {"req": wire_id}))
    finally:
        push.close()


def live_id(cluster: LocalCluster, worker: str, base: str | None = None) -> str:
    """The wire id of a request `worker` holds (one whose id starts with `base`)."""
    return wait_until(
        lambda: next(
            (r for r in worker_stats(cluster.cfg)[worker]["active_requests"] if base is None or r.startswith(base)),
            None,
        ),
        "a request in flight",
        interval=0.01,
    )


def test_a_request_stranded_by_a_forged_release_is_replayed_then_fails_clearly(cluster, undisturbed):
    """A release nobody sent ends a request on the stages behind the
    coordinator's back: no stage moves it on, so after request_stall_timeout_s
    it is replayed (token-identically); stranded twice, it ends with an error
    naming the setting, and no slot stays held."""
    long = 200
    reference = complete_ids(cluster.api, PROMPTS[1], long)["logprobs"]["token_ids"]
    forger = threading.Thread(target=lambda: forge_release(cluster, "w0", live_id(cluster, "w1")))
    forger.start()
    ids, err = stream(cluster.api, PROMPTS[1], long)
    forger.join()
    assert err is None and ids == reference
    assert [e["action"] for e in log_events(cluster, "coordinator", "request_stalled")] == ["replay"]

    def forge_twice() -> None:
        first = live_id(cluster, "w1")
        forge_release(cluster, "w0", first)
        forge_release(cluster, "w0", live_id(cluster, "w1", base=first.split("~")[0] + "~"))

    forger = threading.Thread(target=forge_twice)
    forger.start()
    ids, err = stream(cluster.api, PROMPTS[1], long)
    forger.join()
    assert err is not None and "request_stall_timeout_s" in err["message"]
    assert err.get("status", 503) == 503 and err.get("retry_after", "2") == "2"  # before any token: HTTP 503
    assert len(ids) < long and ids == reference[: len(ids)]
    wait_until(lambda: all_free(cluster), "every stage to free every slot")


def test_a_stage_holding_an_id_nobody_owns_is_reconciled(cluster):
    """A first chunk from a stranger opens a request on a stage; within a
    heartbeat or two the coordinator sees an id it does not own and releases it."""
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    header = {"req": "stranger-1", "seq": 0, "offset": 0, "sample": True, "params": {}}
    try:
        push.connect(cluster.cfg.worker("w0").data_address)
        push.send_multipart(wire.encode("forward", header, [mx.array([[5, 6, 7]], dtype=mx.int32)]))
    finally:
        push.close()
    wait_until(
        lambda: any(
            e["wire_ids"] == ["stranger-1"] for e in log_events(cluster, "coordinator", "stale_requests_released")
        ),
        "the coordinator to release the stranger's id",
    )
    wait_until(lambda: all_free(cluster), "every stage to free the stranger's slot")


def test_a_full_stage_lets_a_newcomer_wait_its_turn(tiny_model, tmp_path):
    """One slot: a second request's first chunk waits (it is not refused), its
    later chunk behind it, until a release frees the slot; a message for the
    released id that arrives after the release is dropped, at any offset."""
    cfg = load_config(write_config(tmp_path / "kimi.toml", tiny_model, 1))
    w = Worker(cfg, cfg.workers[0])
    results = w.ctx.socket(zmq.PULL)
    try:
        results.bind(cfg.coordinator.result_address)
        w.cmd_load({"start": 0, "end": 7, "next": cfg.coordinator.result_address, "max_requests": 1})
        while w.loader is not None:
            w._load_step()
        assert w.state == "ready", w.error

        def forward(req: str, offset: int, ids: list[int], sample: bool) -> wire.Message:
            header = {"req": req, "seq": 0, "offset": offset, "sample": sample, "params": {}}
            return wire.Message("forward", header, [mx.array([ids], dtype=mx.int32)])

        w.handle_data(forward("a", 0, [3, 4, 5], True))
        w.handle_data(forward("b", 0, [6, 7], False), forward("b", 2, [8], True))
        assert list(w.stage.requests) == ["a"] and [m.header["offset"] for m in w.deferred] == [0, 2]
        assert w.counters["admissions_deferred"] == 1 and w.counters["stage_errors"] == 0
        batch, w.deferred = w.deferred, []  # as the worker's loop takes them
        w.handle_data(*batch, wire.Message("release", {"req": "a"}, []))  # the release first, then b in
        assert list(w.stage.requests) == ["b"] and w.stage.requests["b"].offset == 3 and not w.deferred
        w.handle_data(forward("a", 0, [3, 4, 5], True), forward("a", 3, [9], True))
        assert list(w.stage.requests) == ["b"] and w.counters["dropped_after_release"] == 2
        tokens = [wire.decode(results.recv_multipart()) for _ in range(2) if results.poll(5000)]
        assert [m.header["req"] for m in tokens] == ["a", "b"]
    finally:
        results.close(linger=0)
        w.close()


def test_a_checkpoint_with_more_layers_than_its_config_says_is_refused(tiny_model, tmp_path):
    """num_hidden_layers = 5 over weights for 7 layers would serve a different
    model without a word: the planner (and every worker's loader) refuse it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers = 5 .* layer\(s\) 5-6"):
        layer_sizes(model)
    cfg = load_config(write_config(tmp_path / "kimi.toml", model, 1))
    w = Worker(cfg, cfg.workers[0])
    try:
        w.cmd_load({"start": 0, "end": 5, "next": cfg.coordinator.result_address})
        while w.loader is not None:
            w._load_step()
        assert w.state == "error" and "num_hidden_layers = 5" in w.error
    finally:
        w.close()


def test_bad_health_release_lists_are_refused(cluster):
    from kimizmq.control import ControlError, call_once

    address = cluster.cfg.worker("w0").control_address
    for bad in ("x", [1, 2], ["r" * 1000]):
        with pytest.raises(ControlError, match="health: release"):
            call_once(address, "health", {"release": bad}, timeout_s=5.0)
    assert call_once(address, "health", {"release": []}, timeout_s=5.0)["state"] == "ready"
    assert post_json(cluster.api, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2})[0] == 200


def test_slow_clients_are_cut_off_and_never_starve_the_api(cluster):
    """Fifty connections that send half a request head and stall (slowloris):
    /health and completions answer meanwhile, and the API closes every one of
    them once HEADER_TIMEOUT_S has passed. The coordinator raised its own
    open-file limit as far as it may."""
    import resource
    import socket

    from kimizmq.api import HEADER_TIMEOUT_S
    from kimizmq.coordinator import FD_SOFT_LIMIT

    port = cluster.cfg.coordinator.api_port
    slow = []
    try:
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: kimi\r\nContent-Type: application/json\r\n")
            slow.append(s)
        opened = time.monotonic()
        assert cluster.health()[0] == 200
        assert complete_ids(cluster.api, PROMPTS[0], 4)["logprobs"]["token_ids"]

        def closed(s: socket.socket) -> bool:
            s.settimeout(0.01)
            try:
                return s.recv(1024) == b""
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True

        wait_until(lambda: all(closed(s) for s in slow), "the API to cut the slow clients off", HEADER_TIMEOUT_S + 15)
        assert time.monotonic() - opened >= HEADER_TIMEOUT_S - 1
    finally:
        for s in slow:
            s.close()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    started = log_events(cluster, "coordinator", "coordinator_started")[-1]
    assert started["fd_limit"] == (FD_SOFT_LIMIT if hard == resource.RLIM_INFINITY else min(FD_SOFT_LIMIT, hard))


def test_connections_beyond_the_limit_get_503_with_retry_after_and_are_closed():
    """The API's site serves at most its limit of connections at once: the
    ones beyond it are answered 503 with Retry-After and closed at once, while
    those within it stay open (a real aiohttp server, real sockets)."""
    import socket

    from aiohttp import web

    from kimizmq.bodies import RETRY_AFTER_S
    from kimizmq.httpsite import BoundedSite
    from kimizmq.local import free_ports

    async def run() -> list[bytes]:
        runner = web.AppRunner(web.Application())
        await runner.setup()
        port = free_ports(1)[0]
        await BoundedSite(runner, "127.0.0.1", port, 5).start()
        socks = []
        try:
            for _ in range(8):
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                socks[-1].setblocking(False)
                await asyncio.sleep(0.05)  # the server's loop accepts it
            deadline = time.monotonic() + 5
            answers: dict[int, bytes] = {}
            while len(answers) < 3 and time.monotonic() < deadline:
                for i, s in enumerate(socks):
                    with contextlib.suppress(BlockingIOError):
                        answers.setdefault(i, s.recv(200))
                await asyncio.sleep(0.05)
            return [answers.get(i, b"") for i in range(len(socks))]
        finally:
            for s in socks:
                s.close()
            await runner.cleanup()

    got = asyncio.run(run())
    assert got[:5] == [b""] * 5  # served: nothing said before a request comes
    refusal = f"HTTP/1.1 503 Service Unavailable\r\nRetry-After: {RETRY_AFTER_S}\r\n".encode()
    assert all(a.startswith(refusal) for a in got[5:]), got[5:]
