"""The coordinator's engine: plans nothing and holds no weights; it loads
every worker in parallel and runs requests through the pipeline.

A request's life, all in this file (`Engine.generate`, `_send_prompt`,
`_receive_loop`, `_release`):
  submit -> prompt chunks pushed to stage 0 (the last chunk asks for a sample)
  -> a `token` arrives from the last stage -> detokenize, check stops
  -> either push that token to stage 0 as the next decode step, or finish:
  a `release` travels the data path behind everything the request sent, so
  every stage frees the request's caches.

A request's own state (its text, stop conditions, events) is request.py; the
watch over the workers (health, reconciliation, stalls, recovery) is
liveness.py, which replays a request through `Engine.replay`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import mlx.core as mx
import zmq
import zmq.asyncio

from . import log, security, wire
from .config import Config
from .control import LOAD_CALL_TIMEOUT_S, ControlClient, ControlError, ControlTimeout, keep_alive
from .liveness import Liveness
from .metrics import ITL_BUCKETS_S, TTFT_BUCKETS_S, Histogram
from .plan import Plan
from .prefixcache import Hit, PrefixIndex
from .request import Event, QueueFull, Request, RequestError
from .tokenizer import Tokenizer

HEALTH_POLL_S = 0.2
PUSH_HWM = 256
RELEASE_GRACE_S = 30.0  # a stage that holds a request this long after its release was sent missed it
# sampling parameters whose processors on the last stage depend on the tokens sampled so far
PROCESSOR_PARAMS = frozenset({"grammar", "presence_penalty", "frequency_penalty", "repetition_penalty"})

logger = log.get_logger()


class Engine:
    def __init__(self, cfg: Config, plan: Plan, tokenizer: Tokenizer):
        self.cfg = cfg
        self.plan = plan
        self.tokenizer = tokenizer
        self.ctx = zmq.asyncio.Context()
        self.workers = {w.name: w for w in cfg.workers}
        self.curve = security.Curve.for_daemon(cfg, security.COORDINATOR, peers=tuple(self.workers))
        secure = self.curve.client if self.curve is not None else None
        self.control = {w.name: ControlClient(self.ctx, w.name, w.control_address, secure) for w in cfg.workers}
        self.worker_state: dict[str, dict] = {w.name: {"state": "unknown"} for w in cfg.workers}
        self.state = "starting"
        self.requests: dict[str, Request] = {}  # by wire id
        self.slots = asyncio.Semaphore(cfg.runtime.max_concurrent)
        self.waiting = 0
        self._ids = itertools.count()
        self.push: zmq.asyncio.Socket | None = None
        self.pull: zmq.asyncio.Socket | None = None
        self.tasks: list[asyncio.Task] = []
        self.metrics = {
            "requests_total": 0,
            "requests_failed": 0,
            "tokens_generated": 0,
            "prompt_tokens": 0,
            "bad_messages": 0,
        }
        self.latency = {"ttft_s": Histogram(TTFT_BUCKETS_S), "itl_s": Histogram(ITL_BUCKETS_S)}
        self.prefix = PrefixIndex({s.worker: s.prefix_cache_bytes for s in plan.stages})
        self.replays: set[asyncio.Task] = set()  # replays the receive loop started
        self.releasing: OrderedDict[str, float] = OrderedDict()  # wire id -> when its release was sent
        self.liveness = Liveness(self)

    # -- start and stop -------------------------------------------------------------

    def open_sockets(self) -> None:
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.MAXMSGSIZE, wire.MAX_HEADER_BYTES + (1 << 20))
        first = self.workers[self.plan.stages[0].worker]
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, PUSH_HWM)
        for sock in (self.pull, self.push):
            keep_alive(sock, heartbeats=self.curve is None)
        if self.curve is not None:
            self.curve.start(self.ctx)  # before bind: refused peers never reach the socket
            self.curve.server(self.pull)
            self.curve.client(self.push, first.name)
        try:
            self.pull.bind(self.cfg.coordinator.result_address)
        except zmq.ZMQError as e:
            raise OSError(
                f"cannot bind the result socket {self.cfg.coordinator.result_address} ([coordinator] host and "
                f"result_port in {self.cfg.path}): {e}; is another coordinator running?"
            ) from None
        self.push.connect(first.data_address)

    def load_args(self, i: int) -> dict:
        stages = self.plan.stages
        nxt = (
            self.workers[stages[i + 1].worker].data_address
            if i + 1 < len(stages)
            else self.cfg.coordinator.result_address
        )
        last = {"first": self.workers[stages[0].worker].data_address} if i == len(stages) - 1 else {}
        return {
            **last,  # the last stage feeds each sampled token back to the first
            "start": stages[i].start,
            "end": stages[i].end,
            "next": nxt,
            "report": self.cfg.coordinator.result_address,
            "dtype": self.cfg.runtime.dtype,
            "max_requests": self.cfg.runtime.max_concurrent,
            "max_context": self.cfg.runtime.max_context,
            "reserve_bytes": stages[i].load_reserve_bytes,  # the plan's KV caches + margin
            "prefix_cache_bytes": stages[i].prefix_cache_bytes,
            "stages": len(stages),
        }

    async def load_all(self) -> None:
        """Every worker loads its shard at once; wait until all are ready.

        A worker that already holds the planned shard (coordinator restart)
        answers ready at once and keeps it."""
        self.state = "loading"
        started = time.monotonic()
        deadline = started + self.cfg.runtime.load_timeout_s
        pending = {s.worker: i for i, s in enumerate(self.plan.stages)}

        async def load_one(name: str, i: int) -> None:
            while True:
                try:
                    self.worker_state[name] = await self.control[name].call(
                        "load", self.load_args(i), LOAD_CALL_TIMEOUT_S
                    )
                    return
                except ControlTimeout:
                    if time.monotonic() > deadline:
                        raise
                    logger.warning("worker_not_answering", worker=name)

        await asyncio.gather(*(load_one(n, i) for n, i in pending.items()))
        logger.info("load_requested", workers=list(pending))
        while pending:
            if time.monotonic() > deadline:
                names = ", ".join(pending)
                raise RequestError(f"workers not ready after {self.cfg.runtime.load_timeout_s:g} s: {names}")
            for name in list(pending):
                try:
                    h = await self.control[name].call("health", timeout=LOAD_CALL_TIMEOUT_S)
                except ControlTimeout:
                    continue
                self.worker_state[name] = {**h, "up": True, "last_seen": time.time()}
                if h["state"] == "ready":
                    pending.pop(name)
                    logger.info("worker_ready", worker=name, layers=h.get("layers"))
                elif h["state"] == "error":
                    raise RequestError(f"worker {name} failed to load: {h.get('error')}")
                elif h["state"] == "idle":
                    raise RequestError(f"worker {name} lost its load (restarted?)")
            await asyncio.sleep(HEALTH_POLL_S)
        # Adopted workers (a restarted coordinator) may hold caches of requests
        # the previous coordinator had in flight: nobody will finish those.
        for name in self.control:
            stats = await self.control[name].call("stats", timeout=LOAD_CALL_TIMEOUT_S)
            for wire_id in stats.get("active_requests", []):
                await self.control[name].call("release", {"req": wire_id}, LOAD_CALL_TIMEOUT_S)
                logger.info("orphan_released", worker=name, wire_id=wire_id)
        self.liveness.note_restarts()
        await self.drop_prefixes(None)  # entries a previous coordinator had them keep
        self.state = "ready"
        logger.info("cluster_ready", stages=[(s.worker, s.start, s.end) for s in self.plan.stages])
        c = self.cfg.coordinator
        stages = ", ".join(f"{s.worker} [{s.start}, {s.end})" for s in self.plan.stages)
        log.announce(
            f"kimi-coordinator ready: http://{c.api_host}:{c.api_port}/v1 serves {self.cfg.model_name} "
            f"on {stages}; loaded in {time.monotonic() - started:.1f} s"
        )

    async def start(self) -> None:
        self.open_sockets()
        self.tasks.append(asyncio.create_task(self._receive_loop()))
        try:
            await self.load_all()
        except (RequestError, ControlError, ControlTimeout) as e:
            self.state = "failed"
            logger.error("cluster_load_failed", error=str(e))
            raise
        self.tasks.append(asyncio.create_task(self.liveness.watch_loop()))
        self.tasks.append(asyncio.create_task(self.liveness.stats_loop()))

    async def replay(self, req: Request) -> None:
        """Drop what the stages hold of `req` and run it again under a new wire
        id: prompt plus the tokens generated so far."""
        old = req.wire_id
        await self._release_everywhere(old)
        if self.requests.get(old) is not req:
            return  # its client left meanwhile: generate() has released it and freed its slot
        self.requests.pop(old)
        req.replays += 1
        req.paused = False
        req.progress_at = time.monotonic()
        self.requests[req.wire_id] = req
        log.bind_request(req.id)
        logger.info("request_replayed", tokens=len(req.tokens), wire_id=req.wire_id)
        if req.tokens and PROCESSOR_PARAMS & req.params.keys():
            req.params["sampled"] = list(req.tokens)  # the last stage's processors resume where they were
        await self._send_prompt(req, req.prompt + req.tokens)

    async def _release_everywhere(self, wire_id: str) -> None:
        async def one(name: str) -> None:
            try:
                await self.control[name].call("release", {"req": wire_id}, LOAD_CALL_TIMEOUT_S)
            except (ControlError, ControlTimeout) as e:
                logger.warning("release_failed", worker=name, error=str(e))

        await asyncio.gather(*(one(n) for n in self.control))

    def fail_all(self, message: str) -> None:
        for req in list(self.requests.values()):
            if req.finish_reason is None:
                req.finish_reason = "error"
                self.metrics["requests_failed"] += 1
                req.events.put_nowait(Event("error", message=message, status=503))

    async def close(self) -> None:
        tasks = [*self.tasks, *self.replays]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in self.control.values():
            c.close()
        self.liveness.close()
        for s in (self.push, self.pull):
            if s is not None:
                s.close(linger=0)
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()

    # -- requests -------------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"req-{secrets.token_hex(6)}-{next(self._ids)}"

    async def generate(self, req: Request) -> AsyncIterator[Event]:
        """Run one request; yields events until (and including) the final one.
        Closing the iterator early cancels the request on every stage."""
        if self.state != "ready":
            raise RequestError(f"cluster is {self.state}, not ready")
        if len(req.prompt) + req.max_tokens > self.cfg.runtime.max_context:
            raise RequestError(
                f"prompt ({len(req.prompt)} tokens) plus max_tokens ({req.max_tokens}) "
                f"exceeds the context length {self.cfg.runtime.max_context}"
            )
        if self.waiting >= self.cfg.runtime.max_queue:
            raise QueueFull(
                f"{self.waiting} requests are already waiting for one of {self.cfg.runtime.max_concurrent} slots; retry later"
            )
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        log.bind_request(req.id)
        req.progress_at = time.monotonic()  # its time in the queue is no stall
        req.detok = self.tokenizer.detokenizer()
        req.params.setdefault("seed", int.from_bytes(os.urandom(4), "little"))
        self.requests[req.wire_id] = req
        self.metrics["requests_total"] += 1
        self.metrics["prompt_tokens"] += len(req.prompt)
        logger.info("request_submitted", prompt_tokens=len(req.prompt), max_tokens=req.max_tokens)
        finished = False
        try:
            await self._send_prompt(req, req.prompt)
            while True:
                ev = await req.events.get()
                yield ev
                if ev.kind in ("done", "error"):
                    finished = True
                    return
        finally:
            self.requests.pop(req.wire_id, None)
            try:
                # On the wire before the next request's prompt: the stages
                # free this one's cache before they open the next.
                await self._release(req)
            finally:
                self.slots.release()
            if not finished:
                logger.info("request_cancelled", tokens=len(req.tokens))
            log.bind_request(None)

    async def _send_prompt(self, req: Request, ids: list[int]) -> None:
        """Push `ids` in chunks, from where the longest prefix every stage
        holds in its prefix cache ends (else from 0); the stages pipeline them,
        the last chunk asks for a sample, and the stages decode on their own
        from there until `stop_at` tokens or an end-of-sequence token."""
        chunk = self.cfg.runtime.prefill_chunk
        ring = {
            "stop_at": len(req.prompt) + req.max_tokens,
            "eos": sorted(self.tokenizer.eos_token_ids) if req.stop_on_eos else [],
        }
        hit: Hit | None = None
        if self.prefix.enabled and not req.no_prefix:
            hit = self.prefix.lookup(ids)
        begin = hit.length if hit else 0
        req.cached_tokens = min(begin, len(req.prompt))
        req.prefix_entry = hit.entry if hit else None
        if hit:
            self.prefix.pin(hit.entry)  # no drop may overtake the chunk that names it
            logger.info("prefix_cache_hit", entry=hit.entry, tokens=hit.length, of=len(ids))
        try:
            for start in range(begin, len(ids), chunk):
                part = ids[start : start + chunk]
                header = {
                    "req": req.wire_id,
                    "seq": req.seq,
                    "offset": start,
                    "sample": start + chunk >= len(ids),
                    "params": req.params,
                    **ring,
                }
                if hit and start == begin:
                    header["prefix"] = {"entry": hit.entry, "length": hit.length}
                await self.push.send_multipart(wire.encode("forward", header, [mx.array([part], dtype=mx.int32)]))
        finally:
            if hit:
                self.prefix.unpin(hit.entry)

    async def _release(self, req: Request) -> None:
        """Free the request on every stage; unless it failed, each stage keeps
        its state in the prefix cache for a later request with the same start."""
        header = {"req": req.wire_id}
        keep = None
        if req.finish_reason != "error" and req.tokens:
            # Every stage has run each token but the last: the ring fed them all
            # on, and a later one came back. What a cancelled prefill ran is not kept.
            keep, drop = self.prefix.finish(req.prompt + req.tokens[:-1])
            if drop:  # ahead of the release: the stages make room before they keep it
                await self.drop_prefixes(drop)
            if keep is not None:
                header["keep"] = keep
        await self.push.send_multipart(wire.encode("release", header))
        self.releasing[req.wire_id] = time.monotonic()
        if keep is not None:
            self.prefix.announce(keep)  # on the wire: a later chunk naming it reaches each stage behind it

    def release_on_its_way(self, wire_id: str) -> bool:
        """Whether this coordinator released `wire_id` less than RELEASE_GRACE_S
        ago: a stage still holding it has the release queued (behind long steps)."""
        now = time.monotonic()
        while self.releasing and now - next(iter(self.releasing.values())) > RELEASE_GRACE_S:
            self.releasing.popitem(last=False)
        return wire_id in self.releasing

    async def drop_prefixes(self, entries: list[str] | None) -> None:
        """Every stage forgets these prefix cache entries (None: all it holds),
        in order behind every message sent before."""
        if entries is None:
            await self.push.send_multipart(wire.encode("drop", {"all": True}))
            return
        for i in range(0, len(entries), wire.MAX_DROP):
            await self.push.send_multipart(wire.encode("drop", {"entries": entries[i : i + wire.MAX_DROP]}))

    async def _receive_loop(self) -> None:
        while True:
            # The stages decode on their own, so tokens may arrive faster than
            # they are streamed; a receive that finds one waiting does not yield,
            # so yield here: the HTTP streams and the liveness watch must run.
            await asyncio.sleep(0)
            frames = await self.pull.recv_multipart()
            try:
                msg = wire.decode(frames)
                if msg.kind not in ("tokens", "error", "kept"):
                    raise wire.WireError(f"the result socket takes tokens, error and kept messages, got {msg.kind}")
                if msg.kind == "tokens":
                    wire.check_tokens(msg.header, self.tokenizer.vocab_size)
            except wire.WireError as e:
                self.metrics["bad_messages"] += 1
                logger.warning("bad_result_message", error=str(e))
                continue
            if msg.kind == "kept":
                h = msg.header
                drop = self.prefix.ack(h["entry"], h["worker"], h["length"], h["bytes"], h["trimmable"])
                if drop:
                    await self.drop_prefixes(drop)
                continue
            req = self.requests.get(msg.header["req"])
            if req is None:  # a request already finished or cancelled, or a stranger's id
                logger.info("result_for_unknown_request", wire_id=msg.header["req"], kind=msg.kind)
                continue
            if msg.kind == "tokens" and msg.header["seq"] == req.seq:
                self._on_tokens(req, msg.header)
            elif msg.kind == "error" and req.paused:
                logger.warning("error_while_recovering", request_id=req.id, error=msg.header["message"])
            elif msg.kind == "error" and msg.header.get("code") == "prefix_missing" and not req.no_prefix:
                # A stage lacks the entry the request named (it could not keep
                # it, or restarted between two heartbeats): it runs from 0.
                logger.warning("prefix_missing", request_id=req.id, entry=req.prefix_entry, error=msg.header["message"])
                if drop := self.prefix.forget(req.prefix_entry):
                    await self.drop_prefixes(drop)
                req.no_prefix = True
                # not awaited here: a replay's control calls must not hold up the results of others
                replay = asyncio.create_task(self.replay(req))
                self.replays.add(replay)
                replay.add_done_callback(self.replays.discard)
            elif msg.kind == "error":
                req.finish_reason = "error"
                self.metrics["requests_failed"] += 1
                logger.error("request_failed", request_id=req.id, error=msg.header["message"])
                req.events.put_nowait(Event("error", message=msg.header["message"]))
            else:
                logger.warning("unexpected_result", request_id=req.id, kind=msg.kind)

    def _on_tokens(self, req: Request, h: dict) -> None:
        """A run of sampled tokens: each is detokenized and checked for the
        request's end in turn (tokens after the end are dropped), then the run
        goes to the client as one event."""
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
            self.latency["ttft_s"].observe(now - req.submitted)
        else:  # the stage sends a run at a time: its gap shared by its tokens
            gap = (now - req.last_token_at) / len(h["tokens"])
            for _ in h["tokens"]:
                self.latency["itl_s"].observe(gap)
        req.last_token_at = now
        tops = h.get("top_logprobs")
        ev = Event("token", top_logprobs=None if tops is None else [])
        cut = None
        for i, token in enumerate(h["tokens"]):
            self.metrics["tokens_generated"] += 1
            cut = req.take_token(token, self.tokenizer.eos_token_ids)
            ev.tokens.append(token)
            ev.logprobs.append(h["logprobs"][i])
            if tops is not None:
                ev.top_logprobs.append(tops[i])
            if req.finish_reason is not None:
                break
        # The stages already run the next steps (the last one fed each token to
        # the first). A stop found above releases the request; the steps still
        # on the ring are dropped there, their tokens here.
        ev.text = req.take_text(cut)
        req.events.put_nowait(ev)
        if req.finish_reason is not None:
            logger.info("request_finished", reason=req.finish_reason, tokens=len(req.tokens), request_id=req.id)
            req.events.put_nowait(Event("done", finish_reason=req.finish_reason))
