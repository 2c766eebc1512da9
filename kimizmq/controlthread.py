"""A worker's side of the control channel: its ROUTER socket, served by a
thread of its own, and how a command becomes a reply (decoded, versions
checked, the worker's `cmd_<name>` method run, the answer encoded).

Busy is not dead: this thread answers `ping` and `health` at once, whatever
the main loop computes (MLX releases the GIL while it evaluates), and says
what the loop is doing (which requests' step, for how long). Every other
command goes to the main loop over an inproc PAIR and is answered when it
gets to it. Only a worker that does not answer is down.
"""

from __future__ import annotations

import threading

import zmq

from . import log, versions, wire
from .stage import StageError

POLL_MS = 100
COMMANDS_ADDRESS = "inproc://commands"
THREAD_COMMANDS = ("ping", "health")  # answered by the control thread, even mid-step

logger = log.get_logger()


def reply(fields: dict) -> list:
    return wire.encode("reply", {**fields, "versions": versions.local_versions()})


def split_envelope(frames: list) -> tuple[list, list] | None:
    """A ROUTER message's routing envelope (up to the empty delimiter) and the
    message after it; None without a delimiter (not from a REQ socket: dropped,
    as a REP socket drops it)."""
    for i, frame in enumerate(frames[1:], 1):
        if not len(frame):
            return frames[: i + 1], frames[i + 1 :]
    return None


class ControlThread:
    """Relays the ROUTER `control` socket: THREAD_COMMANDS are answered on
    this thread, the rest handed to the main loop through `commands`, which
    it polls and answers (`answer`) with the same envelope. A command runs
    `handlers.cmd_<name>(args)`; ValueError and StageError refuse it."""

    def __init__(self, ctx: zmq.Context, control: zmq.Socket, handlers: object, name: str, counters: dict):
        self.control = control
        self.handlers = handlers
        self.name = name
        self.counters = counters  # the worker's: bad_messages
        self.commands = ctx.socket(zmq.PAIR)  # main loop side
        self._peer = ctx.socket(zmq.PAIR)  # this thread's side
        self.commands.bind(COMMANDS_ADDRESS)
        self._peer.connect(COMMANDS_ADDRESS)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, then close the sockets it owned and the main loop's end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for s in (self.control, self._peer, self.commands):
            s.close(linger=0)

    def _serve(self) -> None:
        """Answer ping and health at once; pass every other command to the
        main loop and its answer back. Owns `control` and the PAIR's peer."""
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self._peer, zmq.POLLIN)
        while True:
            events = dict(poller.poll(POLL_MS))
            if self._peer in events:
                self.control.send_multipart(self._peer.recv_multipart())
            if self.control in events and (split := split_envelope(self.control.recv_multipart())):
                envelope, frames = split
                reply = self._thread_command(frames)
                if reply is None:
                    self._peer.send_multipart(envelope + frames)
                else:
                    self.control.send_multipart(envelope + reply)
            if self._stop.is_set() and not events:
                return

    def _thread_command(self, frames: list) -> list | None:
        """The reply to a command this thread answers itself, or None: the
        main loop's (a malformed message is answered here)."""
        try:
            msg = wire.decode(frames)
        except wire.WireError:
            return self.answer(frames)
        if msg.kind != "command" or msg.header["cmd"] not in THREAD_COMMANDS:
            return None if msg.kind == "command" else self.answer(frames)
        return self.answer(frames)

    def answer(self, frames: list) -> list:
        """The reply to one command message."""
        try:
            msg = wire.decode(frames)
            if msg.kind != "command":
                raise wire.WireError(f"control socket takes commands, got {msg.kind}")
        except wire.WireError as e:
            self.counters["bad_messages"] += 1
            logger.warning("bad_command", error=str(e))
            return reply({"id": "", "ok": False, "error": f"bad message: {e}"})
        cmd, cid, args = msg.header["cmd"], msg.header["id"], msg.header.get("args") or {}
        # A peer of other versions is refused; one that names none only for
        # `load`, so nothing loads for a coordinator that cannot say.
        theirs = msg.header.get("versions")
        if theirs is not None or cmd == "load":
            problem = versions.mismatch(versions.local_versions(), theirs, me=f"worker {self.name}", them="the caller")
            if problem is not None:
                logger.warning("command_refused", cmd=cmd, error=problem)
                return reply({"id": cid, "ok": False, "error": problem})
        handler = getattr(self.handlers, f"cmd_{cmd}", None)
        if handler is None:
            logger.warning("unknown_command", cmd=cmd)
            return reply({"id": cid, "ok": False, "error": f"unknown command {cmd!r}"})
        try:
            result = handler(args)
        except (ValueError, StageError) as e:
            logger.warning("command_refused", cmd=cmd, error=str(e))
            return reply({"id": cid, "ok": False, "error": str(e)})
        return reply({"id": cid, "ok": True, "result": result})
