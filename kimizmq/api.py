"""The coordinator's OpenAI-compatible HTTP API (aiohttp).

POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics. Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import resource
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from aiohttp import web

from . import log, metrics
from .coordinator import Engine, Event, QueueFull, Request, RequestError
from .plan import GIB

MAX_BODY_BYTES = 4 << 20
SHUTDOWN_TIMEOUT_S = 2.0  # on SIGTERM, open streams get this long to end
# Slow or idle clients (slowloris) must not hold connections: a request's head
# must be complete this long after the connection opened or went idle (aiohttp's
# keep-alive timer, armed at connect), its body read within BODY_TIMEOUT_S.
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 1024  # open HTTP connections; more get 503 and are closed
FD_RESERVE = 128  # open files kept for everything but HTTP (ZMQ sockets, logs)
MAX_STOP_STRINGS = 4
DEFAULT_MAX_TOKENS = 256
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

logger = log.get_logger()
RETRY_AFTER_S = 2  # seconds, on a 429 (queue full) or a 503 (cluster not ready)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def response(self) -> web.Response:
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "invalid_request_error",
            408: "invalid_request_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
        }.get(self.status, "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        # Busy or recovering, not broken: the client is told when to try again.
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status in (429, 503) else None
        return web.json_response(body, status=self.status, headers=headers)


# -- parameter validation -----------------------------------------------------------


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be an integer in [{lo}, {hi}], got {v!r}", name)
    return v


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    return stop


def _common(engine: Engine, body: dict) -> dict[str, Any]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", "model")
    if model is not None and model != engine.cfg.model_name:
        raise ApiError(
            404,
            f"The model '{model}' does not exist; this server serves '{engine.cfg.model_name}'",
            "model",
            "model_not_found",
        )
    _integer(body, "n", 1, 1, 1)  # one choice per request
    flags = {}
    for name in ("stream", "ignore_eos"):  # ignore_eos: vLLM's extension, for benchmarks and tests
        flags[name] = body.get(name, False)
        if not isinstance(flags[name], bool):
            raise ApiError(400, f"{name} must be a boolean", name)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError(400, 'stream_options must be {"include_usage": bool}', "stream_options")
    ctx = engine.cfg.runtime.max_context
    max_tokens = _integer(body, "max_tokens", None, 1, ctx)  # the older name of max_completion_tokens
    if (max_completion := _integer(body, "max_completion_tokens", None, 1, ctx)) is not None:
        max_tokens = max_completion
    params = {
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
    }
    if params["top_p"] == 0.0:  # only the most likely token: greedy
        params["top_p"], params["temperature"] = 1.0, 0.0
    if (top_k := _integer(body, "top_k", None, 0, 1 << 20)) is not None:
        params["top_k"] = top_k
    if (seed := _integer(body, "seed", None, -(1 << 63), (1 << 64) - 1)) is not None:
        params["seed"] = seed & ((1 << 64) - 1)
    return {
        **flags,
        "include_usage": bool(opts.get("include_usage", False)),
        "max_tokens": max_tokens,
        "stop": _stops(body),
        "params": params,
    }


def _chat_prompt(engine: Engine, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", f"messages[{i}]")
        if not m["role"] or not m["role"].isprintable():
            raise ApiError(400, f"messages[{i}].role must be printable text, got {m['role']!r}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        clean.append({"role": m["role"], "content": content})
    return engine.tokenizer.apply_chat_template(clean, add_generation_prompt=True)


def _completion_prompt(engine: Engine, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = engine.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = engine.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt token ids must be in 0..{vocab - 1}", "prompt")
        ids = list(prompt)
    else:
        raise ApiError(400, "prompt must be a string or a list of token ids", "prompt")
    if not ids:
        raise ApiError(400, "prompt is empty", "prompt")
    return ids


def _build_request(engine: Engine, prompt: list[int], opts: dict) -> Request:
    ctx = engine.cfg.runtime.max_context
    if len(prompt) >= ctx:
        raise ApiError(
            400,
            f"the prompt has {len(prompt)} tokens; this model's context length is {ctx}",
            "messages",
            "context_length_exceeded",
        )
    max_tokens = opts["max_tokens"] or min(DEFAULT_MAX_TOKENS, ctx - len(prompt))
    if len(prompt) + max_tokens > ctx:
        raise ApiError(
            400,
            f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context length {ctx}",
            "max_tokens",
            "context_length_exceeded",
        )
    return Request(engine.new_request_id(), prompt, max_tokens, dict(opts["params"]), stop=opts["stop"])


async def _json_body(request: web.Request) -> dict:
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            body = await request.json(loads=json.loads)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object")
    return body


# -- generation ---------------------------------------------------------------------


def _usage(req: Request) -> dict:
    return {
        "prompt_tokens": len(req.prompt),
        "completion_tokens": len(req.tokens),
        "total_tokens": len(req.prompt) + len(req.tokens),
    }


async def _events(engine: Engine, req: Request) -> AsyncIterator[Event]:
    """The request's events; closing this iterator (a client gone) closes
    engine.generate at once, which cancels the request on every stage."""
    try:
        async with aclosing(engine.generate(req)) as events:
            async for ev in events:
                if ev.kind == "error" and ev.status is not None:
                    raise ApiError(ev.status, ev.message or "request failed")
                if ev.kind == "error":
                    raise RequestError(ev.message or "request failed")
                yield ev
    except QueueFull as e:
        raise ApiError(429, str(e), code="queue_full") from None
    except RequestError as e:
        raise ApiError(503 if engine.state != "ready" else 500, str(e)) from None


class Sse:
    def __init__(self, request: web.Request):
        self.request = request
        self.resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def start(self) -> None:
        await self.resp.prepare(self.request)

    async def send(self, obj: dict | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        await self.resp.write(f"data: {data}\n\n".encode())


Chunk = Callable[..., dict | None]


async def _stream(request: web.Request, engine: Engine, req: Request, opts: dict, chunk: Chunk) -> web.StreamResponse:
    """SSE: `chunk` makes each event's object (None: nothing to send); with
    include_usage every chunk carries "usage": null and a last one the usage."""
    sse = Sse(request)
    gen = _events(engine, req)

    async def send(obj: dict | None) -> None:
        if obj is not None:
            if opts["include_usage"]:
                obj.setdefault("usage", None)
            await sse.send(obj)

    try:
        first = await gen.__anext__()  # errors before the first token still get a proper status
    except StopAsyncIteration:
        first = None
    await sse.start()
    try:
        await send(chunk(req, None, role=True))
        ev = first
        while ev is not None:
            await send(chunk(req, ev))
            try:
                ev = await gen.__anext__()
            except StopAsyncIteration:
                ev = None
        if opts["include_usage"]:
            await send(chunk(req, None, usage=True))
        await sse.send("[DONE]")
    except ApiError as e:
        await sse.send({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
    except (ConnectionResetError, ConnectionError):
        logger.info("client_gone", request_id=req.id)
    finally:
        await gen.aclose()
    return sse.resp


def _base(req: Request, obj: str, model: str, created: int) -> dict:
    return {"id": req.id, "object": obj, "created": created, "model": model}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine: Engine = request.app["engine"]
    body = await _json_body(request)
    opts = _common(engine, body)
    req = _build_request(engine, _chat_prompt(engine, body), opts)
    req.stop_on_eos = not opts["ignore_eos"]
    created, model = int(time.time()), engine.cfg.model_name

    if opts["stream"]:

        def chunk(r: Request, ev: Event | None, role: bool = False, usage: bool = False) -> dict | None:
            out = _base(r, "chat.completion.chunk", model, created)
            if usage:
                out["choices"] = []
                out["usage"] = _usage(r)
            elif role:
                out["choices"] = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            elif ev.kind == "done":
                out["choices"] = [{"index": 0, "delta": {}, "finish_reason": ev.finish_reason}]
            elif ev.text:
                out["choices"] = [{"index": 0, "delta": {"content": ev.text}, "finish_reason": None}]
            else:
                return None  # text held back (a possible stop string, an incomplete character)
            return out

        return await _stream(request, engine, req, opts, chunk)

    text, finish = [], None
    async for ev in _events(engine, req):
        text.append(ev.text)
        finish = ev.finish_reason or finish
    out = _base(req, "chat.completion", model, created)
    out["choices"] = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(text)},
            "logprobs": None,
            "finish_reason": finish,
        }
    ]
    out["usage"] = _usage(req)
    return web.json_response(out)


def _logprobs_block(engine: Engine, events: list[Event], offset: int) -> dict:
    ids = [t for ev in events for t in ev.tokens]
    tops = [top for ev in events for top in (ev.top_logprobs or [[]] * len(ev.tokens))]
    pieces, offsets = [], []
    for t in ids:
        pieces.append(engine.tokenizer.decode([t]))
        offsets.append(offset)
        offset += len(pieces[-1])
    return {
        "tokens": pieces,
        "token_logprobs": [lp for ev in events for lp in ev.logprobs],
        "top_logprobs": [{engine.tokenizer.decode([i]): v for i, v in top} for top in tops],
        "text_offset": offsets,
        "token_ids": ids,
    }


async def completions(request: web.Request) -> web.StreamResponse:
    engine: Engine = request.app["engine"]
    body = await _json_body(request)
    opts = _common(engine, body)
    logprobs = _integer(body, "logprobs", None, 0, 20)
    if logprobs:
        opts["params"]["logprobs"] = logprobs
    req = _build_request(engine, _completion_prompt(engine, body), opts)
    req.stop_on_eos = not opts["ignore_eos"]
    created, model = int(time.time()), engine.cfg.model_name

    if opts["stream"]:
        offset = [0]

        def chunk(r: Request, ev: Event | None, role: bool = False, usage: bool = False) -> dict | None:
            out = _base(r, "text_completion", model, created)
            if usage:
                out["choices"] = []
                out["usage"] = _usage(r)
                return out
            if role or (ev.kind == "token" and not ev.text and logprobs is None):
                return None  # no role chunk; nothing to say for a held-back token
            choice = {"index": 0, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
            if logprobs is not None and ev.kind == "token":
                choice["logprobs"] = _logprobs_block(engine, [ev], offset[0])
            offset[0] += len(ev.text)
            out["choices"] = [choice]
            return out

        return await _stream(request, engine, req, opts, chunk)

    events: list[Event] = []
    finish = None
    async for ev in _events(engine, req):
        if ev.kind == "token":
            events.append(ev)
        finish = ev.finish_reason or finish
    out = _base(req, "text_completion", model, created)
    choice = {"index": 0, "text": "".join(e.text for e in events), "logprobs": None, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = _logprobs_block(engine, events, 0)
    out["choices"] = [choice]
    out["usage"] = _usage(req)
    return web.json_response(out)


async def models(request: web.Request) -> web.Response:
    engine: Engine = request.app["engine"]
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": engine.cfg.model_name, "object": "model", "created": 0, "owned_by": "kimizmq"}],
        }
    )


def _workers(app: web.Application) -> dict[str, dict]:
    """Every worker as the coordinator sees it: the stats its liveness loop
    asks for every heartbeat (never a call of its own: a hung worker must not
    slow /health down, nor hold the control socket the liveness loop needs)."""
    engine: Engine = app["engine"]
    last: dict[str, dict] = app["last_stats"]
    out = {}
    for name, w in engine.worker_state.items():
        if "tokens_in" in w:  # a stats answer (pings and load polls say less)
            last[name] = dict(w)
        up = w.get("up", w.get("state") not in ("unknown", "down"))
        prev = last.get(name, {})
        same_process = prev.get("pid") == w.get("pid", prev.get("pid"))
        out[name] = {**prev, **w, "up": up} if up and same_process else {**w, "up": up}
    return out


def _cluster_state(engine: Engine, workers: dict[str, dict]) -> str:
    if engine.state == "ready" and not all(w.get("up") and w.get("state") == "ready" for w in workers.values()):
        return "degraded"
    return engine.state


def _worker_row(app: web.Application, name: str, w: dict) -> dict:
    engine: Engine = app["engine"]
    cfg = engine.workers[name]
    stage = next((s for s in engine.plan.stages if s.worker == name), None)
    rate = None
    if w.get("up") and "tokens_in" in w:
        # timed by the worker's clock when it answered: the liveness loop asks, /health only reads
        rate = app["rates"].rate(f"worker:{name}:{w.get('pid')}", w["tokens_in"], now=w.get("time", time.time()))
    return {
        "state": w.get("state", "unknown") if w.get("up") or w.get("state") == "unknown" else "down",
        "up": bool(w.get("up")),
        "address": cfg.control_address,
        "data_address": cfg.data_address,
        "layers": w.get("layers") or ([stage.start, stage.end] if stage else None),
        "progress": w.get("progress"),
        "error": w.get("error"),
        "requests": w.get("requests"),
        "memory_bytes": w.get("memory_bytes"),
        "memory_total_bytes": int(cfg.memory_gb * GIB),
        "tokens_per_s": rate,
        "last_seen": w.get("last_seen") or w.get("time"),  # while loading: the worker's time of its answer
        "pid": w.get("pid"),
        "busy": w.get("busy"),  # the step its main loop runs now (answered by its control thread)
    }


async def health(request: web.Request) -> web.Response:
    """ready (200), or starting / loading / degraded / failed (503), with
    every worker's state: what `kimi status` shows."""
    app = request.app
    engine: Engine = app["engine"]
    workers = _workers(app)
    state = _cluster_state(engine, workers)
    host = engine.cfg.coordinator.api_host
    body = {
        "status": state,
        "model": engine.cfg.model_name,
        "requests_in_flight": len(engine.requests),
        "queue_depth": engine.waiting,
        "slots": {"total": engine.cfg.runtime.max_concurrent, "in_use": len(engine.requests)},
        "coordinator": {
            "state": state,
            "address": f"{host}:{engine.cfg.coordinator.api_port}",
            "pid": os.getpid(),
            "uptime_s": time.monotonic() - app["started"],
            "requests_total": engine.metrics["requests_total"],
            "tokens_generated": engine.metrics["tokens_generated"],
            "tokens_per_s": app["rates"].rate("coordinator", engine.metrics["tokens_generated"]),
            "time_to_first_token_mean_s": engine.latency["ttft_s"].mean(),
            "inter_token_latency_mean_s": engine.latency["itl_s"].mean(),
        },
        "stages": [{"worker": s.worker, "start": s.start, "end": s.end} for s in engine.plan.stages],
        "workers": {n: _worker_row(app, n, w) for n, w in workers.items()},
    }
    return web.json_response(body, status=200 if state == "ready" else 503)


async def prometheus(request: web.Request) -> web.Response:
    engine: Engine = request.app["engine"]
    workers = _workers(request.app)
    text = metrics.render(engine, _cluster_state(engine, workers), workers)
    return web.Response(body=text.encode(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


@web.middleware
async def errors(request: web.Request, handler):
    engine: Engine = request.app["engine"]
    try:
        key = engine.cfg.security.api_key
        given = request.headers.get("Authorization", "").encode()
        if key and request.path.startswith("/v1/") and not hmac.compare_digest(given, f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")
        if request.path.startswith("/v1/") and request.method == "POST" and engine.state != "ready":
            raise ApiError(503, f"the cluster is {engine.state}; try again when /health says ready")
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPRequestEntityTooLarge:
        return ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes").response()
    except web.HTTPNotFound:
        return ApiError(404, f"no route {request.method} {request.path}", code="not_found").response()
    except web.HTTPMethodNotAllowed:
        return ApiError(405, f"{request.method} not allowed on {request.path}").response()


def make_app(engine: Engine) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[errors])
    app["engine"] = engine
    app["started"] = time.monotonic()
    app["rates"] = metrics.RateMeter()
    app["last_stats"] = {}
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    return app


class _Refuse(asyncio.Protocol):
    """A connection beyond the limit: 503 with Retry-After, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(  # type: ignore[attr-defined]
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: %d\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n" % RETRY_AFTER_S
        )
        transport.close()


class BoundedSite(web.TCPSite):
    """A TCPSite that serves at most `max_connections` connections at once."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, max_connections: int):
        super().__init__(runner, host, port)
        self.max_connections = max_connections

    def _protocol(self) -> asyncio.Protocol:
        server = self._runner.server
        if len(server.connections) >= self.max_connections:
            return _Refuse()
        return server()

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self._host, self._port, reuse_address=True)


def max_connections() -> int:
    """MAX_CONNECTIONS, or fewer where the open-file limit would not allow them."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(16, min(MAX_CONNECTIONS, soft - FD_RESERVE))


async def run_api(engine: Engine) -> web.AppRunner:
    runner = web.AppRunner(
        make_app(engine),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        keepalive_timeout=HEADER_TIMEOUT_S,
    )
    await runner.setup()
    site = BoundedSite(runner, engine.cfg.coordinator.api_host, engine.cfg.coordinator.api_port, max_connections())
    await site.start()
    logger.info("api_listening", host=engine.cfg.coordinator.api_host, port=engine.cfg.coordinator.api_port)
    return runner
