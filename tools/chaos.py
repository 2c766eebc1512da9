"""A chaos soak: a three-stage cluster of real processes serves streams
without pause while faults hit it, then says what broke.

    python tools/chaos.py [--minutes 10] [--streams 20] [--json chaos.json]

Faults, one every --every seconds, in turn:
  disconnect  clients drop a quarter of the streams at a random point (always on)
  sigstop     a worker frozen (SIGSTOP) while it runs a prompt chunk, 2-8 s, then SIGCONT
  kill9       a worker killed (SIGKILL) while requests decode, restarted 1-3 s later
  forge       a release for a live request sent to the first stage's data socket
              by a stranger (no CURVE), at most once per request
  linkcut     the middle worker runs in a network namespace of its own behind a
              veth pair; the link goes down for 5-20 s (needs root and `ip netns`;
              without them the middle worker runs on loopback and this is skipped)

At the end: HTTP statuses (500s), error events, streams that never ended
(stranded), completed outputs token-identical to an undisturbed run of the
same prompt, stage slots still held, and every daemon's RSS at the start and
the end. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kimizmq import wire  # noqa: E402
from kimizmq.control import ControlError, ControlTimeout, call_once  # noqa: E402
from kimizmq.local import LocalCluster, _cmd, write_config  # noqa: E402
from kimizmq.testmodel import make_test_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NETNS = "kimizmq-chaos"
VETH_HOST, VETH_NS = "kzchaos0", "kzchaos1"
HOST_IP, NS_IP = "10.231.77.1", "10.231.77.2"
N_TOKENS = 32
STREAM_TIMEOUT_S = 300.0  # a stream with no end by then is stranded
DRAIN_TIMEOUT_S = 120.0  # for the slots to be free after the last stream
CONTROL_TIMEOUT_S = 3.0
RSS_EVERY_S = 30.0
RUNTIME = {
    "prefill_chunk": 8,
    "max_context": 1024,
    "max_concurrent": 8,
    "heartbeat_interval_s": 0.5,
    "liveness_timeout_s": 3.0,
    "request_stall_timeout_s": 15.0,
    "recovery_timeout_s": 120.0,
}
PROMPTS = [[3 + i, 40 + 9 * i, 17, 300 + i, 5, 99] + [500 + 3 * i] * (10 + 7 * (i % 5)) for i in range(12)]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def make_netns() -> bool:
    """A namespace joined to this one by a veth pair; False where that is not allowed."""
    drop_netns()
    try:
        sh("ip", "netns", "add", NETNS)
        sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS)
        sh("ip", "link", "set", VETH_NS, "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", VETH_HOST)
        sh("ip", "link", "set", VETH_HOST, "up")
        for cmd in (
            ("ip", "addr", "add", f"{NS_IP}/24", "dev", VETH_NS),
            ("ip", "link", "set", VETH_NS, "up"),
            ("ip", "link", "set", "lo", "up"),
        ):
            sh("ip", "netns", "exec", NETNS, *cmd)
        return True
    except (OSError, subprocess.CalledProcessError):
        drop_netns()
        return False


def drop_netns() -> None:
    for cmd in (("ip", "link", "del", VETH_HOST), ("ip", "netns", "del", NETNS)):
        subprocess.run(cmd, capture_output=True)


class ChaosCluster(LocalCluster):
    """A LocalCluster whose worker `ns_worker` runs inside the namespace."""

    ns_worker: str | None = None

    def start_worker(self, name: str) -> subprocess.Popen:
        if name != self.ns_worker:
            return super().start_worker(name)
        args = ["ip", "netns", "exec", NETNS, *_cmd("worker"), "--config", str(self.config_path), "--name", name]
        p = self._spawn(args, f"worker-{name}")
        self.workers[name] = p
        return p


def write_chaos_config(folder: Path, model: Path, netns: bool) -> Path:
    """Three workers; with `netns`, w1 on the namespace's address and everything
    else on the host end of the veth pair."""
    path = write_config(folder / "kimi.toml", model, 3, runtime=RUNTIME)
    if netns:
        text = path.read_text().replace('host = "127.0.0.1"', f'host = "{HOST_IP}"')
        head, w1, tail = text.partition('name = "w1"\n' + f'host = "{HOST_IP}"')
        text = head + w1.replace(HOST_IP, NS_IP) + tail
        text = text.replace("[coordinator]\n", '[coordinator]\napi_host = "127.0.0.1"\n', 1)
        path.write_text(text)
    return path


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def stream_once(api: str, prompt: list[int], stop_after: int | None) -> dict:
    """One streamed greedy completion: its status, token ids, error event."""
    body = {"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    req = urllib.request.Request(
        api + "/v1/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    ids: list[int] = []
    try:
        with urllib.request.urlopen(req, timeout=STREAM_TIMEOUT_S) as r:
            for i, raw in enumerate(r):
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    return {"status": 200, "ids": ids, "done": True}
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"status": 200, "ids": ids, "error": chunk["error"].get("message")}
                for c in chunk["choices"]:
                    if c.get("logprobs"):
                        ids += c["logprobs"]["token_ids"]
                if stop_after is not None and i >= stop_after:
                    return {"status": 200, "ids": ids, "cut": True}
        return {"status": 200, "ids": ids, "error": "stream ended without [DONE]"}
    except urllib.error.HTTPError as e:
        retry = float(e.headers.get("Retry-After") or 1.0)
        return {"status": e.code, "ids": ids, "error": e.read().decode(errors="replace")[:300], "retry_after": retry}
    except TimeoutError:
        return {"status": 200, "ids": ids, "stranded": True}
    except (OSError, ValueError) as e:
        return {"status": 0, "ids": ids, "error": f"{type(e).__name__}: {e}"}


class Soak:
    def __init__(self, cluster: ChaosCluster, minutes: float, streams: int, every: float, seed: int, netns: bool):
        self.cluster = cluster
        self.deadline = time.monotonic() + minutes * 60
        self.streams = streams
        self.every = every
        self.rng = random.Random(seed)
        self.netns = netns
        self.reference: list[list[int]] = []
        self.results: list[dict] = []
        self.faults: Counter = Counter()
        self.fault_log: list[dict] = []
        self.forged: set[str] = set()
        self.lock = threading.Lock()
        self.rss: dict[str, list[tuple[float, int, int]]] = {}  # daemon -> (at s, pid, RSS KiB)

    def control(self, name: str, cmd: str) -> dict:
        return call_once(self.cluster.cfg.worker(name).control_address, cmd, timeout_s=CONTROL_TIMEOUT_S, name=name)

    def health(self, name: str) -> dict | None:
        with contextlib.suppress(ControlError, ControlTimeout):
            return self.control(name, "health")
        return None

    # -- clients ------------------------------------------------------------------

    def client(self, k: int) -> None:
        rng = random.Random(k)
        while time.monotonic() < self.deadline:
            p = rng.randrange(len(PROMPTS))
            cut = rng.randint(0, 6) if rng.random() < 0.25 else None
            t0 = time.monotonic()
            out = stream_once(self.cluster.api, PROMPTS[p], cut)
            out.update(prompt=p, seconds=round(time.monotonic() - t0, 2))
            if out["status"] in (429, 503):
                time.sleep(out.get("retry_after", 1.0))  # as the answer's Retry-After says
            if out.get("done"):
                out["identical"] = out["ids"] == self.reference[p]
            with self.lock:
                self.results.append(out)

    # -- faults -------------------------------------------------------------------

    def wait_for(self, condition, timeout: float = 30.0):
        end = time.monotonic() + timeout
        while time.monotonic() < min(end, self.deadline):
            if value := condition():
                return value
            time.sleep(0.02)
        return None

    def sigstop(self) -> None:
        name = self.rng.choice(list(self.cluster.workers))
        # a prompt chunk: more tokens in the step than requests
        busy = self.wait_for(
            lambda: (h := self.health(name)) and (b := h.get("busy")) and b["tokens"] > len(b["requests"]) and b
        )
        if not busy:
            return
        p = self.cluster.workers[name]
        hold = self.rng.uniform(2, 8)
        p.send_signal(signal.SIGSTOP)
        time.sleep(hold)  # the fault itself: how long the worker stays frozen
        p.send_signal(signal.SIGCONT)
        self.note("sigstop", worker=name, during=busy, held_s=round(hold, 1))

    def kill9(self) -> None:
        name = self.rng.choice(list(self.cluster.workers))
        if not self.wait_for(lambda: (h := self.health(name)) and h.get("active")):
            return
        p = self.cluster.workers[name]
        p.kill()
        p.wait()
        down = self.rng.uniform(1, 3)
        time.sleep(down)  # the fault itself: how long the worker stays dead
        self.cluster.start_worker(name)
        self.note("kill9", worker=name, down_s=round(down, 1))

    def forge(self) -> None:
        h = self.wait_for(lambda: (h := self.health("w1")) and h.get("active") and h)
        if not h:
            return
        fresh = [r for r, _ in h["active"] if r.split("~")[0] not in self.forged]
        if not fresh:
            return
        wire_id = self.rng.choice(fresh)
        self.forged.add(wire_id.split("~")[0])
        import zmq

        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self.cluster.cfg.worker("w0").data_address)
        push.send_multipart(wire.encode("release", {"req": wire_id}))
        push.close()
        self.note("forge", wire_id=wire_id)

    def linkcut(self) -> None:
        if not self.netns:
            return
        cut = self.rng.uniform(5, 20)
        sh("ip", "link", "set", VETH_HOST, "down")
        try:
            time.sleep(cut)  # the fault itself: how long the link stays down
        finally:
            sh("ip", "link", "set", VETH_HOST, "up")
        self.note("linkcut", worker="w1", down_s=round(cut, 1))

    def note(self, kind: str, **what) -> None:
        self.faults[kind] += 1
        self.fault_log.append({"fault": kind, "at_s": round(time.monotonic() - self.started, 1), **what})
        print(f"  fault {kind} {what}", flush=True)

    def injector(self) -> None:
        kinds = [self.sigstop, self.kill9, self.forge, self.linkcut]
        i = 0
        while time.monotonic() < self.deadline - 30:  # the last half-minute without faults
            wait = self.every * self.rng.uniform(0.5, 1.5)
            if time.monotonic() + wait > self.deadline - 30:
                return
            time.sleep(wait)  # between faults: the soak's pace, not a wait for a condition
            kinds[i % len(kinds)]()
            i += 1

    # -- the run ------------------------------------------------------------------

    def pids(self) -> dict[str, int]:
        out = {n: p.pid for n, p in self.cluster.workers.items()}
        out["coordinator"] = self.cluster.coordinator.pid
        return out

    def sample_rss(self) -> None:
        at = round(time.monotonic() - self.started, 1)
        for name, pid in self.pids().items():
            if (kib := rss_kib(pid)) is not None:
                self.rss.setdefault(name, []).append((at, pid, kib))

    def rss_sampler(self, stop: threading.Event) -> None:
        while not stop.wait(RSS_EVERY_S):
            self.sample_rss()

    def rss_summary(self) -> dict:
        """Per daemon, over its current process's life: RSS (MiB) at the first
        sample, the last, and the most."""
        out = {}
        for name, samples in self.rss.items():
            pid = samples[-1][1]
            mine = [kib for _, p, kib in samples if p == pid]
            out[name] = {
                "first_mib": round(mine[0] / 1024, 1),
                "last_mib": round(mine[-1] / 1024, 1),
                "max_mib": round(max(mine) / 1024, 1),
                "samples": len(mine),
            }
        return out

    def run(self) -> dict:
        self.reference = [stream_once(self.cluster.api, p, None)["ids"] for p in PROMPTS]
        assert all(len(r) == N_TOKENS for r in self.reference), "the undisturbed run did not complete"
        self.started = time.monotonic()
        self.sample_rss()
        stop = threading.Event()
        sampler = threading.Thread(target=self.rss_sampler, args=(stop,), daemon=True)
        sampler.start()
        clients = [threading.Thread(target=self.client, args=(k,), daemon=True) for k in range(self.streams)]
        for t in clients:
            t.start()
        self.injector()
        for t in clients:
            t.join(STREAM_TIMEOUT_S + 60)
        hung = sum(t.is_alive() for t in clients)
        held = self.wait_for_free()
        status, health = self.cluster.health()
        stop.set()
        self.sample_rss()
        r = self.results
        done = [x for x in r if x.get("done")]
        return {
            "minutes": round((time.monotonic() - self.started) / 60, 2),
            "streams": self.streams,
            "requests": len(r),
            "completed": len(done),
            "client_disconnects": sum(bool(x.get("cut")) for x in r),
            "identical": sum(x["identical"] for x in done),
            "not_identical": sum(not x["identical"] for x in done),
            "http_statuses": dict(Counter(x["status"] for x in r)),
            "http_500": sum(x["status"] == 500 for x in r),
            "error_events": sum(bool(x.get("error")) and x["status"] == 200 for x in r),
            "errors": Counter(x["error"][:120] for x in r if x.get("error")).most_common(5),
            "stranded": sum(bool(x.get("stranded")) for x in r) + hung,
            "slots_held_at_end": held,
            "health_at_end": {"status": status, "in_flight": health.get("requests_in_flight")},
            "faults": dict(self.faults),
            "fault_log": self.fault_log,
            "rss": self.rss_summary(),
            "rss_samples": self.rss,  # daemon -> [at s, pid, RSS KiB]
        }

    def wait_for_free(self) -> dict[str, list[str]]:
        """Every stage's held request ids, once none holds any or DRAIN_TIMEOUT_S passed."""
        end = time.monotonic() + DRAIN_TIMEOUT_S
        held: dict[str, list[str]] = {}
        while time.monotonic() < end:
            held = {}
            for name in self.cluster.workers:
                h = self.health(name)
                held[name] = ["?"] if h is None else [r for r, _ in h.get("active", [])]
            if not any(held.values()):
                return {}
            time.sleep(0.5)
        return {n: ids for n, ids in held.items() if ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the faults go on")
    ap.add_argument("--streams", type=int, default=20, help="concurrent clients")
    ap.add_argument("--every", type=float, default=25.0, help="mean seconds between faults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("chaos.json"))
    ap.add_argument("--no-netns", action="store_true", help="run every worker on loopback (no link cut)")
    args = ap.parse_args()

    model = make_test_model(REPO / "models" / "test-kimi-k2-tiny-seed0-layers7", seed=0, num_layers=7)
    netns = not args.no_netns and make_netns()
    print(f"link cut: {'network namespace' if netns else 'skipped (no network namespace)'}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="kimizmq-chaos-"))
    try:
        cluster = ChaosCluster(write_chaos_config(tmp, model, netns))
        cluster.ns_worker = "w1" if netns else None
        with cluster:
            report = Soak(cluster, args.minutes, args.streams, args.every, args.seed, netns).run()
    finally:
        if netns:
            drop_netns()
    clean = not (report["http_500"] or report["stranded"] or report["not_identical"] or report["slots_held_at_end"])
    if clean:
        shutil.rmtree(tmp)
    else:
        print(f"the daemons' logs are kept in {tmp}")
    args.json.write_text(json.dumps(report, indent=2))
    width = max(len(k) for k in report)
    for key, value in report.items():
        if key not in ("fault_log", "rss_samples"):
            print(f"{key:<{width}}  {value}")
    print(f"(written to {args.json})")


if __name__ == "__main__":
    main()
