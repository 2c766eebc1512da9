"""The last stage's end of the decode ring.

Decode runs around the ring without the coordinator: the last stage samples,
sends the token to the first stage as the next decode step and, after that,
to the coordinator, until the forward's `stop_at` length or one of its `eos`
tokens. Tokens for the coordinator go as runs: a request's first and last
token at once, the others gathered for `runtime.stream_interval_ms` (fewer
wake-ups for the coordinator and the client when tokens come faster than
anyone reads).

No sockets of its own: the worker hands it how to send (`send`), where runs
go (`coordinator`, kept current as the worker connects) and how a decode step
reaches the first stage (`to_first`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import zmq

from . import log, wire
from .stage import ForwardResult

TOKEN_HWM = 1024  # tokens queued for a coordinator that does not read before a ring stops

logger = log.get_logger()


@dataclass
class TokenRun:
    """A request's sampled tokens not yet sent to the coordinator."""

    seq: int  # the first one's
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list] | None = None

    def add(self, result: ForwardResult) -> None:
        self.tokens.append(result.token)
        self.logprobs.append(result.logprob)
        if result.top_logprobs is not None:
            if self.top_logprobs is None:
                self.top_logprobs = []
            self.top_logprobs.append(result.top_logprobs)

    def message(self, req: str) -> list:
        out = {"req": req, "seq": self.seq, "tokens": self.tokens, "logprobs": self.logprobs}
        if self.top_logprobs is not None:
            out["top_logprobs"] = self.top_logprobs
        return wire.encode("tokens", out)


class TokenRing:
    """Each sampled token goes in through `deliver`; runs that wait for the
    stream interval go out through `flush`, which the daemon loop calls every
    round, polling no longer than `poll_ms` says."""

    def __init__(
        self,
        stream_interval_s: float,
        counters: dict[str, int],
        send: Callable[[zmq.Socket | None, list, str], None],
        to_first: Callable[[wire.Message], bool],
    ):
        self.stream_interval = stream_interval_s
        self.counters = counters  # the worker's: tokens_sampled, token_messages, coordinator_not_reading
        self.send = send
        self.to_first = to_first  # False: the step cannot reach the first stage (reported)
        self.coordinator: zmq.Socket | None = None
        self.outbox: dict[str, TokenRun] = {}  # tokens waiting to go out
        self.sent_at: dict[str, float] = {}  # when each request's last run went

    def deliver(self, h: dict, length: int, result: ForwardResult) -> bool:
        """The token sampled for the forward with header `h` over `length`
        positions: the next decode step to the first stage, then the token to
        the coordinator. False if the coordinator has stopped taking tokens:
        neither is sent, and the caller drops the request."""
        self.counters["tokens_sampled"] += 1
        if self.coordinator is not None and not self.coordinator.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
            # TOKEN_HWM tokens the coordinator has not taken: it is gone (or
            # stuck). Stop the ring here instead of blocking on every send.
            self.counters["coordinator_not_reading"] += 1
            log.bind_request(h["req"])
            logger.warning("coordinator_not_reading", queued=TOKEN_HWM)
            log.bind_request(None)
            return False
        last = not self._continue(h, length, result.token)
        run = self.outbox.get(h["req"])
        if run is None:
            run = self.outbox[h["req"]] = TokenRun(h["seq"])
        run.add(result)
        if last or len(run.tokens) >= wire.MAX_ID_LIST:
            self._send_run(h["req"], last=last)
        else:
            self.flush(h["req"])
        return True

    def flush(self, only: str | None = None) -> None:
        """Send the runs whose request last sent `stream_interval` ago or more
        (a request's first token goes at once)."""
        now = time.monotonic()
        for req in [only] if only is not None else list(self.outbox):
            if now - self.sent_at.get(req, -math.inf) >= self.stream_interval:
                self._send_run(req)

    def poll_ms(self, most: int) -> int:
        """How long to wait for messages: until the earliest run is due, at most `most`."""
        if not self.outbox:
            return most
        due = min(self.sent_at.get(req, -math.inf) for req in self.outbox) + self.stream_interval
        return min(most, math.ceil(1e3 * max(0.0, due - time.monotonic())))

    def forget(self, req: str) -> None:
        self.outbox.pop(req, None)
        self.sent_at.pop(req, None)

    def clear(self) -> None:
        self.outbox.clear()
        self.sent_at.clear()

    def _send_run(self, req: str, *, last: bool = False) -> None:
        run = self.outbox.pop(req)
        self.counters["token_messages"] += 1
        self.send(self.coordinator, run.message(req), "coordinator")
        if last:
            self.sent_at.pop(req, None)
        else:
            self.sent_at[req] = time.monotonic()

    def _continue(self, h: dict, length: int, token: int) -> bool:
        """Feed the sampled token to the first stage as the next decode step,
        unless the sequence is complete or the step cannot go (False)."""
        position = h["offset"] + length  # where the sampled token sits
        if "stop_at" not in h or position + 1 >= h["stop_at"] or token in h.get("eos", ()):
            return False
        header = {k: v for k, v in h.items() if k != "prefix"}  # a decode step starts nothing
        header.update(seq=h["seq"] + 1, offset=position, sample=True)
        return self.to_first(wire.Message("forward", header, [mx.array([[token]], dtype=mx.int32)]))
