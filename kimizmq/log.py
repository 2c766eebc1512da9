"""Structured logs: one JSON object per line, one file per daemon.

Every line carries `timestamp`, `level`, `event`, `daemon` and `request_id`
(null outside a request), so `kimi logs --request ID` can follow one request
through the coordinator and every stage.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import IO

import structlog

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def human(line: str) -> str:
    """A rendered JSON log line as a person reads it on a terminal:
    `12:00:01 warning worker_not_answering worker=w1`."""
    try:
        e = json.loads(line)
    except json.JSONDecodeError:
        return line
    if not isinstance(e, dict):
        return line
    when = str(e.pop("timestamp", ""))[11:19]
    head = [when, str(e.pop("level", "")), str(e.pop("event", ""))]
    e.pop("daemon", None)
    if e.get("request_id") is None:
        e.pop("request_id", None)
    rest = [f"{k}={v if isinstance(v, str) and v and ' ' not in v else json.dumps(v)}" for k, v in e.items()]
    return " ".join(x for x in head + rest if x)


def announce(text: str) -> None:
    """A daemon's one human line on stdout (ready, listening), outside the JSON logs."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class _TeeLogger:
    """Writes every rendered line to the daemon's log file, and warnings and
    worse (or everything, when verbose) to stderr as well, there as a person
    reads them (`human`); the file keeps the JSON."""

    def __init__(self, file: IO[str] | None, stderr_level: int):
        self._file = file
        self._stderr_level = stderr_level

    def msg(self, message: str, level: int = logging.INFO) -> None:
        if self._file is not None:
            self._file.write(message + "\n")
            self._file.flush()
        if level >= self._stderr_level:
            sys.stderr.write(human(message) + "\n")
            sys.stderr.flush()

    def _at(level: int):  # noqa: N805 - builds methods
        def method(self, message: str) -> None:
            self.msg(message, level)

        return method

    debug = _at(10)
    info = _at(20)
    warning = _at(30)
    warn = warning
    error = _at(40)
    critical = _at(50)
    exception = _at(40)
    del _at


def _request_id_default(_, __, event_dict: dict) -> dict:
    event_dict.setdefault("request_id", None)
    return event_dict


def log_path(log_dir: Path, daemon: str) -> Path:
    return log_dir / f"{daemon}.jsonl"


def read_lines(path: Path, offset: int, most: int) -> dict:
    """Complete lines of the log at `path` from byte `offset` on, at most
    `most` bytes of them (one longer line comes cut): {data, offset (where
    the next read starts), size, reset (the file was replaced: read from 0)}."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            reset = offset > size
            f.seek(0 if reset else offset)
            chunk = f.read(most)
    except FileNotFoundError:
        return {"data": "", "offset": 0, "size": 0, "reset": offset > 0}
    complete = chunk[: chunk.rfind(b"\n") + 1] or (chunk if len(chunk) == most else b"")
    start = 0 if reset else offset
    return {"data": complete.decode("utf-8", "replace"), "offset": start + len(complete), "size": size, "reset": reset}


def configure(daemon: str, log_dir: Path | None, *, verbose: bool = False) -> Path | None:
    """Set up structlog for this process. Returns the log file's path."""
    path = None
    file = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_path(log_dir, daemon)
        file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    tee = _TeeLogger(file, logging.DEBUG if verbose else logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _request_id_default,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=lambda *args: tee,
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(daemon=daemon)
    return path


def get_logger(**kw) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(**kw)


def bind_request(request_id: str | None) -> None:
    """Tag every following line of this context with the request id."""
    if request_id is None:
        structlog.contextvars.unbind_contextvars("request_id")
    else:
        structlog.contextvars.bind_contextvars(request_id=request_id)
