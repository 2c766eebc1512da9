"""etc/kimi.toml: the cluster's one configuration file.

Every daemon and the `kimi` client read the same file. Relative paths resolve
against the file's own folder and `~` expands, so one file can be copied to
every Mac unchanged.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what and where."""


@dataclass(frozen=True)
class SshConfig:
    """How `kimi up`, `kimi down` and `kimi sync` reach a daemon's machine:
    a [workers.ssh] or [coordinator.ssh] table. Empty fields: ssh's defaults."""

    host: str  # default: the daemon's own host
    user: str = ""
    port: int = 0
    options: tuple[str, ...] = ()  # more ssh arguments, e.g. ("-i", "~/.ssh/kimi")
    command: str = ""  # the daemon's program there; default: kimi-worker / kimi-coordinator on its PATH
    env: tuple[tuple[str, str], ...] = ()  # set for the daemon there
    config: str = ""  # where the config goes there; default: this config's path

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


SSH_KEYS = ("host", "user", "port", "options", "command", "env", "config")


def _ssh(section: Any, default_host: str, where: str) -> SshConfig | None:
    if section is None:
        return None
    where = f"{where} ssh"
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: must be a table")
    if unknown := set(section) - set(SSH_KEYS):
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(SSH_KEYS)})")
    port = section.get("port", 0)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536 and "port" in section:
        raise ConfigError(f"{where}: port must be an integer port in 1..65535, got {port!r}")
    options = section.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ConfigError(f"{where}: options must be a list of strings")
    env = section.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError(f"{where}: env must be a table of strings")
    bad = [k for k in env if not k.isidentifier()]
    if bad:
        raise ConfigError(f"{where}: env names must be identifiers, got {bad}")
    return SshConfig(
        host=_typed(section, "host", str, where, default_host) or default_host,
        user=_typed(section, "user", str, where, ""),
        port=port,
        options=tuple(options),
        command=_typed(section, "command", str, where, ""),
        env=tuple(env.items()),
        config=_typed(section, "config", str, where, ""),
    )


@dataclass(frozen=True)
class WorkerConfig:
    name: str
    host: str
    memory_gb: float
    ports: dict[str, int]
    max_memory_gb: float | None = None
    layers: tuple[int, int] | None = None
    bandwidth_gbs: float | None = None
    ssh: SshConfig | None = None

    @property
    def control_port(self) -> int:
        return self.ports["control_port"]

    @property
    def data_port(self) -> int:
        return self.ports["data_port"]

    @property
    def control_address(self) -> str:
        return f"tcp://{self.host}:{self.control_port}"

    @property
    def data_address(self) -> str:
        return f"tcp://{self.host}:{self.data_port}"


@dataclass(frozen=True)
class CoordinatorConfig:
    host: str  # where workers send sampled tokens (the result socket binds here)
    ports: dict[str, int]
    api_host: str = ""  # where the HTTP API listens; empty: the same as host
    ssh: SshConfig | None = None  # `kimi up` starts it there; None: on the machine running `kimi up`

    # Address workers bind/connect for the coordinator's inbound token stream.
    @property
    def api_port(self) -> int:
        return self.ports["api_port"]

    @property
    def result_port(self) -> int:
        return self.ports["result_port"]

    @property
    def result_address(self) -> str:
        return f"tcp://{self.host}:{self.result_port}"


DECODE_MODES = ("compiled", "eager")  # runtime.decode


@dataclass(frozen=True)
class RuntimeConfig:
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype on GPU
    prefill_chunk: int = 256
    max_context: int = 8192
    max_concurrent: int = 16
    max_queue: int = 64  # requests waiting for a slot; beyond that the API answers 429
    load_timeout_s: float = 1800.0
    heartbeat_interval_s: float = 1.0
    liveness_timeout_s: float = 4.0  # + one heartbeat interval: a dead or hung worker is noticed within 5 s
    recovery_timeout_s: float = 120.0  # in-flight requests wait this long for a lost worker
    # A request no stage has moved on for this long is replayed once, then ends with an error.
    request_stall_timeout_s: float = 120.0
    request_idle_timeout_s: float = 600.0  # a stage frees a request's caches after this long unused
    # Freed device memory each worker's MLX keeps for reuse; < 0: MLX's default
    # (about all of it). Set it when several workers share one GPU.
    cache_limit_gb: float = -1.0
    # One-token steps: "compiled" (the code between attention cores replayed as
    # traced graphs; mlx-lm's numbers to the bit) or "eager" (built op by op).
    decode: str = "compiled"
    # The last stage sends a request's tokens to the coordinator at most this
    # often (its first and last at once), a run of them at a time: fewer
    # wake-ups for the coordinator and the client. 0: every token on its own.
    stream_interval_ms: float = 20.0
    # macOS: memory MLX may wire for a worker's weights. < 0: the GPU's
    # recommended working set (mx.device_info()); 0: leave MLX's default.
    wired_limit_gb: float = -1.0
    # Each stage keeps finished requests' states for new requests that start
    # with the same tokens, within this budget; < 0: half of what the plan
    # leaves free on the stage's worker; 0: off.
    prefix_cache_gb: float = -1.0


@dataclass(frozen=True)
class PlanConfig:
    balance: str = "memory"  # or "bandwidth"
    memory_fraction: float = 0.75
    runtime_margin_gb: float = 2.0


@dataclass(frozen=True)
class SecurityConfig:
    curve_dir: Path | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class ApiConfig:
    dashboard: bool = True  # GET / serves the page of the cluster and a chat
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; "*" any
    keepalive_s: float = 15.0  # an SSE comment this often while a stream waits (long prefills)


@dataclass(frozen=True)
class Config:
    path: Path
    model_path: Path
    model_name: str
    coordinator: CoordinatorConfig
    workers: tuple[WorkerConfig, ...]
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    log_dir: Path = Path("var/log")

    def worker(self, name: str) -> WorkerConfig:
        for w in self.workers:
            if w.name == name:
                return w
        known = ", ".join(w.name for w in self.workers)
        raise ConfigError(f"{self.path}: no worker named {name!r} (known: {known})")


MAX_STREAM_INTERVAL_MS = 1000

# Numbers a setting may take: (lowest, highest); a lowest in a tuple of its own
# is excluded ("more than"). None: no bound. Every float must be finite.
RUNTIME_RANGES: dict[str, tuple] = {
    "prefill_chunk": (1, None),
    "max_context": (1, None),
    "max_concurrent": (1, None),
    "max_queue": (0, None),
    "load_timeout_s": ((0,), None),
    "heartbeat_interval_s": ((0,), None),
    "liveness_timeout_s": ((0,), None),
    "recovery_timeout_s": (0, None),
    "request_stall_timeout_s": ((0,), None),
    "request_idle_timeout_s": ((0,), None),
    "cache_limit_gb": (None, None),  # < 0: MLX's default
    "stream_interval_ms": (0, MAX_STREAM_INTERVAL_MS),
    "wired_limit_gb": (None, None),  # < 0: the device's recommended working set
    "prefix_cache_gb": (None, None),  # < 0: from the plan's free memory
}
PLAN_RANGES: dict[str, tuple] = {"memory_fraction": ((0,), 1), "runtime_margin_gb": (0, None)}
WORKER_RANGES: dict[str, tuple] = {
    "memory_gb": ((0,), None),
    "max_memory_gb": ((0,), None),
    "bandwidth_gbs": ((0,), None),
}


def _check_range(where: str, key: str, value: float | None, bounds: tuple) -> None:
    """A ConfigError naming `key` unless `value` (None: not set) is inside `bounds`."""
    if value is None:
        return
    low, high = bounds
    above = low[0] if isinstance(low, tuple) else low
    ok = math.isfinite(value) and (high is None or value <= high)
    if low is not None:
        ok = ok and (value > above if isinstance(low, tuple) else value >= above)
    if not ok:
        parts = [] if low is None else [f"{'>' if isinstance(low, tuple) else '>='} {above}"]
        parts += [] if high is None else [f"<= {high}"]
        rule = " and ".join(["a finite number", *parts])
        raise ConfigError(f"{where}: {key} must be {rule}, got {value!r}")


COORDINATOR_DEFAULT_PORTS = {"api_port": 52415, "result_port": 52400}
WORKER_REQUIRED_PORTS = ("control_port", "data_port")


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _ports(section: dict[str, Any], where: str) -> dict[str, int]:
    ports = {}
    for key, value in section.items():
        if not key.endswith("_port"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise ConfigError(f"{where}: {key} must be an integer port in 1..65535, got {value!r}")
        ports[key] = value
    return ports


SECTIONS = ("model", "coordinator", "workers", "runtime", "plan", "security", "api", "logging")
MODEL_KEYS = ("path", "name")
COORDINATOR_KEYS = ("host", "api_host", "api_port", "result_port", "ssh")
WORKER_KEYS = (
    "name",
    "host",
    "memory_gb",
    "layers",
    "max_memory_gb",
    "bandwidth_gbs",
    "control_port",
    "data_port",
    "ssh",
)
SECURITY_KEYS = ("curve_dir", "api_key")
LOGGING_KEYS = ("dir",)


def _check_keys(where: str, section: dict, known: tuple | set, what: str = "key") -> None:
    """A ConfigError naming the first unknown key and the nearest known one:
    a misspelt setting must never be ignored (`apikey` would leave the API open)."""
    for key in section:
        if key in known:
            continue
        near = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f" (known: {', '.join(sorted(known))})"
        raise ConfigError(f"{where}: unknown {what} {key!r}{hint}")


def _table(data: dict, name: str, where: str) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{name}] must be a table, got {value!r}")
    return value


def _typed(section: dict, key: str, kind: type | tuple, where: str, default: Any = None) -> Any:
    if key not in section:
        return default
    value = section[key]
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: {key} must be {kind}, got {value!r}")
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: {key} has the wrong type: {value!r}")
    return value


def _dataclass_section(cls, section: dict, where: str):
    kwargs = {}
    for name, f in cls.__dataclass_fields__.items():
        if name not in section:
            continue
        default = f.default
        kind = type(default) if default is not None else str
        kwargs[name] = _typed(section, name, kind, where)
    _check_keys(where, section, set(cls.__dataclass_fields__))
    return cls(**kwargs)


def parse_config(data: dict[str, Any], path: Path) -> Config:
    base = path.parent
    src = str(path)
    _check_keys(src, data, SECTIONS, "section")
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("path"), str):
        raise ConfigError(f'{src}: [model] needs a path = "..." to the model directory')
    _check_keys(f"{src} [model]", model, MODEL_KEYS)
    model_path = _resolve(base, model["path"])
    model_name = model.get("name") or model_path.name
    if not isinstance(model_name, str):
        raise ConfigError(f"{src}: [model] name must be a string")

    coord = _table(data, "coordinator", src)
    _check_keys(f"{src} [coordinator]", coord, COORDINATOR_KEYS)
    host = _typed(coord, "host", str, f"{src} [coordinator]", "127.0.0.1")
    ports = dict(COORDINATOR_DEFAULT_PORTS)
    ports.update(_ports(coord, f"{src} [coordinator]"))
    api_host = _typed(coord, "api_host", str, f"{src} [coordinator]", host)
    coordinator = CoordinatorConfig(
        host=host, ports=ports, api_host=api_host, ssh=_ssh(coord.get("ssh"), host, f"{src} [coordinator]")
    )

    raw_workers = data.get("workers")
    if not isinstance(raw_workers, list) or not raw_workers:
        raise ConfigError(f"{src}: needs at least one [[workers]] entry")
    workers = []
    seen_names: set[str] = set()
    for i, w in enumerate(raw_workers):
        where = f"{src} [[workers]] #{i + 1}"
        if not isinstance(w, dict):
            raise ConfigError(f"{where}: must be a table")
        name = _typed(w, "name", str, where)
        if not name:
            raise ConfigError(f"{where}: needs a name")
        where = f"{src} worker {name!r}"
        if name in seen_names:
            raise ConfigError(f"{where}: the name is used twice")
        seen_names.add(name)
        whost = _typed(w, "host", str, where)
        if not whost:
            raise ConfigError(f"{where}: needs a host")
        memory_gb = _typed(w, "memory_gb", float, where)
        if memory_gb is None:
            raise ConfigError(f"{where}: needs memory_gb (the Mac's unified memory in GB)")
        wports = _ports(w, where)
        for req in WORKER_REQUIRED_PORTS:
            if req not in wports:
                raise ConfigError(f"{where}: needs {req}")
        layers = w.get("layers")
        if layers is not None:
            if (
                not isinstance(layers, list)
                or len(layers) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
            ):
                raise ConfigError(f"{where}: layers must be [start, end] (end exclusive)")
            layers = (layers[0], layers[1])
        max_mem = _typed(w, "max_memory_gb", float, where)
        bw = _typed(w, "bandwidth_gbs", float, where)
        for key, value in (("memory_gb", memory_gb), ("max_memory_gb", max_mem), ("bandwidth_gbs", bw)):
            _check_range(where, key, value, WORKER_RANGES[key])
        _check_keys(where, w, WORKER_KEYS)
        workers.append(
            WorkerConfig(name, whost, memory_gb, wports, max_mem, layers, bw, _ssh(w.get("ssh"), whost, where))
        )

    # Two sockets bound on one host and port would fail at start: say so now.
    bound: dict[tuple[str, int], str] = {}
    for owner, h, p in [("coordinator", host, v) for v in ports.values()] + [
        (f"worker {w.name!r}", w.host, v) for w in workers for v in w.ports.values()
    ]:
        if (h, p) in bound:
            raise ConfigError(f"{src}: port {p} on {h} is used by both {bound[(h, p)]} and {owner}")
        bound[(h, p)] = owner

    runtime = _dataclass_section(RuntimeConfig, _table(data, "runtime", src), f"{src} [runtime]")
    if runtime.decode not in DECODE_MODES:
        modes = " or ".join(f'"{m}"' for m in DECODE_MODES)
        raise ConfigError(f"{src} [runtime]: decode must be {modes}, got {runtime.decode!r}")
    for key, bounds in RUNTIME_RANGES.items():
        _check_range(f"{src} [runtime]", key, getattr(runtime, key), bounds)
    plan = _dataclass_section(PlanConfig, _table(data, "plan", src), f"{src} [plan]")
    if plan.balance not in ("memory", "bandwidth"):
        raise ConfigError(f'{src} [plan]: balance must be "memory" or "bandwidth"')
    for key, bounds in PLAN_RANGES.items():
        _check_range(f"{src} [plan]", key, getattr(plan, key), bounds)

    # Security settings that cannot be read are fatal: guessing would lower it.
    sec = _table(data, "security", src)
    _check_keys(f"{src} [security]", sec, SECURITY_KEYS)
    curve_dir = _typed(sec, "curve_dir", str, f"{src} [security]")
    api_key = _typed(sec, "api_key", str, f"{src} [security]")
    for key, value in (("curve_dir", curve_dir), ("api_key", api_key)):
        if value is not None and not value.strip():
            raise ConfigError(f"{src} [security]: {key} is empty; remove the line or give it a value")
    security = SecurityConfig(curve_dir=_resolve(base, curve_dir) if curve_dir else None, api_key=api_key)
    api_section = _table(data, "api", src)
    _check_keys(f"{src} [api]", api_section, set(ApiConfig.__dataclass_fields__))
    origins = api_section.get("cors_origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) and o for o in origins):
        raise ConfigError(f'{src} [api]: cors_origins must be a list of origins such as "https://app.example"')
    keepalive = _typed(api_section, "keepalive_s", float, f"{src} [api]", ApiConfig.keepalive_s)
    _check_range(f"{src} [api]", "keepalive_s", keepalive, ((0,), None))
    dashboard = _typed(api_section, "dashboard", bool, f"{src} [api]", ApiConfig.dashboard)
    api = ApiConfig(dashboard=dashboard, cors_origins=tuple(origins), keepalive_s=keepalive)
    logging_section = _table(data, "logging", src)
    _check_keys(f"{src} [logging]", logging_section, LOGGING_KEYS)
    log_dir = _resolve(base, _typed(logging_section, "dir", str, f"{src} [logging]", "../var/log"))
    return Config(
        path=path,
        model_path=model_path,
        model_name=model_name,
        coordinator=coordinator,
        workers=tuple(workers),
        runtime=runtime,
        plan=plan,
        security=security,
        api=api,
        log_dir=log_dir,
    )


def load_config(path: str | Path) -> Config:
    path = Path(path).expanduser().resolve()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse_config(data, path)
