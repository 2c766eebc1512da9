"""kimi-worker: one daemon per Mac, holding one contiguous range of layers.

Sockets (the inbound ones created and configured in `Worker.__init__`):
  control  ROUTER bound   commands from the coordinator (ping, health, load, ...),
                          served by their own thread (controlthread.py: ping
                          and health answered even mid-step)
  commands PAIR  inproc   the control thread hands the main loop what it must run
  data     PULL  bound    token ids / activations from the previous stage
  (links.py: the outgoing ones, connected at every load)
  next     PUSH  connect  activations to the next stage, or tokens to the coordinator
  loop     PUSH  connect  last stage only: each sampled token, straight back to
                          the first stage as the next decode step (a single
                          stage keeps it in process)
  report   PUSH  connect  errors for the coordinator, from any stage

Decode runs around the ring without the coordinator (the last stage's end is
tokenring.py). The coordinator only streams text, and ends a request early
(stop string, client gone) by releasing it: steps still on the ring then find
it gone and are dropped. How arriving messages become batches is batching.py;
a load (memory check, the shard read a module at a time, the stage built) is
loading.py, which this loop drives.

The loop reads top to bottom: poll with a timeout, answer a command, apply
releases, run the waiting data messages, send the runs of tokens that are
due, read one more module of a load in progress, evict requests idle too
long, repeat: loading shares the loop (and its thread, as MLX wants).
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Generator

import click
import mlx.core as mx
import zmq

from . import log, security, wire
from .batching import admit, drain, micro_batches, opens
from .config import Config, ConfigError, WorkerConfig, load_config
from .control import keep_alive
from .controlthread import ControlThread, split_envelope
from .links import DATA_HWM, Links
from .loading import LOAD_ERRORS, load_stage
from .loadspec import LoadSpec
from .prefixcache import PrefixStore
from .stage import Stage, StageError, Step
from .tokenring import TokenRing
from .versions import version_option

POLL_MS = 100
EVICT_SWEEP_S = 5.0  # how often idle requests are looked for
LOG_CHUNK_BYTES = 48 * 1024  # of log per `logs` reply: a reply header stays under 64 KiB
# Released, cancelled and finished ids are tombstoned, so anything still on its
# way for them is dropped at any offset: for TOMBSTONE_S at least (far longer
# than a message stays queued), and at most MAX_TOMBSTONES of them.
TOMBSTONE_S = 600.0
MAX_TOMBSTONES = 1 << 16
MAX_HEALTH_RELEASES = 1024  # ids one `health` may release

logger = log.get_logger()


class Worker:
    def __init__(self, cfg: Config, me: WorkerConfig):
        self.cfg = cfg
        self.me = me
        self.counters = {
            "bad_messages": 0,
            "stage_errors": 0,
            "requests_started": 0,
            "tokens_sampled": 0,
            "token_messages": 0,  # runs of tokens sent to the coordinator
            "loads": 0,
            "dropped_after_release": 0,
            "admissions_deferred": 0,  # newcomers that waited for a full stage to free a slot
            "long_steps": 0,  # steps longer than runtime.liveness_timeout_s
            "coordinator_not_reading": 0,
            "split_waves": 0,  # first stage: waves sent on as one batch per stage
            "partner_waits": 0,  # rounds that waited for the rest of a kept batch
            "partner_waits_expired": 0,  # of those, the rest did not all come in PARTNER_WAIT_S
        }
        self.curve = security.Curve.for_daemon(cfg, me.name, peers=(security.COORDINATOR,))
        self.ctx = zmq.Context()
        if self.curve is not None:
            self.curve.start(self.ctx)  # before bind: refused peers never reach the sockets
        self.control = self.ctx.socket(zmq.ROUTER)
        self.data = self.ctx.socket(zmq.PULL)
        for s in (self.control, self.data):
            s.setsockopt(zmq.LINGER, 0)
            keep_alive(s, heartbeats=self.curve is None)
            s.setsockopt(zmq.RCVHWM, DATA_HWM)
            s.setsockopt(zmq.MAXMSGSIZE, wire.DEFAULT_MAX_TENSOR_BYTES + wire.MAX_HEADER_BYTES)
            if self.curve is not None:
                self.curve.server(s)
        self.control.setsockopt(zmq.MAXMSGSIZE, wire.MAX_HEADER_BYTES)  # commands carry no tensors
        self.links = Links(self.ctx, cfg, self.curve)
        # the control thread owns `control` from here on
        self.control_thread = ControlThread(self.ctx, self.control, self, me.name, self.counters)
        self.commands = self.control_thread.commands
        try:
            self.control.bind(me.control_address)
            self.data.bind(me.data_address)
        except zmq.ZMQError:
            # Leave nothing open: a context with live sockets (or a running ZAP
            # thread) blocks the interpreter's exit, and the worker hung there.
            self.close()
            raise
        self.pending: list[wire.Message] = []  # decode steps a single stage fed itself
        self.deferred: list[wire.Message] = []  # a full stage's newcomers, waiting their turn
        self.waiting: set[str] = set()  # their ids
        self.released: OrderedDict[str, float] = OrderedDict()  # tombstones: id -> when
        self.to_release: queue.SimpleQueue[str] = queue.SimpleQueue()  # from the control thread
        # What the main loop computes now (read by the control thread): None or
        # {"what", "requests", "offsets", "tokens", "since"}.
        self.doing: dict | None = None

        self.state = "idle"  # idle | loading | ready | error
        self.error: str | None = None
        self.spec: LoadSpec | None = None
        self.stage: Stage | None = None
        self.progress = {"done_bytes": 0, "total_bytes": 0, "rate_bytes_s": 0.0}
        self.loader: Generator[dict, None, None] | None = None  # a load in progress, run between messages
        self.started = time.time()
        self.ring = TokenRing(cfg.runtime.stream_interval_ms / 1e3, self.counters, self.links.send, self._to_first)
        self.running = True
        self._last_sweep = time.monotonic()
        self.cache_limit = None  # MLX's default
        if cfg.runtime.cache_limit_gb >= 0:
            self.cache_limit = int(cfg.runtime.cache_limit_gb * 2**30)
            mx.set_cache_limit(self.cache_limit)

    # -- lifecycle --------------------------------------------------------------

    def close(self) -> None:
        self.control_thread.close()
        self.links.close()
        self.data.close(linger=0)
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()

    def run(self) -> None:
        self.control_thread.start()
        poller = zmq.Poller()
        poller.register(self.commands, zmq.POLLIN)
        poller.register(self.data, zmq.POLLIN)
        logger.info(
            "worker_started",
            control=self.me.control_address,
            data=self.me.data_address,
            pid=os.getpid(),
            cache_limit_bytes=self.cache_limit,
        )
        log.announce(
            f"kimi-worker {self.me.name}: listening on {self.me.control_address} (control), "
            f"{self.me.data_address} (data); waiting for the coordinator"
        )
        while self.running:
            busy = self.loader is not None or self.pending
            events = dict(poller.poll(0 if busy else self.ring.poll_ms(POLL_MS)))
            if self.commands in events:
                envelope, frames = split_envelope(self.commands.recv_multipart())
                self.commands.send_multipart(envelope + self.control_thread.answer(frames))
            self._apply_queued_releases()
            if self.data in events or self.pending or self.deferred:
                batch, self.pending = self.pending, []
                if self.data in events:
                    batch += drain(self.data, self.stage, batch, self.counters)
                batch, self.deferred = self.deferred + batch, []  # the waiting first, in order
                self.handle_data(*batch)
            self.ring.flush()
            if self.loader is not None:
                self._load_step()
            self._evict_idle()
        logger.info("worker_stopped")

    def _apply_queued_releases(self) -> None:
        """Releases the coordinator's reconciliation asked for (through
        `health`): applied before this round admits anything."""
        while True:
            try:
                req = self.to_release.get_nowait()
            except queue.Empty:
                return
            if req not in self.released or (self.stage and req in self.stage.requests):
                log.bind_request(req)
                logger.info("request_reconciled", had_cache=self._forget(req))
                log.bind_request(None)

    def _evict_idle(self) -> None:
        """Free the caches of requests nobody has driven for a long time (a
        coordinator that died mid-request, a peer that opened one and left)."""
        now = time.monotonic()
        if self.stage is None or now - self._last_sweep < EVICT_SWEEP_S:
            return
        self._last_sweep = now
        for req, state in list(self.stage.requests.items()):
            if now - state.last_used > self.cfg.runtime.request_idle_timeout_s:
                self._forget(req)
                log.bind_request(req)
                logger.warning("request_evicted", idle_s=round(now - state.last_used, 1))
                log.bind_request(None)

    # -- commands (controlthread.py runs them) ---------------------------------------

    def cmd_ping(self, args: dict) -> dict:
        return {"name": self.me.name, "state": self.state, "pid": os.getpid(), "time": time.time()}

    def cmd_health(self, args: dict) -> dict:
        """Answered by the control thread, also while the main loop computes:
        reads only what one assignment replaces whole, or copies first.
        `release`: ids the coordinator does not own (any this stage still
        holds is freed before the main loop's next admission)."""
        release = args.get("release", [])
        if not isinstance(release, list) or len(release) > MAX_HEALTH_RELEASES:
            raise ValueError(f"health: release must be a list of at most {MAX_HEALTH_RELEASES} request ids")
        if not all(isinstance(r, str) and 0 < len(r) <= wire.MAX_ID_CHARS for r in release):
            raise ValueError("health: release must hold request ids (strings)")
        for req in release:
            self.to_release.put(req)
        out = self.cmd_ping(args)
        stage, spec, doing = self.stage, self.spec, self.doing
        active = stage.requests.copy() if stage else {}
        busy = None
        if doing is not None:
            busy = {k: v for k, v in doing.items() if k != "since"}
            busy["for_s"] = round(time.monotonic() - doing["since"], 3)
        out.update(
            error=self.error,
            progress=dict(self.progress),
            layers=[spec.start, spec.end] if spec else None,
            requests=len(active),
            max_requests=stage.max_requests if stage else 0,
            active=[[req, state.offset] for req, state in active.items()],
            busy=busy,
            memory_bytes=mx.get_active_memory(),
            uptime_s=time.time() - self.started,
        )
        return out

    def cmd_stats(self, args: dict) -> dict:
        out = self.cmd_health(args)
        stage = self.stage
        out.update(
            self.counters,
            active_requests=sorted(stage.requests) if stage else [],
            forwards=stage.forwards if stage else 0,
            tokens_in=stage.tokens_in if stage else 0,
            compute_s=stage.compute_s if stage else 0.0,
            decode_compute_s=stage.decode_s if stage else 0.0,
            decode_build_s=stage.decode_build_s if stage else 0.0,
            batched_forwards=stage.batched_forwards if stage else 0,
            batched_steps=stage.batched_steps if stage else 0,
            batched_prompt_steps=stage.batched_prompt_steps if stage else 0,
            kept_batch_steps=stage.kept_batch_steps if stage else 0,
            compiled_decode=bool(stage and stage.compiled_decode),
            **(stage.prefix.stats() if stage else PrefixStore(0).stats()),
            cache_bytes=stage.cache_bytes() if stage else 0,
            weight_bytes=stage.shard.nbytes if stage else 0,
            peak_memory_bytes=mx.get_peak_memory(),
            cache_memory_bytes=mx.get_cache_memory(),  # freed, kept for reuse (runtime.cache_limit_gb)
        )
        return out

    def cmd_load(self, args: dict) -> dict:
        spec = LoadSpec.from_args(args, self.cfg)
        if self.curve is not None:  # a missing key refuses the load before anything changes
            for address in spec.peers:
                self.curve.server_key_at(address)
        same = self.spec is not None and (self.spec.start, self.spec.end) == (spec.start, spec.end)
        if same and self.state in ("loading", "ready"):
            # Idempotent: a repeated load (lost reply, restarted coordinator) keeps the shard.
            self._connect(spec)
            self.spec = spec
            if self.stage is not None:
                self.stage.prefix.budget_bytes = spec.prefix_cache_bytes
            return self.cmd_health({})
        if self.state == "loading":
            raise ValueError("a different shard is still loading; unload first")
        self._unload()
        self.spec = spec
        self.state = "loading"
        self.error = None
        self.counters["loads"] += 1
        self._connect(spec)
        self.loader = self._load(spec)
        return self.cmd_health({})

    def cmd_unload(self, args: dict) -> dict:
        if self.state == "loading":
            raise ValueError("still loading; unload when the load has finished")
        self._unload()
        return self.cmd_health({})

    def cmd_release(self, args: dict) -> dict:
        req = args.get("req")
        if not isinstance(req, str):
            raise ValueError("release needs req")
        return {"released": self._forget(req)}

    def cmd_logs(self, args: dict) -> dict:
        """Complete lines of this worker's log from byte `offset` on, at most
        LOG_CHUNK_BYTES of them: how `kimi logs` on another Mac reads it."""
        offset = args.get("offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError("logs: offset must be an integer >= 0")
        return log.read_lines(log.log_path(self.cfg.log_dir, f"worker-{self.me.name}"), offset, LOG_CHUNK_BYTES)

    def cmd_shutdown(self, args: dict) -> dict:
        self.running = False
        return {"state": "stopping"}

    def _unload(self) -> None:
        self.stage = None
        self.spec = None
        self.pending = []
        self.ring.clear()
        self.state = "idle"
        self.progress = {"done_bytes": 0, "total_bytes": 0, "rate_bytes_s": 0.0}
        mx.clear_cache()

    def _connect(self, spec: LoadSpec) -> None:
        self.links.connect(spec)
        self.ring.coordinator = self.links.next  # the last stage's next is the coordinator

    def _load_step(self) -> None:
        """Read the next module of a load in progress."""
        try:
            self.progress = next(self.loader)
        except StopIteration:
            self.loader = None

    def _load(self, spec: LoadSpec) -> Generator[dict, None, None]:
        """Load the shard a module per loop round (loading.py), then serve it
        as this worker's stage."""
        t0 = time.monotonic()
        try:
            self.stage = yield from load_stage(self.cfg, self.me.name, spec)
        except LOAD_ERRORS as e:
            self.error = str(e)
            self.state = "error"
            logger.error("load_failed", error=str(e))
            return
        self.state = "ready"
        log.announce(
            f"kimi-worker {self.me.name} ready: layers [{spec.start}, {spec.end}), "
            f"{self.stage.shard.nbytes / 2**30:.2f} GiB of weights loaded in {time.monotonic() - t0:.1f} s; "
            f"control {self.me.control_address}, data {self.me.data_address}"
        )
        logger.info(
            "load_finished",
            seconds=round(time.monotonic() - t0, 3),
            bytes=self.stage.shard.nbytes,
            compiled_decode=self.stage.compiled_decode,
        )

    # -- data -------------------------------------------------------------------

    def _report_error(self, req: str, message: str, code: str | None = None) -> None:
        self.counters["stage_errors"] += 1
        logger.warning("stage_error", error=message)
        header = {"req": req, "message": f"{self.me.name}: {message}", **({"code": code} if code else {})}
        self.links.send(self.links.report, wire.encode("error", header), "report")

    def handle_data(self, *batch) -> None:
        """Decode and check the data messages, then run them as rounds: a drop
        ends one, so it applies exactly where it arrived."""
        segment: list[wire.Message] = []
        for frames in batch:
            try:
                msg = frames if isinstance(frames, wire.Message) else wire.decode(frames)
            except wire.WireError as e:
                self.counters["bad_messages"] += 1
                logger.warning("bad_data_message", error=str(e))
                continue
            try:
                if msg.kind == "drop":
                    # In order: what came before it still finds its entries, and
                    # the release it makes room for (behind it) finds the room.
                    entries = wire.check_drop(msg.header)
                    self._run_round(segment)
                    segment = []
                    self._drop_prefixes(entries, msg.header)
                    continue
                if msg.kind not in ("forward", "release"):
                    raise wire.WireError(f"unexpected kind {msg.kind} on the data socket")
                if msg.kind == "forward":
                    wire.check_prefix(msg.header)
            except wire.WireError as e:
                self.counters["bad_messages"] += 1
                logger.warning("bad_data_message", error=str(e))
                if msg.kind == "forward":  # its request would wait for nothing: end it
                    self._forget(msg.header["req"])
                    self._report_error(msg.header["req"], str(e))
                continue
            segment.append(msg)
        self._run_round(segment)

    def _run_round(self, msgs: list[wire.Message]) -> None:
        """Run data messages in waves: each request's messages in arrival
        order, the first of every request together, then the second, ... The
        forwards of a wave go to the stage together, so the first prompt chunks
        of prompts that arrived together are one batched pass, as are decode
        steps of requests in flight together."""
        queues: dict[str, list[wire.Message]] = {}
        for msg in msgs:
            queues.setdefault(msg.header["req"], []).append(msg)
        # Releases first: they free room before this round admits anyone, and
        # whatever else the batch holds for a released request is dead.
        for req, q in list(queues.items()):
            releases = [m for m in q if m.kind == "release"]
            if releases:
                self.counters["dropped_after_release"] += len(q) - len(releases)
                del queues[req]
                self._release(req, next((m.header["keep"] for m in releases if "keep" in m.header), None))
        while queues:
            wave = [q.pop(0) for q in queues.values()]
            queues = {req: q for req, q in queues.items() if q}
            parts = micro_batches(self.stage, wave, self.spec.stages) if self.stage else [wave]
            self.counters["split_waves"] += len(parts) > 1
            for part in parts:
                self._forward(part)

    def _release(self, req: str, keep: str | None = None) -> None:
        log.bind_request(req)
        released = self._forget(req, keep)
        logger.info("request_released", had_cache=released, **({"kept_as": keep} if keep else {}))
        if self.stage is not None and not self.stage.last:
            self.links.send(
                self.links.next, wire.encode("release", {"req": req, **({"keep": keep} if keep else {})}), "next"
            )
        log.bind_request(None)

    def _drop_prefixes(self, entries: list[str] | None, header: dict) -> None:
        """The coordinator evicted these prefix cache entries (None: all):
        every stage forgets them; this one passes the `drop` (`header`) on."""
        dropped = self.stage.prefix.drop(entries) if self.stage else 0
        logger.info("prefix_entries_dropped", entries="all" if entries is None else len(entries), held=dropped)
        if self.stage is not None and not self.stage.last:
            self.links.send(self.links.next, wire.encode("drop", header), "next")

    def _forget(self, req: str, keep: str | None = None) -> bool:
        """Free a request's cache and tombstone the id: its steps still on the
        ring, or queued anywhere, are dropped quietly. True if this stage held
        it. `keep`: the prefix cache keeps its state under that entry id, and
        the coordinator hears what was kept (nothing: length 0)."""
        now = time.monotonic()
        self.released.pop(req, None)
        self.released[req] = now
        self.ring.forget(req)
        self.pending = [m for m in self.pending if m.header["req"] != req]
        self.deferred = [m for m in self.deferred if m.header["req"] != req]
        self.waiting.discard(req)
        while self.released and (
            len(self.released) > MAX_TOMBSTONES or now - next(iter(self.released.values())) > TOMBSTONE_S
        ):
            self.released.popitem(last=False)
        held, kept = self.stage.release(req, keep) if self.stage else (False, None)
        if keep is not None:
            report = {"entry": keep, "worker": self.me.name, "length": 0, "bytes": 0, "trimmable": True}
            if kept is not None:
                report.update(length=kept.length, bytes=kept.nbytes, trimmable=kept.trimmable)
            self.links.send(self.links.report, wire.encode("kept", report), "report")
        return held

    def _forward(self, msgs: list[wire.Message]) -> None:
        if not msgs:
            return
        stage = self.stage
        if self.state != "ready" or stage is None:
            for m in msgs:
                self._report_error(m.header["req"], f"not ready (state {self.state})")
            return
        live = [m for m in msgs if m.header["req"] not in self.released]
        self.counters["dropped_after_release"] += len(msgs) - len(live)  # on their way when the request ended
        msgs, deferred = admit(stage, live, self.waiting, self.counters)
        self.deferred += deferred
        steps = []
        for m in msgs:
            h = m.header
            prefix = wire.check_prefix(h)  # checked on arrival
            if opens(stage, h):
                self.counters["requests_started"] += 1
                logger.info(
                    "request_started",
                    request_id=h["req"],
                    tokens=m.tensors[0].shape[1],  # (1, L) token ids or (1, L, D) activations
                    **({"prefix_tokens": prefix[1]} if prefix else {}),
                )
            step = Step(h["req"], h["offset"], m.tensors[0], h["sample"], h["params"], tuple(m.tensors[1:]), prefix)
            steps.append(step)
        if not msgs:
            return
        t0 = time.monotonic()
        self.doing = {
            "what": "forward",
            "requests": [s.req for s in steps],
            "offsets": [s.offset for s in steps],
            "tokens": sum(s.x.shape[1] for s in steps),
            "since": t0,
        }
        try:
            results = stage.forward_many(steps)
        except Exception as e:  # noqa: BLE001 - a failed forward must not take the daemon down
            logger.exception("forward_failed")
            results = [StageError(f"forward failed: {type(e).__name__}: {e}")] * len(steps)
        finally:
            self.doing = None
        seconds = time.monotonic() - t0
        if seconds > self.cfg.runtime.liveness_timeout_s:
            # Reported, not replayed: the control thread answered throughout.
            self.counters["long_steps"] += 1
            logger.warning(
                "long_step",
                seconds=round(seconds, 3),
                requests=[s.req for s in steps],
                tokens=sum(s.x.shape[1] for s in steps),
            )
        for m, result in zip(msgs, results):
            h = m.header
            if isinstance(result, StageError):
                self._forget(h["req"])  # its steps still on the ring are dropped quietly
                log.bind_request(h["req"])
                self._report_error(h["req"], str(result), result.code)
                log.bind_request(None)
            elif result.activations is not None:
                header = {
                    k: h[k] for k in ("req", "seq", "offset", "sample", "params", "stop_at", "eos", "prefix") if k in h
                }
                tensors = [result.activations, *result.extra]  # + attention-residual blocks (Kimi K3)
                self.links.send(self.links.next, wire.encode("forward", header, tensors), "next")
            elif result.token is not None and not self.ring.deliver(h, m.tensors[0].shape[1], result):
                self._forget(h["req"])  # the coordinator has stopped taking tokens

    def _to_first(self, step: wire.Message) -> bool:
        """The last stage's next decode step to the first stage: in process if
        this stage is also the first, else over the loop socket."""
        if self.stage is not None and self.stage.first:
            self.pending.append(step)
        elif self.links.loop is not None:
            self.links.send(self.links.loop, wire.encode("forward", step.header, step.tensors), "first stage")
        else:
            self._report_error(
                step.header["req"], "cannot continue: the load named no first stage (load argument 'first')"
            )
            return False
        return True


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="etc/kimi.toml")
@click.option("--name", required=True, help="this worker's name in the config")
@click.option("-v", "--verbose", is_flag=True, help="also print every log line on stderr")
@version_option
def main(config_path: str, name: str, verbose: bool) -> None:
    """Run the worker NAME of the cluster config."""
    try:
        cfg = load_config(config_path)
        me = cfg.worker(name)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    log.configure(f"worker-{name}", cfg.log_dir, verbose=verbose)
    try:
        worker = Worker(cfg, me)
    except security.SecurityError as e:
        logger.error("worker_start_failed", error=str(e))
        raise click.ClickException(f"worker {name}: {e}") from None
    except zmq.ZMQError as e:
        logger.error("worker_start_failed", error=str(e))
        raise click.ClickException(
            f"worker {name}: cannot bind {me.control_address} / {me.data_address}: {e}"
        ) from None
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "running", False))
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
