"""The coordinator's OpenAI-compatible HTTP API (aiohttp).

POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}],
POST /v1/messages (Anthropic's, in kimizmq.anthropic), GET /health,
GET /metrics. Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
Every request field is honoured, accepted as changing nothing (IGNORED), or
refused with a 400 naming it.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import math
import os
import re
import resource
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from aiohttp import web

from . import dashboard, grammar, log, metrics
from .coordinator import Engine, Event, QueueFull, Request, RequestError
from .plan import GIB
from .tokenizer import RenderError
from .toolcalls import SECTION_BEGIN, OutputParser, may_think

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
MAX_N = 8  # choices per request (n, best_of)
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
RETRY_AFTER_S = 1  # seconds, on a 429 (queue full) or a 503 (cluster busy or not ready)
REPETITION_CONTEXT = 20  # prompt tokens the repetition penalty sees (mlx-lm's default window)
ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Fields clients send that change nothing here; accepted, never an error.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})
COMMON_FIELDS = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "n",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "logprobs",
        "ignore_eos",
    }
)
CHAT_FIELDS = COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}

logger = log.get_logger()


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


def _known_fields(body: dict, known: frozenset[str]) -> None:
    for name in body:
        if name not in known and name not in IGNORED:
            raise ApiError(400, f"{name} is not supported by this server", name, "unsupported_parameter")


def _logit_bias(engine: Engine, body: dict) -> list[list]:
    bias = body.get("logit_bias")
    if bias is None:
        return []
    vocab = engine.tokenizer.vocab_size
    pairs = []
    if isinstance(bias, dict) and len(bias) <= MAX_LOGIT_BIAS:
        for k, v in bias.items():
            if not (str(k).isdigit() and int(k) < vocab) or isinstance(v, bool) or not isinstance(v, (int, float)):
                break
            if not -100 <= v <= 100:
                break
            pairs.append([int(k), float(v)])
        else:
            return pairs
    raise ApiError(
        400,
        f"logit_bias must map up to {MAX_LOGIT_BIAS} token ids (0..{vocab - 1}, as strings) to biases in [-100, 100]",
        "logit_bias",
    )


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
    n = _integer(body, "n", 1, 1, MAX_N)
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
    if (top_k := _integer(body, "top_k", None, -1, 1 << 20)) and top_k > 0:  # 0 and -1 (vLLM's): off
        params["top_k"] = top_k
    if min_p := _number(body, "min_p", 0.0, 0.0, 1.0):
        if min_p == 1.0:
            raise ApiError(400, "min_p must be a number in [0, 1)", "min_p")
        params["min_p"] = min_p
    for name in ("presence_penalty", "frequency_penalty"):
        if value := _number(body, name, 0.0, -2.0, 2.0):
            params[name] = value
    if (repetition := _number(body, "repetition_penalty", 1.0, 0.0, 10.0)) != 1.0:
        if repetition == 0.0:
            raise ApiError(400, "repetition_penalty must be a number in (0, 10]", "repetition_penalty")
        params["repetition_penalty"] = repetition
    if bias := _logit_bias(engine, body):
        params["logit_bias"] = bias
    if (seed := _integer(body, "seed", None, -(1 << 63), (1 << 64) - 1)) is not None:
        params["seed"] = seed & ((1 << 64) - 1)
    return {
        **flags,
        "n": n,
        "include_usage": bool(opts.get("include_usage", False)),
        "max_tokens": max_tokens,
        "stop": _stops(body),
        "params": params,
    }


def _text(value: Any, where: str, *, optional: bool = False) -> str | None:
    """A content: a string or a list of text parts, joined."""
    if value is None and optional:
        return None
    if isinstance(value, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            raise ApiError(400, f"{where}: only text parts are supported", where)
        return "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be a string{' or null' if optional else ''}", where)
    return value


def _tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise ApiError(400, f"{where} must be a non-empty list", where)
    out = []
    for j, c in enumerate(calls):
        at = f"{where}[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or c.get("type", "function") != "function" or not isinstance(c.get("id"), str):
            raise ApiError(400, f'{at} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}', at)
        if not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise ApiError(400, f"{at}.function needs a name and arguments (a JSON string)", f"{at}.function")
        out.append({"id": c["id"], "type": "function", "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


def chat_messages(body: dict) -> list[dict]:
    """The request's messages, checked, in the shape chat templates read:
    roles from ROLES only (developer is rendered as system), text contents,
    assistant tool calls and tool results."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", f"messages[{i}]")
        role = m["role"]
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        out: dict[str, Any] = {"role": "system" if role == "developer" else role}
        calls = m.get("tool_calls") if role == "assistant" else None
        # null (an assistant turn of tool calls alone) renders as "": every Kimi template takes that
        out["content"] = _text(m.get("content"), f"messages[{i}].content", optional=role == "assistant") or ""
        if calls is not None:
            out["tool_calls"] = _tool_calls(calls, f"messages[{i}].tool_calls")
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise ApiError(400, f"messages[{i}].tool_call_id must be a string", f"messages[{i}].tool_call_id")
            out["tool_call_id"] = m["tool_call_id"]
        for key in ("name", "reasoning_content"):
            if m.get(key) is not None:
                out[key] = _text(m[key], f"messages[{i}].{key}")
        clean.append(out)
    return clean


def chat_tools(body: dict) -> list[dict]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ApiError(400, "tools must be a list", "tools")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type") != "function":
            raise ApiError(400, f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', f"tools[{i}]")
        if not isinstance(fn.get("name"), str) or not TOOL_NAME.fullmatch(fn["name"]):
            raise ApiError(400, f"tools[{i}].function.name must match {TOOL_NAME.pattern}", f"tools[{i}].function.name")
        if not isinstance(fn.get("description", ""), str) or not isinstance(fn.get("parameters", {}), dict):
            raise ApiError(400, f"tools[{i}].function: description a string, parameters an object", f"tools[{i}]")
        clean = {"name": fn["name"], "description": fn.get("description", ""), "parameters": fn.get("parameters", {})}
        out.append({"type": "function", "function": clean})
    if len({t["function"]["name"] for t in out}) != len(out):
        raise ApiError(400, "tools: two tools have the same name", "tools")
    return out


def tool_choice(body: dict, tools: list[dict]) -> tuple[str, list[dict]]:
    """("auto" | "none" | "required", the tools a call may name)."""
    choice = body.get("tool_choice", "auto" if tools else "none")
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise ApiError(400, 'tool_choice "required" needs tools', "tool_choice")
        return choice, tools
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise ApiError(
            400,
            'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise ApiError(400, f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return "required", named


@functools.cache
def _lltokenizer(tokenizer: Any) -> Any:
    return grammar.lltokenizer(tokenizer)


def _checked_grammar(engine: Engine, text: str, param: str) -> str:
    try:
        grammar.check_grammar(text, _lltokenizer(engine.tokenizer))
    except grammar.GrammarError as e:
        raise ApiError(400, f"{param}: {e}", param) from None
    return text


def response_grammar(engine: Engine, body: dict) -> str | None:
    """The grammar `response_format` asks for, checked; None for plain text."""
    fmt = body.get("response_format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return _checked_grammar(engine, grammar.json_schema_grammar({"type": "object"}), "response_format")
    spec = fmt.get("json_schema") if kind == "json_schema" else None
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ApiError(
            400,
            'response_format must be {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
            "response_format",
        )
    try:
        text = grammar.json_schema_grammar(spec.get("schema", {}))
    except grammar.GrammarError as e:
        raise ApiError(400, f"response_format: {e}", "response_format") from None
    return _checked_grammar(engine, text, "response_format")


def _special_id(engine: Engine, text: str) -> int | None:
    ids = engine.tokenizer.encode(text, allow_special=True)
    return ids[0] if len(ids) == 1 else None


def chat_prompt(engine: Engine, messages: list[dict], tools: list[dict], choice: str, params: dict) -> list[int]:
    """The prompt ids, rendered by the checkpoint's own template; what the
    tool choice needs of the sampler goes into `params`."""
    if choice == "none" and (section := _special_id(engine, SECTION_BEGIN)) is not None:
        params["ban"] = [section]  # the model sees the tools but cannot open a call section
    try:
        return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools or None)
    except RenderError as e:
        raise ApiError(400, str(e), "messages") from None


def _completion_prompt(engine: Engine, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):  # Kimi's special tokens spelled out are special tokens, as in the tokenizer
        ids = engine.tokenizer.encode(prompt, allow_special=True)
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
    params = dict(opts["params"])
    if "repetition_penalty" in params:
        params["recent"] = prompt[-REPETITION_CONTEXT:]
    return Request(engine.new_request_id(), prompt, max_tokens, params, stop=opts["stop"])


def _choices(engine: Engine, prompt: list[int], opts: dict, count: int) -> list[Request]:
    """`count` requests for one prompt; with a seed, choice i samples with seed + i."""
    reqs = []
    for i in range(count):
        req = _build_request(engine, prompt, opts)
        if "seed" in req.params:
            req.params["seed"] = (req.params["seed"] + i) & ((1 << 64) - 1)
        req.stop_on_eos = not opts["ignore_eos"]
        reqs.append(req)
    return reqs


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


def _usage(reqs: list[Request]) -> dict:
    prompt = sum(len(r.prompt) for r in reqs[:1])  # every choice reads the same prompt, once
    completion = sum(len(r.tokens) for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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


async def choice_events(engine: Engine, reqs: list[Request]) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) of every request, as they come; closing it
    cancels every request still running."""
    if len(reqs) == 1:
        async with aclosing(_events(engine, reqs[0])) as events:
            async for ev in events:
                yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, req: Request) -> None:
        try:
            async with aclosing(_events(engine, req)) as events:
                async for ev in events:
                    await queue.put((i, ev))
        except ApiError as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, ApiError):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


Frame = tuple[str | None, dict | str]  # (SSE event name or None, data)


class Sse:
    """An SSE response: headers and a comment at once, then a comment every
    `keepalive` seconds in which nothing else was sent (a long prefill), so
    that no proxy times the stream out."""

    def __init__(self, request: web.Request, keepalive: float):
        self.request = request
        self.keepalive = keepalive
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        self.resp = web.StreamResponse(headers=headers)
        self.lock = asyncio.Lock()
        self.last_write = time.monotonic()
        self.pinger: asyncio.Task | None = None

    async def start(self) -> None:
        await self.resp.prepare(self.request)
        await self.comment("ok")
        self.pinger = asyncio.create_task(self._ping())

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self.last_write + self.keepalive - time.monotonic()))
            if time.monotonic() - self.last_write >= self.keepalive:
                try:
                    await self.comment("keep-alive")
                except ConnectionError:
                    return

    async def _write(self, data: bytes) -> None:
        async with self.lock:
            await self.resp.write(data)
            self.last_write = time.monotonic()

    async def comment(self, text: str) -> None:
        await self._write(f": {text}\n\n".encode())

    async def send(self, frame: Frame) -> None:
        event, obj = frame
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        await self._write((f"event: {event}\n" if event else "").encode() + f"data: {data}\n\n".encode())

    async def stop(self) -> None:
        if self.pinger is not None:
            self.pinger.cancel()
            await asyncio.gather(self.pinger, return_exceptions=True)


class StreamShape:
    """What a stream sends: frames before the first event, for each event,
    after the last, and for an error once the stream has begun."""

    def opening(self) -> list[Frame]:
        return []

    def on_event(self, index: int, ev: Event) -> list[Frame]:
        raise NotImplementedError

    def closing(self) -> list[Frame]:
        return []

    def error(self, message: str) -> Frame:
        return None, {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


async def stream(request: web.Request, engine: Engine, reqs: list[Request], shape: StreamShape) -> web.StreamResponse:
    """SSE of `shape`'s frames for the requests' events."""
    if engine.waiting >= engine.cfg.runtime.max_queue:  # as engine.generate refuses: before the headers
        raise ApiError(429, f"{engine.waiting} requests are already waiting for a slot; retry later", code="queue_full")
    sse = Sse(request, engine.cfg.api.keepalive_s)
    try:
        await sse.start()
        for frame in shape.opening():
            await sse.send(frame)
        async with aclosing(choice_events(engine, reqs)) as events:
            async for index, ev in events:
                for frame in shape.on_event(index, ev):
                    await sse.send(frame)
        for frame in shape.closing():
            await sse.send(frame)
    except ApiError as e:
        await sse.send(shape.error(e.message))
    except (ConnectionResetError, ConnectionError):
        logger.info("client_gone", request_id=reqs[0].id)
    finally:
        await sse.stop()
    return sse.resp


def _base(req: Request, obj: str, model: str, created: int) -> dict:
    return {"id": req.id, "object": obj, "created": created, "model": model}


def _token_logprobs(engine: Engine, ev: Event) -> list[dict]:
    """OpenAI chat logprobs entries for the event's tokens."""

    def entry(token: int, logprob: float) -> dict:
        piece = engine.tokenizer.decode([token])
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    tops = ev.top_logprobs or [[]] * len(ev.tokens)
    return [
        {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
        for t, lp, top in zip(ev.tokens, ev.logprobs, tops)
    ]


class ChatOutput:
    """One chat choice as it streams in: reasoning, content and tool calls
    split by the model's markers, and its logprobs."""

    def __init__(self, engine: Engine, tools: bool, parallel: bool, logprobs: bool):
        thinking = may_think(engine.tokenizer.shipped_chat_templates)
        self.engine, self.parallel, self.logprobs = engine, parallel, logprobs
        self.parser = OutputParser(thinking=thinking, tools=tools)
        self.pending_logprobs: list[dict] = []

    def _deltas(self, deltas: list[dict]) -> list[dict]:
        if self.parallel:
            return deltas
        out = []
        for d in deltas:  # one call at most: later ones are dropped
            if "tool_calls" not in d:
                out.append(d)
                continue
            if dropped := [c for c in d["tool_calls"] if c["index"] > 0]:
                logger.warning("tool_calls_dropped", calls=len(dropped), reason="parallel_tool_calls is false")
            if first := [c for c in d["tool_calls"] if c["index"] == 0]:
                out.append({"tool_calls": first})
        return out

    def feed(self, ev: Event) -> list[dict]:
        if self.logprobs and ev.kind == "token":
            self.pending_logprobs += _token_logprobs(self.engine, ev)
        return self._deltas(self.parser.feed(ev.text) if ev.kind == "token" else self.parser.finish())

    def take_logprobs(self) -> dict | None:
        if not self.logprobs:
            return None
        out, self.pending_logprobs = self.pending_logprobs, []
        return {"content": out}

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.parser.tool_calls and reason == "stop" else reason


class ChatStream(StreamShape):
    def __init__(self, engine: Engine, reqs: list[Request], outputs: list[ChatOutput], opts: dict):
        self.reqs, self.outputs, self.opts = reqs, outputs, opts
        self.model, self.created = engine.cfg.model_name, int(time.time())

    def _chunk(self, index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> Frame:
        out = _base(self.reqs[0], "chat.completion.chunk", self.model, self.created)
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        out["choices"] = [choice]
        if self.opts["include_usage"]:
            out["usage"] = None
        return None, out

    def opening(self) -> list[Frame]:
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(len(self.reqs))]

    def on_event(self, index: int, ev: Event) -> list[Frame]:
        output = self.outputs[index]
        deltas = output.feed(ev)
        frames = [
            self._chunk(index, d, logprobs=output.take_logprobs() if k == 0 else None) for k, d in enumerate(deltas)
        ]
        if ev.kind == "done":
            frames.append(self._chunk(index, {}, output.finish_reason(ev.finish_reason), output.take_logprobs()))
        return frames

    def closing(self) -> list[Frame]:
        frames: list[Frame] = []
        if self.opts["include_usage"]:
            out = _base(self.reqs[0], "chat.completion.chunk", self.model, self.created)
            frames.append((None, {**out, "choices": [], "usage": _usage(self.reqs)}))
        return [*frames, (None, "[DONE]")]


def _chat_setup(engine: Engine, body: dict) -> tuple[list[Request], list[ChatOutput], dict]:
    _known_fields(body, CHAT_FIELDS)
    opts = _common(engine, body)
    messages, tools = chat_messages(body), chat_tools(body)
    choice, callable_tools = tool_choice(body, tools)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ApiError(400, "parallel_tool_calls must be a boolean", "parallel_tool_calls")
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise ApiError(400, "logprobs must be a boolean (the number of alternatives is top_logprobs)", "logprobs")
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
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
        constraint = _checked_grammar(engine, forced, "tool_choice")
    if constraint is not None:
        if opts["ignore_eos"]:
            raise ApiError(400, "ignore_eos cannot be combined with a constrained output", "ignore_eos")
        opts["params"]["grammar"] = constraint
    prompt = chat_prompt(engine, messages, tools, choice, opts["params"])
    reqs = _choices(engine, prompt, opts, opts["n"])
    outputs = [ChatOutput(engine, bool(tools) and choice != "none", parallel, logprobs) for _ in reqs]
    return reqs, outputs, opts


async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine: Engine = request.app["engine"]
    body = await _json_body(request)
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
    out = _base(reqs[0], "chat.completion", engine.cfg.model_name, int(time.time()))
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
    out["usage"] = _usage(reqs)
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


class CompletionStream(StreamShape):
    def __init__(self, engine: Engine, reqs: list[Request], opts: dict, logprobs: int | None, echo: str):
        self.engine, self.reqs, self.opts, self.logprobs, self.echo = engine, reqs, opts, logprobs, echo
        self.model, self.created = engine.cfg.model_name, int(time.time())
        self.offsets = [len(echo)] * len(reqs)

    def _chunk(self, choice: dict) -> Frame:
        out = {**_base(self.reqs[0], "text_completion", self.model, self.created), "choices": [choice]}
        if self.opts["include_usage"]:
            out["usage"] = None
        return None, out

    def opening(self) -> list[Frame]:
        empty = {"text": self.echo, "logprobs": None, "finish_reason": None}
        return [self._chunk({"index": i, **empty}) for i in range(len(self.reqs))] if self.echo else []

    def on_event(self, index: int, ev: Event) -> list[Frame]:
        if ev.kind == "token" and not ev.text and self.logprobs is None:
            return []  # nothing to say for a held-back token
        choice = {"index": index, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
        if self.logprobs is not None and ev.kind == "token":
            choice["logprobs"] = _logprobs_block(self.engine, [ev], self.offsets[index])
        self.offsets[index] += len(ev.text)
        return [self._chunk(choice)]

    def closing(self) -> list[Frame]:
        frames: list[Frame] = []
        if self.opts["include_usage"]:
            out = _base(self.reqs[0], "text_completion", self.model, self.created)
            frames.append((None, {**out, "choices": [], "usage": _usage(self.reqs)}))
        return [*frames, (None, "[DONE]")]


async def completions(request: web.Request) -> web.StreamResponse:
    engine: Engine = request.app["engine"]
    body = await _json_body(request)
    _known_fields(body, COMPLETION_FIELDS)
    opts = _common(engine, body)
    logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    if logprobs:
        opts["params"]["logprobs"] = logprobs
    if body.get("suffix") not in (None, ""):
        raise ApiError(400, "suffix is not supported: Kimi models have no fill-in-the-middle format", "suffix")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ApiError(400, "echo must be a boolean", "echo")
    best_of = _integer(body, "best_of", opts["n"], opts["n"], MAX_N)
    if best_of > opts["n"] and opts["stream"]:
        raise ApiError(400, "best_of cannot be combined with stream", "best_of")
    if echo and logprobs is not None:
        raise ApiError(400, "echo with logprobs would need the prompt's logprobs, which are not computed", "echo")
    prompt = _completion_prompt(engine, body)
    reqs = _choices(engine, prompt, opts, best_of)
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
            choice["logprobs"] = _logprobs_block(engine, events[i], 0)
        choices.append(choice)
    out = _base(reqs[0], "text_completion", engine.cfg.model_name, int(time.time()))
    out["choices"] = choices
    out["usage"] = _usage(reqs)
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
        "weight_bytes": w.get("weight_bytes"),
        "cache_bytes": w.get("cache_bytes"),
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
    from .anthropic import messages

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
