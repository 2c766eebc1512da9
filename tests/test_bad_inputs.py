"""Bad input from outside the cluster: HTTP bodies, checkpoints, configs.

Every one is refused with a message that names what was wrong (the field, the
file, the worker or the port), and a running cluster keeps serving.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kimizmq.config import ConfigError, load_config
from kimizmq.local import LocalCluster, write_config
from tests.support import running_cluster

MAX_CONTEXT = 256
PROMPT = [5, 17, 99, 230, 41, 7, 300, 12]
START_TIMEOUT_S = 120


def request(base: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of one HTTP request; any body bytes at all."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def post(base: str, path: str, body) -> tuple[int, dict]:
    return request(base, "POST", path, json.dumps(body).encode())


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    yield from running_cluster(
        tmp_path_factory.mktemp("bad-inputs"), tiny_model, 1, runtime={"max_context": MAX_CONTEXT}
    )


# -- HTTP -----------------------------------------------------------------------------------

COMPLETION = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def deep_json(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


MALFORMED_BODIES = {
    "not JSON": (b'{"prompt": [1, 2', "malformed JSON"),
    "not UTF-8": (b'{"prompt": "\xff\xfe"}', "malformed JSON"),
    "JSON list": (b"[1, 2, 3]", "must be an object"),
    "JSON string": (b'"hello"', "must be an object"),
    "empty body": (b"", "malformed JSON"),
    "nested 100000 deep": (deep_json(100_000), "malformed JSON"),
}


@pytest.mark.parametrize("name", list(MALFORMED_BODIES))
def test_malformed_json_gets_400_saying_so(cluster, name):
    body, message = MALFORMED_BODIES[name]
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, out = request(cluster.api, "POST", path, body)
        assert status == 400, (path, out)
        assert message in out["error"]["message"]
        assert out["error"]["type"] == "invalid_request_error"


BAD_FIELDS = [
    # (path, body, param named in the error)
    ("/v1/completions", {**COMPLETION, "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 10**30}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": MAX_CONTEXT + 1}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "4"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -5}, "max_completion_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": MAX_CONTEXT - 2}, "max_tokens"),  # prompt + max_tokens > ctx
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": -1}, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": 1e308 * 10}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 1.5}, "top_p"),
    ("/v1/completions", {**COMPLETION, "top_k": -3}, "top_k"),
    ("/v1/completions", {**COMPLETION, "seed": "x"}, "seed"),
    ("/v1/completions", {**COMPLETION, "seed": 2**70}, "seed"),
    ("/v1/completions", {**COMPLETION, "logprobs": 1000}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, "stream"),
    ("/v1/completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop": [""]}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop": 7}, "stop"),
    ("/v1/completions", {**COMPLETION, "n": 9}, "n"),
    ("/v1/completions", {**COMPLETION, "model": 5}, "model"),
    ("/v1/completions", {**COMPLETION, "prompt": 42}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": None}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, "2", 3]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, -2, 3]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, 10**9]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, True]}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, "messages[0]"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "\x009\x00", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "", "content": "hi"}]}, "messages[0].role"),
    (
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content",
    ),
]


@pytest.mark.parametrize(
    "path,body,param", BAD_FIELDS, ids=[f"{p[2]}={json.dumps(p[1].get(p[2]))[:24]}" for p in BAD_FIELDS]
)
def test_wrong_types_and_values_get_400_naming_the_field(cluster, path, body, param):
    status, out = post(cluster.api, path, body)
    assert status == 400, out
    assert out["error"]["param"] == param
    assert out["error"]["message"]


def test_prompts_beyond_the_context_length_get_400(cluster):
    status, out = post(cluster.api, "/v1/completions", {**COMPLETION, "prompt": [1] * MAX_CONTEXT})
    assert status == 400
    assert out["error"]["code"] == "context_length_exceeded"
    assert f"context length is {MAX_CONTEXT}" in out["error"]["message"]
    long_text = "word " * (MAX_CONTEXT * 4)
    for path, body in (
        ("/v1/completions", {"prompt": long_text}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]}),
    ):
        status, out = post(cluster.api, path, body)
        assert status == 400 and out["error"]["code"] == "context_length_exceeded", out


def test_unknown_model_route_method_and_oversized_body(cluster):
    status, out = post(cluster.api, "/v1/completions", {**COMPLETION, "model": "gpt-9"})
    assert status == 404 and "gpt-9" in out["error"]["message"]
    assert request(cluster.api, "POST", "/v1/nothing", b"{}")[0] == 404
    assert request(cluster.api, "GET", "/v1/completions")[0] == 405
    status, out = request(cluster.api, "POST", "/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}')
    assert status == 413 and "larger than" in out["error"]["message"]


def test_the_server_still_answers_after_bad_requests(cluster):
    for body, _ in MALFORMED_BODIES.values():
        request(cluster.api, "POST", "/v1/completions", body)
    status, out = post(cluster.api, "/v1/completions", COMPLETION)
    assert status == 200 and out["usage"]["completion_tokens"] == 4
    assert cluster.coordinator.poll() is None


# -- checkpoints a worker cannot load ---------------------------------------------------------


def start_with_worker_model(tmp_path: Path, good_model: Path, worker_model: Path) -> str:
    """Coordinator reads `good_model`, the worker `worker_model` (as on two Macs
    with their own copies); returns the coordinator's error once it gives up."""
    cfg = write_config(tmp_path / "kimi.toml", good_model, 1)
    worker_cfg = tmp_path / "worker.toml"
    worker_cfg.write_text(cfg.read_text().replace(json.dumps(str(good_model)), json.dumps(str(worker_model))))
    cluster = LocalCluster(cfg, ready_timeout=START_TIMEOUT_S)
    try:
        cluster.config_path = worker_cfg
        cluster.start_worker("w0")
        cluster.config_path = cfg
        cluster.start_coordinator()
        with pytest.raises(RuntimeError, match="coordinator exited") as err:
            cluster.wait_ready()
        assert cluster.workers["w0"].poll() is None, "the worker must survive a failed load"
        return str(err.value)
    finally:
        cluster.stop()


def corrupt_copy(tiny_model: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(tiny_model, dest)
    return dest, sorted(dest.glob("model-*.safetensors"))[1]


@pytest.mark.parametrize("fault", ["missing file", "corrupt header", "truncated data", "wrong shape", "no model dir"])
def test_a_checkpoint_the_worker_cannot_load_is_named_at_start(tiny_model, tmp_path, fault):
    model, victim = corrupt_copy(tiny_model, tmp_path / "worker-model")
    if fault == "missing file":
        victim.unlink()
        expect = [victim.name, "missing"]
    elif fault == "corrupt header":
        data = victim.read_bytes()
        victim.write_bytes(data[:8] + b"\x00garbage" + data[16:])
        expect = [victim.name, "corrupt header"]
    elif fault == "truncated data":
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size - 1000)
        expect = [victim.name, "truncated"]
    elif fault == "wrong shape":
        header_len = int.from_bytes(victim.read_bytes()[:8], "little")
        header = json.loads(victim.read_bytes()[8 : 8 + header_len])
        name, entry = next((n, e) for n, e in header.items() if n != "__metadata__" and len(e["shape"]) == 2)
        entry["shape"] = [entry["shape"][1], entry["shape"][0]]  # same bytes, transposed
        raw = json.dumps(header, separators=(",", ":")).encode()
        assert len(raw) <= header_len
        raw = raw.ljust(header_len)
        victim.write_bytes(victim.read_bytes()[:8] + raw + victim.read_bytes()[8 + header_len :])
        expect = ["does not match the model", name.rsplit(".", 1)[0]]
    else:
        shutil.rmtree(model)
        expect = [str(model), "does not exist"]
    message = start_with_worker_model(tmp_path, tiny_model, model)
    assert "worker w0" in message
    for part in expect:
        assert part in message, (part, message)


def test_a_worker_short_of_memory_refuses_the_load_saying_how_much(tiny_model, tmp_path, monkeypatch):
    from kimizmq import loading
    from kimizmq import worker as worker_module

    cfg = load_config(write_config(tmp_path / "kimi.toml", tiny_model, 1))
    monkeypatch.setattr(loading, "available_memory_bytes", lambda: 1 << 20)
    w = worker_module.Worker(cfg, cfg.workers[0])
    try:
        w.cmd_load({"start": 0, "end": 7, "next": cfg.coordinator.result_address})
        while w.loader is not None:  # the daemon's loop would run these steps between messages
            w._load_step()
        assert w.state == "error"
        assert "not enough free memory: worker 'w0' needs" in w.error and "is free now" in w.error, w.error
    finally:
        w.close()


# -- configs ------------------------------------------------------------------------------


def run_daemon(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"kimizmq.{module}", *args], capture_output=True, text=True, timeout=START_TIMEOUT_S
    )


def test_a_worker_name_not_in_the_config_is_named(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2)
    out = run_daemon("worker", "--config", str(cfg), "--name", "w7")
    assert out.returncode != 0
    assert "no worker named 'w7' (known: w0, w1)" in out.stderr


def test_clashing_ports_in_the_config_name_both_owners(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "kimi.toml", tiny_model, 2)
    parsed = load_config(cfg)
    text = cfg.read_text().replace(
        f"data_port = {parsed.workers[1].data_port}", f"data_port = {parsed.coordinator.result_port}"
    )
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=rf"port {parsed.coordinator.result_port} on 127.0.0.1 is used by both"):
        load_config(cfg)
    out = run_daemon("coordinator", "--config", str(cfg))
    assert out.returncode != 0 and "is used by both coordinator and worker 'w1'" in out.stderr


def test_ports_taken_by_another_program_are_named(tiny_model, tmp_path):
    cfg_path = write_config(tmp_path / "kimi.toml", tiny_model, 1)
    cfg = load_config(cfg_path)
    for module, args, port in (
        ("worker", ("--name", "w0"), cfg.workers[0].control_port),
        ("coordinator", (), cfg.coordinator.result_port),
    ):
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            t0 = time.monotonic()
            out = run_daemon(module, "--config", str(cfg_path), *args)
        assert out.returncode != 0 and time.monotonic() - t0 < START_TIMEOUT_S
        assert f"tcp://127.0.0.1:{port}" in out.stderr and "Address already in use" in out.stderr
        assert "Traceback" not in out.stderr
