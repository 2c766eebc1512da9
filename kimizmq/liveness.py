"""The coordinator's watch over its workers, owned by the engine.

Every heartbeat it asks each worker's control thread for its health (answered
even mid-step: busy is not dead), and with it
  - reconciles: ids a stage holds that no live request here owns are released;
  - watches progress: a request no stage has moved on for
    `request_stall_timeout_s` is replayed once, then ends with an error;
  - notices a worker down: in-flight requests wait for it, and are replayed
    once every stage is back (a restarted one reloaded first), or fail past
    `recovery_timeout_s`;
  - notices a restarted worker: it holds none of the prefix cache's entries.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from . import log, status
from .control import LOAD_CALL_TIMEOUT_S, ControlClient, ControlError, ControlTimeout
from .request import Event

if TYPE_CHECKING:
    from .engine import Engine

STALL_REPLAYS = 1  # a stalled request is replayed this often before it fails

logger = log.get_logger()


class Liveness:
    def __init__(self, engine: Engine):
        self.engine = engine
        cfg = engine.cfg
        secure = engine.curve.client if engine.curve is not None else None
        # A socket of its own for liveness: a command the worker's main loop
        # answers only after a long step never holds up the next health check.
        self.clients = {w.name: ControlClient(engine.ctx, w.name, w.control_address, secure) for w in cfg.workers}
        self.stats: dict[str, dict] = {}  # each worker's last `stats` answer
        self.offsets: dict[tuple[str, str], int] = {}  # (worker, wire id) -> tokens that stage has run
        self.busy_reported: dict[str, float] = {}  # worker -> when its long step started, once logged
        self.unowned: dict[str, set[str]] = {}  # worker -> ids it held that no request here owned, last heartbeat
        self.down_since: float | None = None
        self.pids: dict[str, int] = {}  # each worker's process: another one holds no prefix cache entry

    def close(self) -> None:
        for c in self.clients.values():
            c.close()

    async def watch_loop(self) -> None:
        """Application-level liveness: a worker whose loop does not answer a
        ping within the timeout is down, whatever TCP thinks of it. In-flight
        requests wait for it; when it is back (reloaded if it restarted), they
        are replayed. Past the recovery deadline they fail with a clear error."""
        while True:
            await asyncio.sleep(self.engine.cfg.runtime.heartbeat_interval_s)
            try:
                await self.watch_once()
            except Exception:  # noqa: BLE001 - liveness must outlive any one bad round
                logger.exception("watch_failed")

    async def stats_loop(self) -> None:
        """Each worker's counters for /health and /metrics, asked of its main
        loop; one that is mid-step answers late, which is not a liveness matter."""
        control = self.engine.control
        while True:
            await asyncio.sleep(self.engine.cfg.runtime.heartbeat_interval_s)

            async def one(name: str) -> None:
                try:
                    self.stats[name] = await control[name].call("stats", timeout=LOAD_CALL_TIMEOUT_S)
                except (ControlTimeout, ControlError):
                    self.stats.pop(name, None)

            await asyncio.gather(*(one(n) for n in control))

    async def watch_once(self) -> None:
        engine = self.engine
        rt = engine.cfg.runtime
        await self.refresh_workers(timeout=rt.liveness_timeout_s, reconcile=engine.state == "ready")
        if self.note_restarts():
            logger.warning("prefix_cache_cleared", reason="a worker restarted", entries=len(engine.prefix.clear()))
            await engine.drop_prefixes(None)
        bad = status.not_serving(engine.worker_state)
        if not bad:
            if engine.state == "degraded":
                await self._recover()
            else:
                self._track_progress()
                await self._act_on_stalls()
            return
        now = time.monotonic()
        if engine.state == "ready":
            engine.state = "degraded"
            self.down_since = now
            for req in engine.requests.values():
                req.paused = True
            logger.error("workers_down", workers={n: w.get("state") for n, w in bad.items()})
        for i, stage in enumerate(engine.plan.stages):
            w = bad.get(stage.worker)
            if w and w.get("up") and w.get("state") in ("idle", "error"):
                logger.warning("worker_reload", worker=stage.worker, was=w.get("state"))
                try:
                    await engine.control[stage.worker].call("load", engine.load_args(i), LOAD_CALL_TIMEOUT_S)
                except (ControlError, ControlTimeout) as e:
                    logger.error("worker_reload_failed", worker=stage.worker, error=str(e))
        if self.down_since is not None and now - self.down_since > rt.recovery_timeout_s and engine.requests:
            engine.fail_all(
                f"worker {', '.join(bad)} did not come back within {rt.recovery_timeout_s:g} s; the request cannot finish"
            )

    async def refresh_workers(self, timeout: float, *, reconcile: bool = False) -> dict[str, dict]:
        """Every worker's health from its control thread (with its last stats
        where the process is the same); `reconcile`: also release on each
        worker the ids it holds that no live request here owns."""
        worker_state = self.engine.worker_state

        async def one(name: str) -> None:
            args = {}
            if reconcile:
                # Unowned at two heartbeats in a row, and not released lately: not
                # a release still on its way (a stage may be busy for seconds).
                engine = self.engine
                held = worker_state.get(name, {}).get("active") or []
                unowned = {r for r, _ in held if r not in engine.requests and not engine.release_on_its_way(r)}
                stale = sorted(unowned & self.unowned.get(name, set()))
                self.unowned[name] = unowned - set(stale)
                if stale:
                    args["release"] = stale
                    logger.info("stale_requests_released", worker=name, wire_ids=stale)
            try:
                h = await self.clients[name].call("health", args, timeout=timeout)
                h["up"] = True
            except (ControlTimeout, ControlError) as e:
                h = {"state": "down", "up": False, "error": str(e)}
            stats = self.stats.get(name, {})
            if h["up"] and stats.get("pid") == h.get("pid"):
                h = {**stats, **h}
            h["last_seen"] = time.time() if h["up"] else worker_state.get(name, {}).get("last_seen")
            worker_state[name] = h

        await asyncio.gather(*(one(n) for n in self.clients))
        return worker_state

    def note_restarts(self) -> bool:
        """Whether a worker answers from another process than before: it holds
        none of the prefix cache's entries."""
        restarted = False
        for name, w in self.engine.worker_state.items():
            if w.get("up") and (pid := w.get("pid")) is not None:
                restarted |= self.pids.get(name, pid) != pid
                self.pids[name] = pid
        return restarted

    def _track_progress(self) -> None:
        """A request moved on if any stage ran more of it since the last
        heartbeat, or is running a step of it now."""
        requests = self.engine.requests
        now = time.monotonic()
        offsets: dict[tuple[str, str], int] = {}
        for name, w in self.engine.worker_state.items():
            for wire_id, offset in w.get("active") or []:
                offsets[(name, wire_id)] = offset
                req = requests.get(wire_id)
                if req is not None and self.offsets.get((name, wire_id)) != offset:
                    req.progress_at = now
            busy = w.get("busy") or {}
            for wire_id in busy.get("requests", []):
                if (req := requests.get(wire_id)) is not None:
                    req.progress_at = now
            if busy.get("for_s", 0) > self.engine.cfg.runtime.liveness_timeout_s:
                since = round(time.time() - busy["for_s"])
                if self.busy_reported.get(name) != since:  # once per long step
                    self.busy_reported[name] = since
                    logger.warning("worker_busy", worker=name, **busy)
        self.offsets = offsets

    async def _act_on_stalls(self) -> None:
        """A request no stage has moved on for request_stall_timeout_s (a lost
        message, a forged release) is replayed once, then fails."""
        engine = self.engine
        limit = engine.cfg.runtime.request_stall_timeout_s
        now = time.monotonic()
        for req in list(engine.requests.values()):
            if req.finish_reason is not None or req.paused or now - req.progress_at <= limit:
                continue
            log.bind_request(req.id)
            if req.stall_replays >= STALL_REPLAYS:
                logger.error(
                    "request_stalled", wire_id=req.wire_id, action="fail", stalled_s=round(now - req.progress_at, 1)
                )
                req.finish_reason = "error"
                engine.metrics["requests_failed"] += 1
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
                await engine.replay(req)
        log.bind_request(None)

    async def _recover(self) -> None:
        """Every stage is back: drop what the stages hold of in-flight requests
        and replay each one (prompt plus the tokens generated so far)."""
        engine = self.engine
        reqs = [r for r in engine.requests.values() if r.paused]
        logger.info("workers_back", replaying=len(reqs), down_s=round(time.monotonic() - (self.down_since or 0), 3))
        engine.state = "ready"
        self.down_since = None
        for req in reqs:
            if req.finish_reason is not None:  # finished while stages were down
                continue
            await engine.replay(req)
        log.bind_request(None)
