"""`kimi up` and `kimi down`: the whole cluster from its one config.

`up` checks every machine first (reachable, the program there, the same
kimizmq, MLX and protocol versions, wired memory on macOS), copies the config
to each, starts each worker and the coordinator in the background (nohup,
output next to the config there), and waits for the coordinator's /health.
What it started (machine, pid, command) is written to `<log dir>/up.json`;
`down` stops exactly those processes, checking each pid still runs that
command, and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import wired
from .config import Config, SshConfig
from .remote import Machine, RemoteError, sh_path
from .versions import version_text

T = TypeVar("T")
STATE_FILE = "up.json"
POLL_S = 0.5
ALIVE_CHECK_S = 2.0  # how often `up` asks each machine whether its daemons still run
PROGRESS_EVERY_S = 10.0
HEALTH_TIMEOUT_S = 5.0
STOP_WAIT_TENTHS = 150  # `down` waits 15 s for a daemon to exit before SIGKILL
OUTPUT_TAIL_LINES = 15


@dataclass(frozen=True)
class Daemon:
    role: str  # "worker" or "coordinator"
    name: str  # the worker's name, or "coordinator"
    ssh: SshConfig | None
    config: str  # the config's path on its machine
    host: str  # the address it serves on

    @property
    def machine(self) -> Machine:
        return Machine(self.ssh)

    @property
    def label(self) -> str:
        where = self.machine.label if self.ssh is not None else "this machine"
        return f"{self.role} {self.name!r} on {where}" if self.role == "worker" else f"the coordinator on {where}"

    @property
    def program(self) -> str:
        if self.ssh is not None:
            return self.ssh.command or f"kimi-{self.role}"
        beside = Path(sys.executable).parent / f"kimi-{self.role}"  # this installation's, PATH or not
        return str(beside) if beside.exists() else f"kimi-{self.role}"

    @property
    def args(self) -> str:
        name = f" --name {shlex.quote(self.name)}" if self.role == "worker" else ""
        return f"--config {sh_path(self.config)}{name}"

    @property
    def output(self) -> str:
        """The daemon's stdout and stderr there, next to its config."""
        folder = self.config.rsplit("/", 1)[0] or "/"
        return (
            f"{folder}/kimi-{self.role}-{self.name}.out" if self.role == "worker" else f"{folder}/kimi-coordinator.out"
        )

    def env_prefix(self) -> str:
        env = dict(self.ssh.env) if self.ssh else {}
        return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " if env else ""

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "ssh": dataclasses.asdict(self.ssh) if self.ssh else None}

    @classmethod
    def from_json(cls, d: dict) -> Daemon:
        ssh = d.get("ssh")
        if ssh is not None:
            ssh = SshConfig(**{**ssh, "options": tuple(ssh["options"]), "env": tuple(map(tuple, ssh["env"]))})
        return cls(d["role"], d["name"], ssh, d["config"], d["host"])


def daemons(cfg: Config) -> list[Daemon]:
    """The cluster's daemons: every worker, then the coordinator."""
    here = str(cfg.path)
    out = [Daemon("worker", w.name, w.ssh, (w.ssh.config if w.ssh else "") or here, w.host) for w in cfg.workers]
    c = cfg.coordinator
    out.append(Daemon("coordinator", "coordinator", c.ssh, (c.ssh.config if c.ssh else "") or here, c.host))
    return out


def api_url(cfg: Config) -> str:
    c = cfg.coordinator
    host = c.host if c.api_host in ("0.0.0.0", "*", "::", "") else c.api_host
    return f"http://{host}:{c.api_port}"


# -- the steps --------------------------------------------------------------------


def check_machine(d: Daemon) -> dict:
    """The daemon's program answers there with this machine's versions; the
    machine's OS and (macOS) wired-memory limit. RemoteError naming the cause."""
    script = (
        f"{d.env_prefix()}{sh_path(d.program)} --version || exit $?; "
        'echo "os=$(uname -s)"; '
        'echo "wired_mb=$(sysctl -n iogpu.wired_limit_mb 2>/dev/null)"; '
        'echo "mem_bytes=$(sysctl -n hw.memsize 2>/dev/null)"'
    )
    proc = d.machine.run(script, what=f"{d.role} {d.name!r}: {d.program} --version")
    lines = proc.stdout.decode(errors="replace").splitlines()
    theirs = lines[0].strip() if lines else ""
    mine = version_text()
    if theirs != mine:
        raise RemoteError(f"{d.label}: version mismatch: this machine has {mine}; {d.program} there has {theirs!r}")
    facts = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    return facts


def copy_config(d: Daemon, text: bytes) -> None:
    """The config, written whole (a rename) so a daemon never reads half of it."""
    path = sh_path(d.config)
    script = f'mkdir -p "$(dirname {path})" && cat > {path}.tmp.$$ && mv -f {path}.tmp.$$ {path}'
    d.machine.run(script, what=f"copying the config to {d.config}", input=text)


def start(d: Daemon) -> int:
    """Start the daemon in the background there; its pid."""
    out = sh_path(d.output)
    script = f'cd "$HOME" && nohup {d.env_prefix()}{sh_path(d.program)} {d.args} > {out} 2>&1 < /dev/null & echo $!'
    proc = d.machine.run(script, what=f"starting {d.label}")
    try:
        return int(proc.stdout.split()[-1])
    except (IndexError, ValueError):
        raise RemoteError(f"{d.label}: started, but no pid came back: {proc.stdout!r}") from None


def _matches(d: Daemon, pid: int) -> str:
    """sh: true while `pid` still runs this daemon's command (not a reused pid)."""
    mark = d.config.removeprefix("~") + (f" --name {d.name}" if d.role == "worker" else "")
    return f"ps -ww -p {pid} -o command= 2>/dev/null | grep -qF -- {shlex.quote(mark)}"


def exited(started: list[tuple[Daemon, int]]) -> list[tuple[Daemon, int]]:
    """Those of `started` no longer running: one ssh call per machine."""
    by_machine: dict[Machine, list[tuple[Daemon, int]]] = {}
    for d, pid in started:
        by_machine.setdefault(d.machine, []).append((d, pid))
    gone = []
    for machine, group in by_machine.items():
        script = "; ".join(f"{{ {_matches(d, pid)} && echo yes || echo no; }}" for d, pid in group)
        answers = machine.run(script, what="checking its daemons").stdout.split()
        if len(answers) != len(group):
            raise RemoteError(f"{machine.label}: checking its daemons gave {answers!r}")
        gone += [dp for dp, answer in zip(group, answers, strict=True) if answer != b"yes"]
    return gone


def output_tail(d: Daemon) -> str:
    proc = d.machine.run(f"tail -n {OUTPUT_TAIL_LINES} {sh_path(d.output)}", what="reading its output", check=False)
    return proc.stdout.decode(errors="replace").strip()


def stop(d: Daemon, pid: int) -> str:
    """SIGTERM the daemon if that pid still runs it, SIGKILL after a grace
    period; what happened ("stopped", "killed" or "not running")."""
    script = (
        f"if {_matches(d, pid)}; then kill -TERM {pid}; i=0; "
        f"while kill -0 {pid} 2>/dev/null && [ $i -lt {STOP_WAIT_TENTHS} ]; do sleep 0.1; i=$((i+1)); done; "
        f"if kill -0 {pid} 2>/dev/null; then kill -KILL {pid}; echo killed; else echo stopped; fi; "
        "else echo 'not running'; fi"
    )
    return d.machine.run(script, what=f"stopping {d.label}").stdout.decode().strip()


def health(url: str) -> tuple[int, dict] | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=HEALTH_TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with contextlib.suppress(json.JSONDecodeError):
            return e.code, json.loads(e.read() or b"{}")
        return e.code, {}
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None


def _why_exited(d: Daemon, tail: str) -> str:
    if "Address already in use" in tail or "cannot bind" in tail:
        return f"port busy: {tail.splitlines()[-1]}"
    if "version mismatch" in tail:
        return next(line for line in tail.splitlines() if "version mismatch" in line)
    return tail.splitlines()[-1] if tail else "no output"


# -- state ------------------------------------------------------------------------


def state_path(cfg: Config) -> Path:
    return cfg.log_dir / STATE_FILE


def read_state(cfg: Config) -> list[tuple[Daemon, int]]:
    path = state_path(cfg)
    try:
        data = json.loads(path.read_text())
        return [(Daemon.from_json(e["daemon"]), int(e["pid"])) for e in data["started"]]
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise RemoteError(f"{path}: not a record `kimi up` wrote ({e}); stop the daemons by hand") from None


def write_state(cfg: Config, started: list[tuple[Daemon, int]]) -> None:
    path = state_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"config": str(cfg.path), "started": [{"daemon": d.to_json(), "pid": pid} for d, pid in started]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


# -- up and down --------------------------------------------------------------------


def _plan_needs(cfg: Config) -> dict[str, int]:
    """Bytes each worker's shard needs (weights + reserve), when the model is
    readable here; empty when not (the wired-memory check is then skipped)."""
    from .checkpoint import CheckpointError, read_config
    from .plan import PlanError, make_plan
    from .sizes import layer_sizes

    try:
        plan = make_plan(cfg, layer_sizes(cfg.model_path), model_config=read_config(cfg.model_path))
    except PlanError as e:
        if e.plan is None:
            raise RemoteError(f"the plan: {e}") from None
        raise RemoteError(f"the model does not fit: {e}") from None
    except CheckpointError:
        return {}
    return {s.worker: s.weight_bytes + s.reserved_bytes for s in plan.stages}


def _worker_line(name: str, d: Daemon, w: dict) -> str:
    layers = w.get("layers")
    span = f"[{layers[0]}, {layers[1]})" if layers else "-"
    mem = w.get("memory_bytes")
    memory = f"{mem / 2**30:.2f} GiB" if isinstance(mem, (int, float)) else "-"
    p = w.get("progress") or {}
    load = f"{p.get('done_bytes', 0) / p['total_bytes']:.0%}" if p.get("total_bytes") else "-"
    return f"  {name}: {d.machine.label}  layers {span}  memory {memory}  loaded {load}  ({w.get('state')})"


def each(step: Callable[[Daemon], T], all_daemons: list[Daemon]) -> list[T]:
    """`step` on every daemon at once (each is a round trip to its machine);
    the results in order, or the first daemon's error, in config order."""
    with ThreadPoolExecutor(max_workers=len(all_daemons)) as pool:
        futures = [pool.submit(step, d) for d in all_daemons]
    return [f.result() for f in futures]


def up(cfg: Config, echo: Callable[[str], None], timeout: float | None = None) -> str:
    """Bring the cluster up; the API's URL. On any failure, stop what was
    started and raise RemoteError naming the machine and the cause."""
    if read_state(cfg):
        raise RemoteError(f"{state_path(cfg)} says a cluster started by `kimi up` runs; `kimi down` first")
    needs = _plan_needs(cfg)
    all_daemons = daemons(cfg)
    for d, facts in zip(all_daemons, each(check_machine, all_daemons)):
        if d.role != "worker" or facts.get("os") != "Darwin" or d.name not in needs:
            continue
        if warning := wired.sysctl_warning(d.name, needs[d.name], facts.get("wired_mb"), facts.get("mem_bytes")):
            echo(f"warning: {warning}")
    text = cfg.path.read_bytes()
    each(lambda d: copy_config(d, text), all_daemons)
    started: list[tuple[Daemon, int]] = []
    try:
        for d in all_daemons:
            pid = start(d)
            started.append((d, pid))
            write_state(cfg, started)
            echo(f"started {d.label} (pid {pid})")
        url = api_url(cfg)
        body = wait_ready(cfg, url, started, echo, timeout or cfg.runtime.load_timeout_s)
    except BaseException:
        for d, pid in reversed(started):
            with contextlib.suppress(RemoteError):
                stop(d, pid)
        state_path(cfg).unlink(missing_ok=True)
        raise
    by_name = {d.name: d for d in all_daemons}
    for name, w in body.get("workers", {}).items():
        echo(_worker_line(name, by_name[name], w))
    return url


def wait_ready(
    cfg: Config, url: str, started: list[tuple[Daemon, int]], echo: Callable[[str], None], timeout: float
) -> dict:
    deadline = time.monotonic() + timeout
    next_alive = next_progress = time.monotonic()
    last: dict = {}
    while time.monotonic() < deadline:
        answer = health(url)
        if answer is not None:
            status, last = answer
            if status == 200 and last.get("status") == "ready":
                return last
        now = time.monotonic()
        if now >= next_alive:
            for d, _ in exited(started):
                tail = output_tail(d)
                raise RemoteError(f"{d.label} exited: {_why_exited(d, tail)}\n--- its output ---\n{tail}")
            next_alive = now + ALIVE_CHECK_S
        if now >= next_progress and last.get("workers"):
            states = ", ".join(f"{n} {w.get('state')}" for n, w in last["workers"].items())
            echo(f"waiting for {url}/health: {states}")
            next_progress = now + PROGRESS_EVERY_S
        time.sleep(POLL_S)
    raise RemoteError(f"the cluster was not ready after {timeout:g} s; last /health: {json.dumps(last)[:2000]}")


def down(cfg: Config, echo: Callable[[str], None]) -> int:
    """Stop what `up` started (coordinator first); how many were running."""
    started = read_state(cfg)
    if not started:
        echo(f"nothing to stop: no {state_path(cfg)} (kimi up did not start this cluster)")
        return 0
    ran = 0
    problems = []
    for d, pid in reversed(started):
        try:
            what = stop(d, pid)
        except RemoteError as e:
            problems.append(str(e))
            continue
        ran += what != "not running"
        echo(f"{d.label} (pid {pid}): {what}")
    if problems:
        raise RemoteError("could not stop everything (up.json kept; run `kimi down` again):\n" + "\n".join(problems))
    state_path(cfg).unlink(missing_ok=True)
    return ran


def raw_model_path(cfg: Config) -> str:
    """[model] path as written (the remote machine resolves it itself)."""
    with open(cfg.path, "rb") as f:
        return tomllib.load(f)["model"]["path"]
