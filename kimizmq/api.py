"""The coordinator's OpenAI-compatible HTTP API (aiohttp).

POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}],
POST /v1/messages (Anthropic's, in kimizmq.anthropic), GET /health,
GET /metrics. Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
Every request field is honoured, accepted as changing nothing (IGNORED), or
refused with a 400 naming it (kimizmq.bodies); kimizmq.streams shapes the
answers, kimizmq.status the health of the cluster.
"""

from __future__ import annotations

import hmac
import os
import time
from contextlib import aclosing
from typing import Any

from aiohttp import web

from . import dashboard, grammar, log, metrics, status
from .anthropic import messages
from .bodies import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    MAX_BODY_BYTES,
    MAX_N,
    MAX_TOP_LOGPROBS,
    ApiError,
    chat_messages,
    chat_prompt,
    chat_tools,
    checked_grammar,
    common_params,
    completion_prompt,
    integer_param,
    json_body,
    known_fields,
    make_choices,
    response_grammar,
    tool_choice,
)
from .engine import Engine, Event, Request
from .httpsite import BoundedSite, max_connections
from .streams import ChatOutput, ChatStream, CompletionStream, base_chunk, choice_events, logprobs_block, stream, usage

SHUTDOWN_TIMEOUT_S = 2.0  # on SIGTERM, open streams get this long to end
# Slow or idle clients (slowloris) must not hold connections: a request's head
# must be complete this long after the connection opened or went idle (aiohttp's
# keep-alive timer, armed at connect), its body read within bodies.BODY_TIMEOUT_S.
HEADER_TIMEOUT_S = 10.0
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

logger = log.get_logger()


def _chat_setup(engine: Engine, body: dict) -> tuple[list[Request], list[ChatOutput], dict]:
    known_fields(body, CHAT_FIELDS)
    opts = common_params(engine, body)
    messages, tools = chat_messages(body), chat_tools(body)
    choice, callable_tools = tool_choice(body, tools)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ApiError(400, "parallel_tool_calls must be a boolean", "parallel_tool_calls")
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise ApiError(400, "logprobs must be a boolean (the number of alternatives is top_logprobs)", "logprobs")
    top = integer_param(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if top:
        opts["params"]["logprobs"] = top
    constraint = response_grammar(engine, body)
    if choice == "required":
        if constraint is not None:
            raise ApiError(
                400, "response_format cannot be combined with a required or named tool_choice", "tool_choice"
            )
        named = isinstance(body.get("tool_choice"), dict)  # one call of that function, as OpenAI makes it
        forced = grammar.tool_call_grammar(callable_tools, parallel=parallel and not named)
        constraint = checked_grammar(engine, forced, "tool_choice")
    if constraint is not None:
        if opts["ignore_eos"]:
            raise ApiError(400, "ignore_eos cannot be combined with a constrained output", "ignore_eos")
        opts["params"]["grammar"] = constraint
    prompt = chat_prompt(engine, messages, tools, choice, opts["params"])
    reqs = make_choices(engine, prompt, opts, opts["n"])
    outputs = [ChatOutput(engine, bool(tools) and choice != "none", parallel, logprobs) for _ in reqs]
    return reqs, outputs, opts


async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine: Engine = request.app["engine"]
    body = await json_body(request)
    reqs, outputs, opts = _chat_setup(engine, body)
    if opts["stream"]:
        return await stream(request, engine, reqs, ChatStream(engine, reqs, outputs, opts))

    parts: list[dict[str, Any]] = [{"content": [], "reasoning_content": [], "tool_calls": []} for _ in reqs]
    finish: list[str | None] = [None] * len(reqs)
    logprobs: list[list] = [[] for _ in reqs]
    async with aclosing(choice_events(engine, reqs)) as events:
        async for i, ev in events:
            for d in outputs[i].feed(ev):
                for key, value in d.items():
                    parts[i][key] += value if key == "tool_calls" else [value]
            if (lp := outputs[i].take_logprobs()) is not None:
                logprobs[i] += lp["content"]
            finish[i] = ev.finish_reason or finish[i]
    out = base_chunk(reqs[0], "chat.completion", engine.cfg.model_name, int(time.time()))
    choices = []
    for i, p in enumerate(parts):
        message: dict[str, Any] = {"role": "assistant", "content": "".join(p["content"])}
        if p["reasoning_content"]:
            message["reasoning_content"] = "".join(p["reasoning_content"])
        if p["tool_calls"]:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in p["tool_calls"]]
            message["content"] = message["content"] or None
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": {"content": logprobs[i]} if outputs[i].logprobs else None,
                "finish_reason": outputs[i].finish_reason(finish[i]),
            }
        )
    out["choices"] = choices
    out["usage"] = usage(reqs)
    return web.json_response(out)


async def completions(request: web.Request) -> web.StreamResponse:
    engine: Engine = request.app["engine"]
    body = await json_body(request)
    known_fields(body, COMPLETION_FIELDS)
    opts = common_params(engine, body)
    logprobs = integer_param(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    if logprobs:
        opts["params"]["logprobs"] = logprobs
    if body.get("suffix") not in (None, ""):
        raise ApiError(400, "suffix is not supported: Kimi models have no fill-in-the-middle format", "suffix")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ApiError(400, "echo must be a boolean", "echo")
    best_of = integer_param(body, "best_of", opts["n"], opts["n"], MAX_N)
    if best_of > opts["n"] and opts["stream"]:
        raise ApiError(400, "best_of cannot be combined with stream", "best_of")
    if echo and logprobs is not None:
        raise ApiError(400, "echo with logprobs would need the prompt's logprobs, which are not computed", "echo")
    prompt = completion_prompt(engine, body)
    reqs = make_choices(engine, prompt, opts, best_of)
    echoed = engine.tokenizer.decode(prompt) if echo else ""
    if opts["stream"]:
        return await stream(request, engine, reqs, CompletionStream(engine, reqs, opts, logprobs, echoed))

    events: list[list[Event]] = [[] for _ in reqs]
    finish: list[str | None] = [None] * len(reqs)
    async with aclosing(choice_events(engine, reqs)) as stream_events:
        async for i, ev in stream_events:
            if ev.kind == "token":
                events[i].append(ev)
            finish[i] = ev.finish_reason or finish[i]
    order = list(range(len(reqs)))
    if best_of > opts["n"]:  # the n with the highest log probability per token
        order.sort(key=lambda i: -sum(lp for e in events[i] for lp in e.logprobs) / max(1, len(reqs[i].tokens)))
    choices = []
    for index, i in enumerate(order[: opts["n"]]):
        text = echoed + "".join(e.text for e in events[i])
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish[i]}
        if logprobs is not None:
            choice["logprobs"] = logprobs_block(engine, events[i], 0)
        choices.append(choice)
    out = base_chunk(reqs[0], "text_completion", engine.cfg.model_name, int(time.time()))
    out["choices"] = choices
    out["usage"] = usage(reqs)
    return web.json_response(out)


def _model_card(engine: Engine) -> dict:
    ctx = engine.cfg.runtime.max_context
    return {
        "id": engine.cfg.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "kimizmq",
        "context_length": ctx,
        "max_model_len": ctx,  # vLLM's name for it
    }


async def models(request: web.Request) -> web.Response:
    engine: Engine = request.app["engine"]
    return web.json_response({"object": "list", "data": [_model_card(engine)]})


async def model(request: web.Request) -> web.Response:
    engine: Engine = request.app["engine"]
    name = request.match_info["model"]
    if name != engine.cfg.model_name:
        raise ApiError(
            404,
            f"The model '{name}' does not exist; this server serves '{engine.cfg.model_name}'",
            "model",
            "model_not_found",
        )
    return web.json_response(_model_card(engine))


def _workers(app: web.Application) -> dict[str, dict]:
    """Every worker as the coordinator sees it: the stats its liveness loop
    asks for every heartbeat (never a call of its own: a hung worker must not
    slow /health down, nor hold the control socket the liveness loop needs)."""
    return status.with_last_stats(app["engine"].worker_state, app["last_stats"])


def _worker_row(app: web.Application, name: str, w: dict) -> dict:
    engine: Engine = app["engine"]
    stage = next((s for s in engine.plan.stages if s.worker == name), None)
    layers = [stage.start, stage.end] if stage else None
    return status.worker_row(w, engine.workers[name], layers, status.token_rate(app["rates"], name, w))


async def health(request: web.Request) -> web.Response:
    """ready (200), or starting / loading / degraded / failed (503), with
    every worker's state: what `kimi status` shows."""
    app = request.app
    engine: Engine = app["engine"]
    workers = _workers(app)
    state = status.cluster_state(engine.state, workers)
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
            "prefix_cache": engine.prefix.stats(),
        },
        "stages": [{"worker": s.worker, "start": s.start, "end": s.end} for s in engine.plan.stages],
        "workers": {n: _worker_row(app, n, w) for n, w in workers.items()},
    }
    return web.json_response(body, status=200 if state == "ready" else 503)


async def prometheus(request: web.Request) -> web.Response:
    engine: Engine = request.app["engine"]
    workers = _workers(request.app)
    text = metrics.render(engine, status.cluster_state(engine.state, workers), workers)
    return web.Response(body=text.encode(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE})


@web.middleware
async def errors(request: web.Request, handler):
    engine: Engine = request.app["engine"]
    try:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204)  # a CORS preflight: _cors adds what it may
        key = engine.cfg.security.api_key
        given = request.headers.get("Authorization", "").encode()
        if "x-api-key" in request.headers:  # Anthropic's clients send the key so
            given = f"Bearer {request.headers['x-api-key']}".encode()
        if key and request.path.startswith("/v1/") and not hmac.compare_digest(given, f"Bearer {key}".encode()):
            raise ApiError(
                401, "missing or wrong API key (Authorization: Bearer ... or x-api-key)", code="invalid_api_key"
            )
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


async def _cors(request: web.Request, response: web.StreamResponse) -> None:
    """Browsers on the configured origins may call the API ([api] cors_origins)."""
    allowed = request.app["engine"].cfg.api.cors_origins
    origin = request.headers.get("Origin")
    if origin is None or not (origin in allowed or "*" in allowed):
        return
    response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
    response.headers["Vary"] = "Origin"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", "Authorization, Content-Type"
        )
        response.headers["Access-Control-Max-Age"] = "600"


def make_app(engine: Engine) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[errors])
    app.on_response_prepare.append(_cors)
    app["engine"] = engine
    app["started"] = time.monotonic()
    app["rates"] = metrics.RateMeter()
    app["last_stats"] = {}
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    dashboard.add_routes(app, engine.cfg.api.dashboard)
    return app


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
