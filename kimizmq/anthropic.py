"""Anthropic's Messages API (POST /v1/messages) on the same engine, so that
Claude-style agent clients can drive the cluster.

A request is translated into the chat API's terms (system prompt, text,
`tool_use` blocks as assistant tool calls, `tool_result` blocks as tool
messages), rendered by the checkpoint's own template, and the model's output
comes back as content blocks: `thinking`, `text`, `tool_use`. Errors use
Anthropic's shape: {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Any

from aiohttp import web

from .bodies import (
    ApiError,
    chat_messages,
    chat_prompt,
    chat_tools,
    checked_grammar,
    common_params,
    json_body,
    make_choices,
    tool_choice,
)
from .engine import Engine, Event, Request
from .grammar import tool_call_grammar
from .streams import ChatOutput, Frame, StreamShape, choice_events, stream
from .toolcalls import may_think, template_thinks

FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
    }
)
IGNORED = frozenset({"metadata", "service_tier", "container"})
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def _error(e: ApiError) -> web.Response:
    body = {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}
    return web.json_response(body, status=e.status)


def _text_blocks(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in value
    ):
        return "".join(b["text"] for b in value)
    raise ApiError(400, f"{where} must be a string or a list of text blocks", where)


def _openai_messages(body: dict) -> list[dict]:
    """The request's system prompt and messages as chat API messages."""
    out: list[dict] = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text_blocks(body["system"], "system")})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f'{where}.role must be "user" or "assistant"', f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content must be a string or a list of blocks", f"{where}.content")
        text, calls, reasoning = [], [], []
        for j, b in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind == "tool_use" and m["role"] == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                    raise ApiError(400, f"{at}: a tool_use block needs an id and a name", at)
                arguments = json.dumps(b.get("input", {}), ensure_ascii=False)
                calls.append(
                    {"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": arguments}}
                )
            elif kind == "thinking" and m["role"] == "assistant" and isinstance(b.get("thinking"), str):
                reasoning.append(b["thinking"])
            elif kind == "tool_result" and m["role"] == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise ApiError(400, f"{at}: a tool_result block needs a tool_use_id", at)
                result = _text_blocks(b.get("content", ""), f"{at}.content")
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": result})
            else:
                raise ApiError(400, f"{at}: {kind!r} blocks are not supported in {m['role']} messages", at)
        if text or calls or reasoning:
            msg: dict[str, Any] = {"role": m["role"], "content": "".join(text) if text or not calls else None}
            if calls:
                msg["tool_calls"] = calls
            if reasoning:
                msg["reasoning_content"] = "".join(reasoning)
            out.append(msg)
    return out


def _openai_tools(body: dict) -> tuple[list[dict], Any, bool]:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise ApiError(400, "tools must be a list", "tools")
    converted = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or "type" in t and t["type"] not in ("custom", None):
            raise ApiError(
                400, f"tools[{i}]: only custom tools (name, description, input_schema) are supported", "tools"
            )
        fn = {"name": t.get("name"), "description": t.get("description", ""), "parameters": t.get("input_schema", {})}
        converted.append({"type": "function", "function": fn})
    choice = body.get("tool_choice") or {"type": "auto"}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise ApiError(400, 'tool_choice.type must be "auto", "any", "tool" or "none"', "tool_choice")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if kind == "tool":
        return converted, {"type": "function", "function": {"name": choice.get("name")}}, parallel
    return converted, {"any": "required"}.get(kind, kind), parallel


def _stop_reason(req: Request, finish: str | None, tool_calls: bool) -> tuple[str, str | None]:
    """Anthropic's stop_reason and the stop sequence that ended the answer, if one did."""
    if tool_calls and finish == "stop":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    hits = [(i, s) for s in req.stop if (i := req.text.find(s)) >= 0]
    if finish == "stop" and hits:
        return "stop_sequence", min(hits)[1]
    return "end_turn", None


def _block(delta_key: str, value: Any) -> dict:
    if delta_key == "reasoning_content":
        return {"type": "thinking", "thinking": value, "signature": ""}
    if delta_key == "content":
        return {"type": "text", "text": value}
    return {
        "type": "tool_use",
        "id": value["id"],
        "name": value["function"]["name"],
        "input": json.loads(value["function"]["arguments"]),
    }


class MessagesStream(StreamShape):
    """Anthropic's event stream: message_start, a start / deltas / stop per
    content block, message_delta with the stop reason, message_stop."""

    def __init__(self, engine: Engine, req: Request, output: ChatOutput, model: str):
        self.req, self.output, self.model = req, output, model
        self.index = -1
        self.open_kind: str | None = None  # the kind of the block being streamed

    def opening(self) -> list[Frame]:
        message = {
            "id": self.req.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": len(self.req.prompt), "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def _close(self) -> list[Frame]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _start(self, kind: str, block: dict) -> list[Frame]:
        frames = self._close()
        self.index += 1
        self.open_kind = kind
        return [
            *frames,
            ("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block}),
        ]

    def _delta(self, delta: dict) -> Frame:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}

    def on_event(self, index: int, ev: Event) -> list[Frame]:
        frames: list[Frame] = []
        for d in self.output.feed(ev):
            ((key, value),) = d.items()
            if key == "tool_calls":
                for call in value:
                    block = {"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": {}}
                    frames += self._start("tool_use", block)
                    frames.append(
                        self._delta({"type": "input_json_delta", "partial_json": call["function"]["arguments"]})
                    )
                frames += self._close()
                continue
            kind = "thinking" if key == "reasoning_content" else "text"
            if self.open_kind != kind:
                frames += self._start(
                    kind, {"type": "thinking", "thinking": ""} if kind == "thinking" else {"type": "text", "text": ""}
                )
            frames.append(
                self._delta(
                    {"type": "thinking_delta", "thinking": value}
                    if kind == "thinking"
                    else {"type": "text_delta", "text": value}
                )
            )
        if ev.kind == "done":
            frames += self._close()
            reason, sequence = _stop_reason(self.req, ev.finish_reason, bool(self.output.parser.tool_calls))
            delta = {"stop_reason": reason, "stop_sequence": sequence}
            frames.append(
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": delta,
                        "usage": {
                            "output_tokens": len(self.req.tokens),
                            "input_tokens": len(self.req.prompt) - self.req.cached_tokens,
                            "cache_read_input_tokens": self.req.cached_tokens,
                        },
                    },
                )
            )
            frames.append(("message_stop", {"type": "message_stop"}))
        return frames

    def error(self, message: str) -> Frame:
        return "error", {"type": "error", "error": {"type": "api_error", "message": message}}


async def messages(request: web.Request) -> web.StreamResponse:
    try:
        return await _messages(request)
    except ApiError as e:
        return _error(e)


async def _messages(request: web.Request) -> web.StreamResponse:
    engine: Engine = request.app["engine"]
    body = await json_body(request)
    for name in body:
        if name not in FIELDS and name not in IGNORED:
            raise ApiError(400, f"{name} is not supported by this server", name)
    if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
        raise ApiError(400, "max_tokens is required: an integer", "max_tokens")
    # A model served with a thinking template always thinks; one that ships no
    # thinking template never does; one in between thinks when its prompt asks.
    always = template_thinks(engine.tokenizer.chat_template_source)
    never = not may_think(engine.tokenizer.shipped_chat_templates)
    thinking = body.get("thinking") or {"type": "disabled"}
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
        raise ApiError(400, 'thinking must be {"type": "enabled", ...} or {"type": "disabled"}', "thinking")
    if (always and thinking["type"] == "disabled") or (never and thinking["type"] == "enabled"):
        raise ApiError(
            400,
            f"this model {'always' if always else 'never'} thinks: thinking cannot be {thinking['type']}",
            "thinking",
        )
    tools, choice, parallel = _openai_tools(body)
    chat = {
        "messages": _openai_messages(body),
        "tools": tools or None,
        "tool_choice": choice if tools or choice == "none" else None,
        **{k: body[k] for k in ("model", "max_tokens", "stream", "temperature", "top_p", "top_k") if k in body},
    }
    if "stop_sequences" in body:
        chat["stop"] = body["stop_sequences"]
    opts = common_params(engine, {k: v for k, v in chat.items() if v is not None})
    clean_tools = chat_tools(chat)
    how, callable_tools = tool_choice({k: v for k, v in chat.items() if v is not None}, clean_tools)
    if how == "required":
        named = isinstance(choice, dict)  # one call of that tool
        forced = tool_call_grammar(callable_tools, parallel=parallel and not named)
        opts["params"]["grammar"] = checked_grammar(engine, forced, "tool_choice")
    prompt = chat_prompt(engine, chat_messages(chat), clean_tools, how, opts["params"])
    (req,) = make_choices(engine, prompt, opts, 1)
    output = ChatOutput(engine, bool(clean_tools) and how != "none", parallel, logprobs=False)
    model = engine.cfg.model_name
    if opts["stream"]:
        return await stream(request, engine, [req], MessagesStream(engine, req, output, model))

    blocks: list[dict] = []
    finish = None
    async with aclosing(choice_events(engine, [req])) as events:
        async for _, ev in events:
            for d in output.feed(ev):
                ((key, value),) = d.items()
                if key == "tool_calls":
                    blocks += [_block(key, c) for c in value]
                elif blocks and blocks[-1]["type"] == _block(key, "")["type"] and key != "tool_calls":
                    field = "thinking" if key == "reasoning_content" else "text"
                    blocks[-1][field] += value
                else:
                    blocks.append(_block(key, value))
            finish = ev.finish_reason or finish
    reason, sequence = _stop_reason(req, finish, bool(output.parser.tool_calls))
    return web.json_response(
        {
            "id": req.id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": blocks,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": {
                # as Anthropic counts them: input_tokens are those not read from the (prefix) cache
                "input_tokens": len(req.prompt) - req.cached_tokens,
                "cache_read_input_tokens": req.cached_tokens,
                "output_tokens": len(req.tokens),
            },
        }
    )
