"""The coordinator's engine: plans nothing and holds no weights; it loads
every worker in parallel and runs requests through the pipeline.

A request's life, all in this file (`Engine.generate`, `_send_prompt`,
`_receive_loop`, `_release`):
  submit -> prompt chunks pushed to stage 0 (the last chunk asks for a sample)
  -> a `token` arrives from the last stage -> detokenize, check stops
  -> either push that token to stage 0 as the next decode step, or finish:
  a `release` travels the data path behind everything the request sent, so
  every stage frees the request's caches.

Every heartbeat the liveness loop asks each worker's control thread for its
health (answered even mid-step: busy is not dead), and with it
  - reconciles: ids a stage holds that no live request here owns are released;
  - watches progress: a request no stage has moved on for
    `request_stall_timeout_s` is replayed once, then ends with an error.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import mlx.core as mx
import zmq
import zmq.asyncio

from . import log, security, status, wire
from .config import Config
from .control import ControlClient, ControlError, ControlTimeout, keep_alive
from .metrics import ITL_BUCKETS_S, TTFT_BUCKETS_S, Histogram
from .plan import Plan
from .prefixcache import Hit, PrefixIndex
from .tokenizer import Tokenizer

HEALTH_POLL_S = 0.2
LOAD_CALL_TIMEOUT_S = 10.0
PUSH_HWM = 256
# sampling parameters whose processors on the last stage depend on the tokens sampled so far
PROCESSOR_PARAMS = frozenset({"grammar", "presence_penalty", "frequency_penalty", "repetition_penalty"})
STALL_REPLAYS = 1  # a stalled request is replayed this often before it fails

logger = log.get_logger()


class RequestError(RuntimeError):
    """A request that failed in the cluster; the message is for the client."""


class QueueFull(RequestError):
    """More requests waiting than the queue holds: the client should retry later."""


@dataclass
class Event:
    """What a request produces: text deltas, then one final event."""

    kind: str  # "token" | "done" | "error"
    text: str = ""
    # "token": the tokens this event streams (one `tokens` message's worth),
    # a logprob each and, where asked for, each one's top alternatives
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list] | None = None
    finish_reason: str | None = None
    message: str | None = None
    # "error": the HTTP status it gets if no token has gone out yet (None: the
    # API decides); 503 where the cluster, not the request, was the trouble
    status: int | None = None


@dataclass
class Request:
    id: str
    prompt: list[int]
    max_tokens: int
    params: dict
    stop: list[str] = field(default_factory=list)
    stop_on_eos: bool = True
    tokens: list[int] = field(default_factory=list)
    seq: int = 0
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float = 0.0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    detok: object = None
    replays: int = 0  # how often the pipeline lost it and it was replayed
    stall_replays: int = 0  # of those, because it stopped making progress
    paused: bool = False  # a stage is down: replay it once every stage is back
    progress_at: float = field(default_factory=time.monotonic)  # when a stage last moved it on
    cached_tokens: int = 0  # prompt tokens the stages took from the prefix cache
    no_prefix: bool = False  # a stage lacked the entry it named: run from the start
    prefix_entry: str | None = None  # the prefix cache entry its prompt started from

    @property
    def wire_id(self) -> str:
        """The id the stages know: new after every replay, so anything still in
        flight from before a failure is recognisably stale."""
        return self.id if not self.replays else f"{self.id}~{self.replays}"


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still become a stop string."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    return keep


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
        # A socket of its own for liveness: a command the worker's main loop
        # answers only after a long step never holds up the next health check.
        self.liveness = {w.name: ControlClient(self.ctx, w.name, w.control_address, secure) for w in cfg.workers}
        self.stats: dict[str, dict] = {}  # each worker's last `stats` answer
        self.offsets: dict[tuple[str, str], int] = {}  # (worker, wire id) -> tokens that stage has run
        self.busy_reported: dict[str, float] = {}  # worker -> when its long step started, once logged
        self.unowned: dict[str, set[str]] = {}  # worker -> ids it held that no request here owned, last heartbeat
        self.worker_state: dict[str, dict] = {w.name: {"state": "unknown"} for w in cfg.workers}
        self.state = "starting"
        self.requests: dict[str, Request] = {}  # by wire id
        self.down_since: float | None = None
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
        self.pids: dict[str, int] = {}  # each worker's process: another one holds no prefix cache entry

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
        self._note_restarts()
        await self._drop_prefixes(None)  # entries a previous coordinator had them keep
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
        self.tasks.append(asyncio.create_task(self._watch_loop()))
        self.tasks.append(asyncio.create_task(self._stats_loop()))

    async def _watch_loop(self) -> None:
        """Application-level liveness: a worker whose loop does not answer a
        ping within the timeout is down, whatever TCP thinks of it. In-flight
        requests wait for it; when it is back (reloaded if it restarted), they
        are replayed. Past the recovery deadline they fail with a clear error."""
        while True:
            await asyncio.sleep(self.cfg.runtime.heartbeat_interval_s)
            try:
                await self._watch_once()
            except Exception:  # noqa: BLE001 - liveness must outlive any one bad round
                logger.exception("watch_failed")

    async def _stats_loop(self) -> None:
        """Each worker's counters for /health and /metrics, asked of its main
        loop; one that is mid-step answers late, which is not a liveness matter."""
        while True:
            await asyncio.sleep(self.cfg.runtime.heartbeat_interval_s)

            async def one(name: str) -> None:
                try:
                    self.stats[name] = await self.control[name].call("stats", timeout=LOAD_CALL_TIMEOUT_S)
                except (ControlTimeout, ControlError):
                    self.stats.pop(name, None)

            await asyncio.gather(*(one(n) for n in self.control))

    async def _watch_once(self) -> None:
        rt = self.cfg.runtime
        await self.refresh_workers(timeout=rt.liveness_timeout_s, reconcile=self.state == "ready")
        if self._note_restarts():
            logger.warning("prefix_cache_cleared", reason="a worker restarted", entries=len(self.prefix.clear()))
            await self._drop_prefixes(None)
        bad = status.not_serving(self.worker_state)
        if not bad:
            if self.state == "degraded":
                await self._recover()
            else:
                self._track_progress()
                await self._act_on_stalls()
            return
        now = time.monotonic()
        if self.state == "ready":
            self.state = "degraded"
            self.down_since = now
            for req in self.requests.values():
                req.paused = True
            logger.error("workers_down", workers={n: w.get("state") for n, w in bad.items()})
        for i, stage in enumerate(self.plan.stages):
            w = bad.get(stage.worker)
            if w and w.get("up") and w.get("state") in ("idle", "error"):
                logger.warning("worker_reload", worker=stage.worker, was=w.get("state"))
                try:
                    await self.control[stage.worker].call("load", self.load_args(i), LOAD_CALL_TIMEOUT_S)
                except (ControlError, ControlTimeout) as e:
                    logger.error("worker_reload_failed", worker=stage.worker, error=str(e))
        if self.down_since is not None and now - self.down_since > rt.recovery_timeout_s and self.requests:
            self.fail_all(
                f"worker {', '.join(bad)} did not come back within {rt.recovery_timeout_s:g} s; the request cannot finish"
            )

    def _track_progress(self) -> None:
        """A request moved on if any stage ran more of it since the last
        heartbeat, or is running a step of it now."""
        now = time.monotonic()
        offsets: dict[tuple[str, str], int] = {}
        for name, w in self.worker_state.items():
            for wire_id, offset in w.get("active") or []:
                offsets[(name, wire_id)] = offset
                req = self.requests.get(wire_id)
                if req is not None and self.offsets.get((name, wire_id)) != offset:
                    req.progress_at = now
            busy = w.get("busy") or {}
            for wire_id in busy.get("requests", []):
                if (req := self.requests.get(wire_id)) is not None:
                    req.progress_at = now
            if busy.get("for_s", 0) > self.cfg.runtime.liveness_timeout_s:
                since = round(time.time() - busy["for_s"])
                if self.busy_reported.get(name) != since:  # once per long step
                    self.busy_reported[name] = since
                    logger.warning("worker_busy", worker=name, **busy)
        self.offsets = offsets

    async def _act_on_stalls(self) -> None:
        """A request no stage has moved on for request_stall_timeout_s (a lost
        message, a forged release) is replayed once, then fails."""
        limit = self.cfg.runtime.request_stall_timeout_s
        now = time.monotonic()
        for req in list(self.requests.values()):
            if req.finish_reason is not None or req.paused or now - req.progress_at <= limit:
                continue
            log.bind_request(req.id)
            if req.stall_replays >= STALL_REPLAYS:
                logger.error(
                    "request_stalled", wire_id=req.wire_id, action="fail", stalled_s=round(now - req.progress_at, 1)
                )
                req.finish_reason = "error"
                self.metrics["requests_failed"] += 1
                req.events.put_nowait(
                    Event(
                        "error",
                        message=f"the request made no progress for {limit:g} s (runtime.request_stall_timeout_s), "
                        f"also after {STALL_REPLAYS} replay; giving up",
                        status=503,
                    )
                )
            else:
                logger.warning(
                    "request_stalled", wire_id=req.wire_id, action="replay", stalled_s=round(now - req.progress_at, 1)
                )
                req.stall_replays += 1
                await self._replay(req)
        log.bind_request(None)

    async def _replay(self, req: Request) -> None:
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

    async def _recover(self) -> None:
        """Every stage is back: drop what the stages hold of in-flight requests
        and replay each one (prompt plus the tokens generated so far)."""
        reqs = [r for r in self.requests.values() if r.paused]
        logger.info("workers_back", replaying=len(reqs), down_s=round(time.monotonic() - (self.down_since or 0), 3))
        self.state = "ready"
        self.down_since = None
        for req in reqs:
            if req.finish_reason is not None:  # finished while stages were down
                continue
            await self._replay(req)
        log.bind_request(None)

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
        for c in (*self.control.values(), *self.liveness.values()):
            c.close()
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
        if req.finish_reason != "error" and req.tokens:
            # Every stage has run each token but the last: the ring fed them all
            # on, and a later one came back. What a cancelled prefill ran is not kept.
            keep, drop = self.prefix.finish(req.prompt + req.tokens[:-1])
            if drop:  # ahead of the release: the stages make room before they keep it
                await self._drop_prefixes(drop)
            if keep is not None:
                header["keep"] = keep
        await self.push.send_multipart(wire.encode("release", header))

    async def _drop_prefixes(self, entries: list[str] | None) -> None:
        """Every stage forgets these prefix cache entries (None: all it holds),
        in order behind every message sent before."""
        if entries is None:
            await self.push.send_multipart(wire.encode("drop", {"all": True}))
            return
        for i in range(0, len(entries), wire.MAX_DROP):
            await self.push.send_multipart(wire.encode("drop", {"entries": entries[i : i + wire.MAX_DROP]}))

    def _note_restarts(self) -> bool:
        """Whether a worker answers from another process than before: it holds
        none of the prefix cache's entries."""
        restarted = False
        for name, w in self.worker_state.items():
            if w.get("up") and (pid := w.get("pid")) is not None:
                restarted |= self.pids.get(name, pid) != pid
                self.pids[name] = pid
        return restarted

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
                    await self._drop_prefixes(drop)
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
                    await self._drop_prefixes(drop)
                req.no_prefix = True
                # not awaited here: a replay's control calls must not hold up the results of others
                replay = asyncio.create_task(self._replay(req))
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
            cut = self._take_token(req, token)
            ev.tokens.append(token)
            ev.logprobs.append(h["logprobs"][i])
            if tops is not None:
                ev.top_logprobs.append(tops[i])
            if req.finish_reason is not None:
                break
        # The stages already run the next steps (the last one fed each token to
        # the first). A stop found above releases the request; the steps still
        # on the ring are dropped there, their tokens here.
        upto = len(req.text) if req.finish_reason is not None else len(req.text) - _held_back(req.text, req.stop)
        if cut is not None:
            upto = cut
        ev.text = req.text[req.emitted : max(upto, req.emitted)]
        req.emitted = max(upto, req.emitted)
        req.events.put_nowait(ev)
        if req.finish_reason is not None:
            logger.info("request_finished", reason=req.finish_reason, tokens=len(req.tokens), request_id=req.id)
            req.events.put_nowait(Event("done", finish_reason=req.finish_reason))

    def _take_token(self, req: Request, token: int) -> int | None:
        """One sampled token: the request's text and, if it ends here, why (an
        end-of-sequence token, max_tokens, a stop string); where a stop string
        starts in the text, if one did."""
        self.metrics["tokens_generated"] += 1
        req.tokens.append(token)
        req.seq += 1
        if req.stop_on_eos and token in self.tokenizer.eos_token_ids:
            req.finish_reason = "stop"
        elif len(req.tokens) >= req.max_tokens:
            req.finish_reason = "length"
        delta = req.detok.add_token(token) if req.finish_reason != "stop" else ""
        if req.finish_reason is not None:
            delta += req.detok.finalize()
        req.text += delta
        if req.stop:
            search_from = max(0, req.emitted - max(len(s) for s in req.stop))
            hits = [i for s in req.stop if (i := req.text.find(s, search_from)) >= 0]
            if hits:
                req.finish_reason = "stop"
                return min(hits)
        return None

    # -- status -------------------------------------------------------------------------

    async def refresh_workers(self, timeout: float, *, reconcile: bool = False) -> dict[str, dict]:
        """Every worker's health from its control thread (with its last stats
        where the process is the same); `reconcile`: also release on each
        worker the ids it holds that no live request here owns."""

        async def one(name: str) -> None:
            args = {}
            if reconcile:
                # Unowned at two heartbeats in a row: not just a release still on its way.
                unowned = {r for r, _ in self.worker_state.get(name, {}).get("active") or [] if r not in self.requests}
                stale = sorted(unowned & self.unowned.get(name, set()))
                self.unowned[name] = unowned - set(stale)
                if stale:
                    args["release"] = stale
                    logger.info("stale_requests_released", worker=name, wire_ids=stale)
            try:
                h = await self.liveness[name].call("health", args, timeout=timeout)
                h["up"] = True
            except (ControlTimeout, ControlError) as e:
                h = {"state": "down", "up": False, "error": str(e)}
            stats = self.stats.get(name, {})
            if h["up"] and stats.get("pid") == h.get("pid"):
                h = {**stats, **h}
            h["last_seen"] = time.time() if h["up"] else self.worker_state.get(name, {}).get("last_seen")
            self.worker_state[name] = h

        await asyncio.gather(*(one(n) for n in self.control))
        return self.worker_state
