"""One request as the coordinator's engine sees it: what it asked for, what it
has produced so far, and the events its client reads; a sampled token taken
into its text, and where a stop condition ends it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


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

    def take_token(self, token: int, eos_token_ids: set[int]) -> int | None:
        """One sampled token: the request's text and, if it ends here, why (an
        end-of-sequence token, max_tokens, a stop string); where a stop string
        starts in the text, if one did."""
        self.tokens.append(token)
        self.seq += 1
        if self.stop_on_eos and token in eos_token_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        delta = self.detok.add_token(token) if self.finish_reason != "stop" else ""
        if self.finish_reason is not None:
            delta += self.detok.finalize()
        self.text += delta
        if self.stop:
            search_from = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                self.finish_reason = "stop"
                return min(hits)
        return None

    def take_text(self, cut: int | None) -> str:
        """The text not yet sent that may go to the client now: up to `cut` (a
        stop string's start), all of it once finished, else all but what could
        still become a stop string."""
        upto = len(self.text) if self.finish_reason is not None else len(self.text) - _held_back(self.text, self.stop)
        if cut is not None:
            upto = cut
        text = self.text[self.emitted : max(upto, self.emitted)]
        self.emitted = max(upto, self.emitted)
        return text


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still become a stop string."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    return keep
