"""Generation as the client sees it: each choice's events, the SSE response
and the shapes of OpenAI's chunks (Anthropic's live in kimizmq.anthropic)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from aiohttp import web

from . import log
from .bodies import ApiError
from .engine import Engine, Event, QueueFull, Request, RequestError
from .toolcalls import OutputParser, may_think

logger = log.get_logger()


def usage(reqs: list[Request]) -> dict:
    prompt = sum(len(r.prompt) for r in reqs[:1])  # every choice reads the same prompt, once
    completion = sum(len(r.tokens) for r in reqs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": reqs[0].cached_tokens if reqs else 0},  # from the prefix cache
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


def base_chunk(req: Request, obj: str, model: str, created: int) -> dict:
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


def closing_frames(reqs: list[Request], obj: str, model: str, created: int, include_usage: bool) -> list[Frame]:
    """The end of an OpenAI stream: the usage chunk where asked for, then [DONE]."""
    frames: list[Frame] = []
    if include_usage:
        frames.append((None, {**base_chunk(reqs[0], obj, model, created), "choices": [], "usage": usage(reqs)}))
    return [*frames, (None, "[DONE]")]


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
        out = base_chunk(self.reqs[0], "chat.completion.chunk", self.model, self.created)
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
        return closing_frames(self.reqs, "chat.completion.chunk", self.model, self.created, self.opts["include_usage"])


def logprobs_block(engine: Engine, events: list[Event], offset: int) -> dict:
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
        out = {**base_chunk(self.reqs[0], "text_completion", self.model, self.created), "choices": [choice]}
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
            choice["logprobs"] = logprobs_block(self.engine, [ev], self.offsets[index])
        self.offsets[index] += len(ev.text)
        return [self._chunk(choice)]

    def closing(self) -> list[Frame]:
        return closing_frames(self.reqs, "text_completion", self.model, self.created, self.opts["include_usage"])
