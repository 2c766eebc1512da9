"""Helpers for the tests that run a real cluster: the cluster itself, waiting on
a condition with a deadline, the daemons' JSON-lines logs, worker stats over
the control socket, and completions over HTTP.

Import as `from tests.support import ...` (the suite runs as `python -m pytest`
from the repository root, as tests/test_load.py already assumed)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import zmq.asyncio

from kimizmq import security
from kimizmq.config import Config
from kimizmq.control import ControlClient
from kimizmq.local import LocalCluster, write_config

T = TypeVar("T")

WAIT_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 120.0
CONTROL_TIMEOUT_S = 5.0


def running_cluster(folder: Path, model: Path, n_workers: int, **config) -> Iterator[LocalCluster]:
    """The body of a module's `cluster` fixture (`yield from` it): write
    `folder/kimi.toml` for `n_workers` workers serving `model` (`config` as
    write_config takes it), and run that cluster until the fixture ends."""
    with LocalCluster(write_config(folder / "kimi.toml", model, n_workers, **config)) as c:
        yield c


def wait_until(condition: Callable[[], T], what: str, timeout: float = WAIT_TIMEOUT_S, *, interval: float = 0.05) -> T:
    """Call `condition` every `interval` seconds until it returns something
    truthy, and return that; fail naming `what` once `timeout` seconds have
    passed (no call starts after the deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def log_events(cluster: LocalCluster, daemon: str, event: str) -> list[dict]:
    """Every line of `<log dir>/<daemon>.jsonl` (daemon: "coordinator" or
    "worker-<name>") whose event is `event`; every line must be a JSON object
    with an event."""
    lines = (cluster.log_dir / f"{daemon}.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


def worker_stats(cfg: Config, timeout: float = CONTROL_TIMEOUT_S) -> dict[str, dict]:
    """Every worker's `stats`, by worker name, asked on its control socket the
    way the coordinator asks: with the coordinator's CURVE keys when the config
    has a curve_dir, on plain TCP when not."""
    curve = security.Curve.for_daemon(cfg, security.COORDINATOR)
    secure = curve.client if curve is not None else None

    async def ask() -> dict[str, dict]:
        ctx = zmq.asyncio.Context()
        clients = [ControlClient(ctx, w.name, w.control_address, secure) for w in cfg.workers]
        try:
            return {c.name: await c.call("stats", timeout=timeout) for c in clients}
        finally:
            for c in clients:
                c.close()
            ctx.term()

    return asyncio.run(ask())


def post_json(
    base: str, path: str, body: dict, *, api_key: str | None = None, timeout: float = HTTP_TIMEOUT_S
) -> tuple[int, dict]:
    """POST `body` as JSON to `base + path` (with `api_key` as a bearer token if
    given); the status and the JSON answer, error statuses included."""
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def greedy_body(prompt: list[int], n: int, **params) -> dict:
    """A /v1/completions body for token ids: greedy, exactly `n` tokens (past
    any EOS), with each token's id and logprob; `params` add or override fields."""
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 1, "ignore_eos": True, **params}


def open_stream(base: str, body: dict, *, timeout: float = HTTP_TIMEOUT_S):
    """A streamed /v1/completions of `body`, open: the response to read SSE lines
    from as they come (leaving the `with` block closes the connection)."""
    req = urllib.request.Request(
        base + "/v1/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    return urllib.request.urlopen(req, timeout=timeout)


def complete_ids(base: str, prompt: list[int], n: int, **params) -> dict:
    """The first choice of `greedy_body(prompt, n, **params)` completed by the
    coordinator at `base`; any status but 200 fails."""
    status, out = post_json(base, "/v1/completions", greedy_body(prompt, n, **params))
    assert status == 200, (status, out)
    return out["choices"][0]


def streamed_tool_calls(chunks: list) -> list[tuple[str, str, str]]:
    """(id, name, arguments) of every tool call an OpenAI SDK chat stream made,
    in index order: a call's argument deltas joined."""
    calls: dict[int, dict] = {}
    for c in chunks:
        for d in c.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            entry["arguments"] += d.function.arguments or ""
    return [(v["id"], v["name"], v["arguments"]) for _, v in sorted(calls.items())]
