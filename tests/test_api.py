"""The HTTP API of a real coordinator with two real workers, asked with the
official openai client: chat and completions, streamed and not, every error
status, /health, /metrics, and a client that leaves in the middle of a stream."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from kimizmq.local import LocalCluster, write_config
from kimizmq.metrics import Histogram, RateMeter
from kimizmq.plan import GIB
from kimizmq.tokenizer import load_tokenizer
from tests.support import log_events, running_cluster, wait_until, worker_stats

MODEL = "kimi-k2-4bit"
CONTEXT = 4096
LONG = 3000  # tokens: a stream that is still going when the test leaves it
HELLO = [{"role": "user", "content": "Hello, tell me about artificial intelligence"}]


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    yield from running_cluster(
        tmp_path_factory.mktemp("api"), tiny_model, 2, model_name=MODEL, runtime={"max_context": CONTEXT}
    )


def http(base: str, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict, bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def metric_values(text: str) -> dict[str, float]:
    """`name{labels}` -> value; every sample line must parse."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r'([a-z_:][a-z0-9_:]*(?:\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})?) (\S+)', line)
        assert m, f"not a Prometheus sample line: {line!r}"
        out[m.group(1)] = float(m.group(2).replace("+Inf", "inf"))
    return out


# -- chat completions --------------------------------------------------------------


def test_chat_completion_returns_the_whole_answer_with_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("req-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == 6 or choice.finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens > 8  # the chat template wraps the message


def test_max_completion_tokens_limits_the_answer(client):
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_chat_stream_equals_the_answer_and_ends_with_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0, seed=7)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=12,
            temperature=0,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_sends_no_usage_and_ends_with_done(cluster):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True}
    status, headers, raw = http(cluster.api, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e and not e.startswith(":")]
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_stop_string_cuts_the_answer(client):
    free = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=0)
    text = free.choices[0].text
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip())
    cut = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_issue_curl_request_works(cluster):
    port = cluster.cfg.coordinator.api_port
    body = (
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hello, tell me about artificial '
        'intelligence"}], "temperature": 0.7, "max_tokens": 100}'
    )
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"http://127.0.0.1:{port}/v1/chat/completions"]
        + ["-H", "Content-Type: application/json", "-d", body, "-w", "\n%{http_code}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    answer, code = out.stdout.rsplit("\n", 1)
    assert code == "200", out.stdout + out.stderr
    r = json.loads(answer)
    assert r["object"] == "chat.completion" and r["model"] == MODEL
    assert r["choices"][0]["finish_reason"] in ("stop", "length")
    assert 1 <= r["usage"]["completion_tokens"] <= 100


# -- completions ---------------------------------------------------------------------


def test_completion_of_a_string_equals_that_of_its_token_ids(client, tiny_model):
    kw = {"model": MODEL, "max_tokens": 8, "temperature": 0, "logprobs": 2, "extra_body": {"ignore_eos": True}}
    by_text = client.completions.create(prompt="Pipelines of Macs", **kw)
    ids = by_text.choices[0].logprobs.model_extra["token_ids"]
    prompt_ids = load_tokenizer(tiny_model).encode("Pipelines of Macs")
    by_ids = client.completions.create(prompt=prompt_ids, **kw)
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(prompt_ids)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.choices[0].logprobs.model_extra["token_ids"] == ids
    lp = by_text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == by_text.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(
        1 <= len(top) <= 2 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs, lp.token_logprobs)
    )
    assert by_text.usage.completion_tokens == 8 and by_text.choices[0].finish_reason == "length"


def test_completion_stream_carries_text_logprobs_and_usage(client):
    kw = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "logprobs": 1}
    whole = client.completions.create(**kw, extra_body={"ignore_eos": True})
    chunks = list(
        client.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    # The stream starts from the prefix cache (all but the prompt's last token):
    # that token's pass alone differs from its pass in a chunk in the last bits.
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs, rel=1e-4, abs=1e-5)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


# -- errors --------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
OK_CHAT = {"model": MODEL, "messages": HELLO}
OK_COMPLETION = {"model": MODEL, "prompt": "hi"}


@pytest.mark.parametrize(
    "path,body,param",
    [
        (CHAT, {**OK_CHAT, "temperature": "hot"}, "temperature"),
        (CHAT, {**OK_CHAT, "temperature": 2.5}, "temperature"),
        (CHAT, {**OK_CHAT, "top_p": 1.5}, "top_p"),
        (CHAT, {**OK_CHAT, "max_tokens": 0}, "max_tokens"),
        (CHAT, {**OK_CHAT, "max_completion_tokens": "many"}, "max_completion_tokens"),
        (CHAT, {**OK_CHAT, "max_tokens": CONTEXT + 1}, "max_tokens"),
        (CHAT, {**OK_CHAT, "stop": 5}, "stop"),
        (CHAT, {**OK_CHAT, "seed": "x"}, "seed"),
        (CHAT, {**OK_CHAT, "n": 9}, "n"),
        (CHAT, {**OK_CHAT, "stream": "yes"}, "stream"),
        (CHAT, {**OK_CHAT, "stream": True, "stream_options": {"include_usage": "y"}}, "stream_options"),
        (CHAT, {"model": MODEL}, "messages"),
        (CHAT, {"model": MODEL, "messages": [{"content": "no role"}]}, "messages[0]"),
        (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (CHAT, {**OK_CHAT, "model": 7}, "model"),
        (COMPLETIONS, {"model": MODEL, "prompt": {"text": "hi"}}, "prompt"),
        (COMPLETIONS, {"model": MODEL, "prompt": [1, -1]}, "prompt"),
        (COMPLETIONS, {**OK_COMPLETION, "logprobs": 50}, "logprobs"),
        (COMPLETIONS, {**OK_COMPLETION, "ignore_eos": "no"}, "ignore_eos"),
    ],
)
def test_a_bad_parameter_is_a_400_naming_it(cluster, path, body, param):
    status, _, raw = http(cluster.api, "POST", path, body)
    assert status == 400, raw
    err = json.loads(raw)["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and param.split("[")[0] in err["message"]


@pytest.mark.parametrize(
    "raw", [b'{"model": "x", "messages": [', b"\xff\xfe", b"[1, 2]"], ids=["truncated", "binary", "array"]
)
def test_a_malformed_body_is_a_400(cluster, raw):
    status, _, body = http(cluster.api, "POST", CHAT, raw)
    assert status == 400
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_the_openai_client_sees_bad_requests_and_unknown_models(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=HELLO, top_p=3)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert missing.value.body["code"] == "model_not_found" and "gpt-4o" in missing.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi")


def test_an_oversized_body_is_a_413(cluster):
    big = json.dumps({**OK_COMPLETION, "prompt": "a" * (5 << 20)}).encode()
    status, _, raw = http(cluster.api, "POST", COMPLETIONS, big)
    assert status == 413
    assert "larger than" in json.loads(raw)["error"]["message"]


def test_an_unknown_route_is_a_404_in_openai_shape(cluster):
    status, _, raw = http(cluster.api, "GET", "/v1/engines")
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"


# -- a client that leaves --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_a_client_leaving_mid_stream_frees_the_request_on_every_stage(cluster, client, kind):
    extra = {"ignore_eos": True}
    if kind == "chat":
        stream = client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=LONG, stream=True, extra_body=extra
        )
    else:
        stream = client.completions.create(model=MODEL, prompt="Tell", max_tokens=LONG, stream=True, extra_body=extra)
    chunks = iter(stream)
    first = next(chunks)
    for _ in range(5):
        next(chunks)
    held = worker_stats(cluster.cfg)
    assert all(any(r.split("~")[0] == first.id for r in s["active_requests"]) for s in held.values()), held
    stream.close()

    wait_until(
        lambda: all(not s["active_requests"] for s in worker_stats(cluster.cfg).values()),
        "every stage to free the request",
    )
    assert all(s["cache_bytes"] == 0 for s in worker_stats(cluster.cfg).values())
    assert cluster.health()[1]["requests_in_flight"] == 0
    cancelled = wait_until(
        lambda: [e for e in log_events(cluster, "coordinator", "request_cancelled") if e["request_id"] == first.id],
        "the coordinator to log the cancellation",
    )
    assert cancelled[0]["tokens"] < LONG


def test_a_client_leaving_before_a_whole_answer_frees_every_stage(cluster):
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": LONG, "ignore_eos": True}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", cluster.cfg.coordinator.api_port), timeout=10) as s:
        s.sendall(head + body)
        wait_until(
            lambda: all(st["active_requests"] for st in worker_stats(cluster.cfg).values()),
            "the request to reach every stage",
        )
    wait_until(
        lambda: all(not st["active_requests"] for st in worker_stats(cluster.cfg).values()),
        "every stage to free the request",
    )
    assert cluster.health()[1]["requests_in_flight"] == 0


# -- health and metrics ----------------------------------------------------------------


def test_health_reports_every_worker(cluster):
    status, body = cluster.health()
    assert status == 200 and body["status"] == "ready" and body["model"] == MODEL
    assert body["coordinator"]["state"] == "ready" and body["coordinator"]["pid"] == cluster.coordinator.pid
    workers = body["workers"]
    assert set(workers) == {"w0", "w1"}
    assert workers["w0"]["layers"][0] == 0 and workers["w0"]["layers"][1] == workers["w1"]["layers"][0]
    assert workers["w1"]["layers"][1] == 7
    for name, w in workers.items():
        assert w["state"] == "ready" and w["up"] is True
        assert w["address"] == cluster.cfg.worker(name).control_address
        assert w["pid"] == cluster.workers[name].pid
        assert w["memory_bytes"] > 0 and w["memory_total_bytes"] == 16 * GIB
        assert w["progress"]["done_bytes"] == w["progress"]["total_bytes"] > 0
        assert time.time() - w["last_seen"] < 30


def test_metrics_count_requests_tokens_and_latencies(cluster, client):
    def scrape() -> dict[str, float]:
        status, headers, raw = http(cluster.api, "GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return metric_values(raw.decode())

    stages = {s["worker"]: f"{s['start']}-{s['end']}" for s in cluster.health()[1]["stages"]}
    # The stages' counters reach /metrics through the liveness loop's stats, a heartbeat late:
    # count from what the workers say themselves, and wait for /metrics to catch up.
    forwards = {w: s["forwards"] for w, s in worker_stats(cluster.cfg).items()}
    before = scrape()
    client.completions.create(model=MODEL, prompt="count", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})

    def caught_up() -> dict | None:
        m = scrape()
        done = all(
            m.get(f'kimi_stage_forwards_total{{layers="{layers}",worker="{w}"}}') == forwards[w] + 7  # 1 + 6 steps
            and m.get(f'kimi_stage_active_requests{{layers="{layers}",worker="{w}"}}') == 0  # and released
            for w, layers in stages.items()
        )
        return m if done else None

    after = wait_until(caught_up, "the stages' counters on /metrics to show the request")

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0)

    assert delta("kimi_requests_total") == 1 and delta("kimi_generation_tokens_total") == 7
    assert delta("kimi_time_to_first_token_seconds_count") == 1
    assert delta("kimi_inter_token_latency_seconds_count") == 6
    assert delta("kimi_inter_token_latency_seconds_sum") > 0
    ttft = [v for k, v in after.items() if k.startswith("kimi_time_to_first_token_seconds_bucket")]
    assert ttft == sorted(ttft) and ttft[-1] == after["kimi_time_to_first_token_seconds_count"]
    assert after['kimi_cluster_state{state="ready"}'] == 1 and after["kimi_queue_depth"] == 0
    for worker, layers in stages.items():
        labels = f'{{layers="{layers}",worker="{worker}"}}'
        assert after[f"kimi_worker_up{labels}"] == 1 and after[f"kimi_worker_ready{labels}"] == 1
        assert after[f"kimi_stage_compute_seconds_total{labels}"] > 0
    if sys.platform == "linux":  # the coordinator's own process, read from /proc
        assert after["process_resident_memory_bytes"] > 0 and after["process_cpu_seconds_total"] > 0


# -- not ready yet -----------------------------------------------------------------------


def test_the_api_is_503_until_every_worker_is_ready(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 1, model_name=MODEL)
    cluster = LocalCluster(cfg)
    try:
        cluster.start_coordinator()  # its worker is not running yet

        def loading():
            try:
                return cluster.health()
            except (urllib.error.URLError, ConnectionError):
                return None  # not listening yet

        status, body = wait_until(loading, "the coordinator to answer /health")
        assert status == 503 and body["status"] == "loading"
        assert body["workers"]["w0"]["state"] in ("unknown", "down")
        status, _, raw = http(cluster.api, "POST", CHAT, OK_CHAT)
        assert status == 503 and "loading" in json.loads(raw)["error"]["message"]
        with pytest.raises(openai.APIStatusError) as e:
            openai.OpenAI(base_url=cluster.api + "/v1", api_key="x", max_retries=0).completions.create(
                model=MODEL, prompt="hi"
            )
        assert e.value.status_code == 503
        status, _, raw = http(cluster.api, "GET", "/metrics")
        assert status == 200 and metric_values(raw.decode())['kimi_cluster_state{state="loading"}'] == 1

        cluster.start_worker("w0")
        assert cluster.wait_ready(60)["workers"]["w0"]["state"] == "ready"
    finally:
        cluster.stop()


# -- the pieces ------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_bounded():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0, 3.0):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (math.inf, 5)]
    assert h.count == 5 and h.sum == pytest.approx(6.65) and len(h.counts) == 3


def test_rate_meter_needs_two_recent_samples():
    r = RateMeter(window_s=10, min_span_s=1)
    assert r.rate("x", 0, now=0) is None
    assert r.rate("x", 5, now=0.5) is None  # too close together
    assert r.rate("x", 20, now=2) == 10
    for t in range(3, 30):
        rate = r.rate("x", 20 + 10 * max(t - 20, 0), now=t)  # idle, then 10 per second from t=20
    assert rate == pytest.approx(90 / 10)  # the last 10 s only
    assert r.rate("x", 110, now=100) is None  # nothing recent to compare with
    assert r.rate("x", 3, now=101) is None  # the counter started again
    assert r.rate("x", 13, now=102) == 10
