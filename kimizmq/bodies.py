"""What an OpenAI request body asks for: its fields checked (each one honoured,
accepted as changing nothing (IGNORED), or refused with a 400 naming it), the
prompt built, and the engine's Requests made from it."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
from typing import Any

from aiohttp import web

from . import grammar
from .engine import Engine, Request
from .tokenizer import RenderError
from .toolcalls import SECTION_BEGIN

MAX_BODY_BYTES = 4 << 20
BODY_TIMEOUT_S = 30.0
MAX_STOP_STRINGS = 4
DEFAULT_MAX_TOKENS = 256
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


def integer_param(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
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


def known_fields(body: dict, known: frozenset[str]) -> None:
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


def common_params(engine: Engine, body: dict) -> dict[str, Any]:
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
    n = integer_param(body, "n", 1, 1, MAX_N)
    flags = {}
    for name in ("stream", "ignore_eos"):  # ignore_eos: vLLM's extension, for benchmarks and tests
        flags[name] = body.get(name, False)
        if not isinstance(flags[name], bool):
            raise ApiError(400, f"{name} must be a boolean", name)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise ApiError(400, 'stream_options must be {"include_usage": bool}', "stream_options")
    ctx = engine.cfg.runtime.max_context
    max_tokens = integer_param(body, "max_tokens", None, 1, ctx)  # the older name of max_completion_tokens
    if (max_completion := integer_param(body, "max_completion_tokens", None, 1, ctx)) is not None:
        max_tokens = max_completion
    params = {
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
    }
    if params["top_p"] == 0.0:  # only the most likely token: greedy
        params["top_p"], params["temperature"] = 1.0, 0.0
    if (top_k := integer_param(body, "top_k", None, -1, 1 << 20)) and top_k > 0:  # 0 and -1 (vLLM's): off
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
    if (seed := integer_param(body, "seed", None, -(1 << 63), (1 << 64) - 1)) is not None:
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


def checked_grammar(engine: Engine, text: str, param: str) -> str:
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
        return checked_grammar(engine, grammar.json_schema_grammar({"type": "object"}), "response_format")
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
    return checked_grammar(engine, text, "response_format")


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


def completion_prompt(engine: Engine, body: dict) -> list[int]:
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


def make_choices(engine: Engine, prompt: list[int], opts: dict, count: int) -> list[Request]:
    """`count` requests for one prompt; with a seed, choice i samples with seed + i."""
    reqs = []
    for i in range(count):
        req = _build_request(engine, prompt, opts)
        if "seed" in req.params:
            req.params["seed"] = (req.params["seed"] + i) & ((1 << 64) - 1)
        req.stop_on_eos = not opts["ignore_eos"]
        reqs.append(req)
    return reqs


async def json_body(request: web.Request) -> dict:
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
