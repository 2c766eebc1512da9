"""A worker's outgoing PUSH sockets, created, configured, (re)connected at
every load and closed here: `next` (the next stage, or the coordinator from the
last stage), `report` (errors and kept prefixes, for the coordinator) and
`loop` (the last stage's decode steps to the first; none where one stage is
both)."""

from __future__ import annotations

import zmq

from . import log, security
from .config import Config
from .control import keep_alive
from .loadspec import LoadSpec
from .tokenring import TOKEN_HWM

SEND_TIMEOUT_MS = 5000
DATA_HWM = 64  # data messages queued on a stage's sockets, either way

logger = log.get_logger()


class Links:
    def __init__(self, ctx: zmq.Context, cfg: Config, curve: security.Curve | None):
        self.ctx = ctx
        self.cfg = cfg
        self.curve = curve
        self.next: zmq.Socket | None = None
        self.report: zmq.Socket | None = None
        self.loop: zmq.Socket | None = None
        self.connected: dict[str, str] = {}  # "next"/"report"/"loop" -> address

    def connect(self, spec: LoadSpec) -> None:
        """Connect to the load's peers; a socket already at its address stays."""
        # A stage that is also the first feeds itself in process: no loop socket.
        first = None if spec.first else spec.first_address
        for attr, address in (("next", spec.next_address), ("report", spec.report_address), ("loop", first)):
            sock = getattr(self, attr)
            if sock is not None and self.connected.get(attr) == address:
                continue
            if sock is not None:
                sock.close(linger=0)
                setattr(self, attr, None)
                self.connected.pop(attr, None)
            if address is None:
                continue
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            # Tokens are small, and a coordinator streaming text may lag a little.
            sock.setsockopt(zmq.SNDHWM, TOKEN_HWM if address == spec.report_address else DATA_HWM)
            sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
            keep_alive(sock, heartbeats=self.curve is None)
            if self.curve is not None:
                self.curve.client(sock, security.owner_of(self.cfg, address))
            sock.connect(address)
            self.connected[attr] = address
            setattr(self, attr, sock)

    def send(self, sock: zmq.Socket | None, frames: list, what: str) -> None:
        """Send on one of these sockets (none: nothing to send to); a peer that
        takes nothing for SEND_TIMEOUT_MS is logged, not waited for."""
        if sock is None:
            return
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:
            logger.error("send_timeout", to=what, timeout_ms=SEND_TIMEOUT_MS)

    def close(self) -> None:
        for s in (self.next, self.report, self.loop):
            if s is not None:
                s.close(linger=0)
