"""The coordinator's side of a worker's REQ/REP control channel.

Lazy Pirate: every request has a deadline; when the reply does not come, the
REQ socket is thrown away and a fresh one connected, so one lost reply never
wedges the coordinator. Commands are idempotent, so a retry is always safe.
"""

from __future__ import annotations

import asyncio
import itertools

import zmq
import zmq.asyncio

from . import wire
from .versions import local_versions, mismatch

DEFAULT_TIMEOUT_S = 5.0
LOAD_CALL_TIMEOUT_S = 10.0  # a command that loads, reports or releases on a busy worker
# ZMQ heartbeats and TCP keepalive on long-lived links: a dead peer is noticed
# and a healed link resumes within seconds, not after TCP's retransmit backoff.
ZMQ_HEARTBEAT_IVL_MS = 2000
ZMQ_HEARTBEAT_TIMEOUT_MS = 10000
TCP_KEEPALIVE_IDLE_S = 10
TCP_KEEPALIVE_INTVL_S = 5
TCP_KEEPALIVE_CNT = 3
# A connect attempt made while the link was down is given up after this long
# and retried, instead of waiting out the kernel's SYN backoff once it is back.
CONNECT_TIMEOUT_MS = 2000


def keep_alive(sock: zmq.Socket, *, heartbeats: bool = True) -> None:
    """TCP keepalive, a connect timeout and (`heartbeats`) ZMQ heartbeats on a
    long-lived socket.

    Sockets under CURVE get no ZMQ heartbeats: with libzmq 4.3.5, a CURVE
    PUSH with heartbeats on stopped delivering once a peer the server's ZAP
    refused had connected (tests/test_security.py caught it)."""
    if heartbeats:
        sock.setsockopt(zmq.HEARTBEAT_IVL, ZMQ_HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMQ_HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TTL, ZMQ_HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, TCP_KEEPALIVE_INTVL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, TCP_KEEPALIVE_CNT)


class ControlError(RuntimeError):
    """The worker answered, and the answer was a refusal."""


class ControlTimeout(TimeoutError):
    """No answer within the deadline."""


def _checked(msg: wire.Message, name: str, address: str) -> dict:
    """The result of a reply, or ControlError: a refusal, or a worker of other versions."""
    problem = mismatch(local_versions(), msg.header.get("versions"), me="this side", them=f"worker {name} ({address})")
    if problem is not None and (msg.header["ok"] or "version mismatch" not in msg.header.get("error", "")):
        raise ControlError(problem)
    if not msg.header["ok"]:
        raise ControlError(f"worker {name}: {msg.header.get('error', 'refused')}")
    return msg.header.get("result") or {}


def call_once(
    address: str,
    cmd: str,
    args: dict | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    secure=None,
    name: str = "",
) -> dict:
    """One command on a fresh blocking REQ socket, for tools outside an event
    loop (`kimi logs`, `kimi bench`); `secure(sock, name)` sets up CURVE."""
    header = {"cmd": cmd, "id": f"{cmd}-once", "versions": local_versions()}
    if args:
        header["args"] = args
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        if secure is not None:
            secure(sock, name)
        sock.connect(address)
        sock.send_multipart(wire.encode("command", header))
        msg = wire.decode(sock.recv_multipart())
    except zmq.Again:
        raise ControlTimeout(f"worker {name} ({address}) did not answer {cmd} within {timeout_s:g} s") from None
    except (wire.WireError, zmq.ZMQError) as e:
        raise ControlError(f"worker {name} ({address}): bad reply to {cmd}: {e}") from None
    finally:
        sock.close()
    if msg.kind != "reply":
        raise ControlError(f"worker {name}: answered {cmd} with a {msg.kind} message")
    return _checked(msg, name, address)


class ControlClient:
    def __init__(self, ctx: zmq.asyncio.Context, name: str, address: str, secure=None):
        self.ctx = ctx
        self.name = name
        self.address = address
        self._secure = secure  # callable configuring a fresh socket (CURVE), or None
        self._ids = itertools.count()
        self._lock = asyncio.Lock()
        self._sock: zmq.asyncio.Socket | None = None

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            s = self.ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            keep_alive(s, heartbeats=self._secure is None)
            if self._secure is not None:
                self._secure(s, self.name)
            s.connect(self.address)
            self._sock = s
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        self._reset()

    async def call(self, cmd: str, args: dict | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
        """Send one command; return its result or raise ControlError/ControlTimeout."""
        async with self._lock:
            cid = f"{cmd}-{next(self._ids)}"
            header = {"cmd": cmd, "id": cid, "versions": local_versions()}
            if args:
                header["args"] = args
            sock = self._socket()
            try:
                async with asyncio.timeout(timeout):  # the send too: a REQ with no peer blocks
                    await sock.send_multipart(wire.encode("command", header))
                    while True:
                        msg = wire.decode(await sock.recv_multipart())
                        if msg.kind == "reply" and msg.header["id"] in (cid, ""):
                            break
            except TimeoutError:
                self._reset()
                raise ControlTimeout(
                    f"worker {self.name} ({self.address}) did not answer {cmd} within {timeout:g} s"
                ) from None
            except (wire.WireError, zmq.ZMQError) as e:
                self._reset()
                raise ControlError(f"worker {self.name}: bad reply to {cmd}: {e}") from None
            except asyncio.CancelledError:
                self._reset()
                raise
        return _checked(msg, self.name, self.address)
