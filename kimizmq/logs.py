"""`kimi logs`: the daemons' JSON-lines logs, merged in time order.

Every daemon writes `<log dir>/<daemon>.jsonl` (see log.py), and every line
carries timestamp, level, event, daemon and request_id: merged, they follow one
request through the coordinator and every stage. A worker on another Mac writes
on its own disk: `RemoteLogs` copies its new lines here over its control socket
(the `logs` command, CURVE when configured) into `<log dir>/remote/`.
"""

from __future__ import annotations

import heapq
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import click

from .log import LEVELS

LOG_SUFFIX = ".jsonl"
FOLLOW_POLL_S = 0.2
FOLLOW_REORDER_S = 0.5  # while following, lines wait this long so lines of different files come out in order
CORE_KEYS = ("timestamp", "level", "event", "daemon", "request_id")
LEVEL_COLORS = {"debug": "bright_black", "info": "green", "warning": "yellow", "error": "red", "critical": "red"}


@dataclass(order=True)
class Entry:
    """One log line; sorts by time, then by file and position."""

    when: float
    source: str
    seq: int
    fields: dict = field(compare=False)
    raw: str = field(compare=False)

    @property
    def request_id(self) -> str | None:
        rid = self.fields.get("request_id")
        return rid if isinstance(rid, str) else None

    @property
    def level(self) -> str:
        return str(self.fields.get("level", "info")).lower()


def _epoch(ts: object) -> float | None:
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return None


class LogReader:
    """Reads the complete new lines of every log file under `paths` (folders
    are searched for *.jsonl), remembering where each file was left off; a
    file that shrank or was replaced is read again from its start."""

    def __init__(self, paths: Iterable[Path]):
        self.paths = [Path(p) for p in paths]
        self.offsets: dict[Path, tuple[int, int]] = {}  # path -> (inode, offset)
        self.last_when: dict[Path, float] = {}
        self.seq = 0

    def files(self) -> list[Path]:
        found = []
        for p in self.paths:
            if p.is_dir():
                found += sorted(p.glob(f"*{LOG_SUFFIX}"))
            elif p.exists():
                found.append(p)
        return found

    def _entries(self, path: Path) -> Iterator[Entry]:
        try:
            f = path.open("rb")
        except OSError:
            return  # gone since it was listed
        with f:
            st = os.fstat(f.fileno())
            inode, offset = self.offsets.get(path, (st.st_ino, 0))
            if inode != st.st_ino or st.st_size < offset:
                offset = 0
            f.seek(offset)
            daemon = path.name.removesuffix(LOG_SUFFIX)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # being written: read it next time
                offset += len(line)
                self.offsets[path] = (st.st_ino, offset)
                text = line.decode("utf-8", "replace").rstrip("\n")
                if not text.strip():
                    continue
                try:
                    fields = json.loads(text)
                except json.JSONDecodeError:
                    fields = None
                if not isinstance(fields, dict):
                    fields = {"event": text, "level": "info", "daemon": daemon}
                fields.setdefault("daemon", daemon)
                when = _epoch(fields.get("timestamp"))
                if when is None:  # a line without a time stays next to its neighbours
                    when = self.last_when.get(path, 0.0)
                self.last_when[path] = when
                self.seq += 1
                yield Entry(when, str(path), self.seq, fields, text)
        self.offsets.setdefault(path, (st.st_ino, offset))

    def read(self) -> Iterator[Entry]:
        """Everything new, merged in time order (each file is in order already)."""
        return heapq.merge(*(self._entries(p) for p in self.files()))


class RemoteLogs:
    """Mirrors the logs of the workers whose files are not on this machine
    into `dest`, a chunk of complete lines per control request."""

    MAX_CALLS = 64  # per worker and refresh: a huge backlog comes over several refreshes
    TIMEOUT_S = 2.0

    def __init__(self, cfg, dest: Path):
        from . import security

        self.cfg = cfg
        self.dest = dest
        self.workers = [w for w in cfg.workers if not (cfg.log_dir / f"worker-{w.name}{LOG_SUFFIX}").exists()]
        self.curve = security.Curve.for_daemon(cfg, security.COORDINATOR, peers=tuple(w.name for w in cfg.workers))
        self.offsets: dict[str, int] = {}
        self.errors: dict[str, str] = {}

    def refresh(self) -> None:
        from .control import ControlError, ControlTimeout, call_once

        if not self.workers:
            return
        self.dest.mkdir(parents=True, exist_ok=True)
        secure = self.curve.client if self.curve is not None else None
        for w in self.workers:
            mirror = self.dest / f"worker-{w.name}{LOG_SUFFIX}"
            offset = self.offsets.get(w.name, mirror.stat().st_size if mirror.exists() else 0)
            try:
                for _ in range(self.MAX_CALLS):
                    r = call_once(
                        w.control_address,
                        "logs",
                        {"offset": offset},
                        timeout_s=self.TIMEOUT_S,
                        secure=secure,
                        name=w.name,
                    )
                    with mirror.open("w" if r["reset"] else "a", encoding="utf-8") as f:
                        f.write(r["data"])
                    offset = r["offset"]
                    if not r["data"] or offset >= r["size"]:
                        break
                self.errors.pop(w.name, None)
            except (ControlError, ControlTimeout, KeyError, TypeError) as e:
                self.errors[w.name] = f"cannot read worker {w.name}'s log at {w.control_address}: {e}"
            self.offsets[w.name] = offset


def matcher(request_id: str | None, level: str | None, daemons: tuple[str, ...] = ()) -> Callable[[Entry], bool]:
    """A filter: one request (also its replays, `ID~n` on the stages), a
    lowest level, some daemons."""
    lowest = LEVELS[level] if level else 0

    def match(e: Entry) -> bool:
        if request_id is not None:
            rid = e.request_id
            if rid is None or (rid != request_id and not rid.startswith(request_id + "~")):
                return False
        if LEVELS.get(e.level, LEVELS["info"]) < lowest:
            return False
        return not daemons or e.fields.get("daemon") in daemons

    return match


def _value(v: object) -> str:
    if isinstance(v, str):
        return v if v and not any(c.isspace() or c in "\"='" for c in v) else json.dumps(v, ensure_ascii=False)
    return json.dumps(v, ensure_ascii=False)


def format_entry(e: Entry) -> str:
    """`time LEVEL daemon request event key=value ...`, time in local time;
    a traceback goes on the lines below."""
    f = e.fields
    when = datetime.fromtimestamp(e.when).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if e.when else "-"
    level = e.level.upper()
    head = " ".join(
        [
            when,
            click.style(f"{level:<7}", fg=LEVEL_COLORS.get(e.level)),
            click.style(f"{str(f.get('daemon', '-')):<12}", fg="cyan"),
            f"{e.request_id or '-':<22}",
            click.style(str(f.get("event", "")), bold=True),
        ]
    )
    rest = " ".join(f"{k}={_value(v)}" for k, v in f.items() if k not in CORE_KEYS and k != "exception")
    out = f"{head} {rest}" if rest else head
    if isinstance(f.get("exception"), str):
        out += "\n" + "\n".join("    " + line for line in f["exception"].splitlines())
    return out


def show(
    reader: LogReader,
    match: Callable[[Entry], bool],
    echo: Callable[[str], None],
    *,
    as_json: bool = False,
    last: int | None = None,
    follow: bool = False,
    poll_s: float = FOLLOW_POLL_S,
    refresh: Callable[[], None] = lambda: None,
) -> None:
    """Print what is there (the last `last` lines of it), then, following,
    what comes, until interrupted."""

    def emit(e: Entry) -> None:
        echo(e.raw if as_json else format_entry(e))

    refresh()

    now = (e for e in reader.read() if match(e))
    for e in deque(now, maxlen=last) if last is not None else now:
        emit(e)
    pending: list[tuple[float, Entry]] = []  # (arrival, entry)
    while follow:
        time.sleep(poll_s)
        refresh()
        arrived = time.monotonic()
        pending += [(arrived, e) for e in reader.read() if match(e)]
        ready = sorted(e for t, e in pending if arrived - t >= FOLLOW_REORDER_S)
        pending = [(t, e) for t, e in pending if arrived - t < FOLLOW_REORDER_S]
        for e in ready:
            emit(e)
