"""A whole cluster on this machine: workers and a coordinator as real
processes on loopback. Used by `kimi demo`, the tests and the benchmarks.

Every process started here is stopped on exit, also when the caller fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .config import Config, load_config

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10.0


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_config(
    path: Path,
    model_path: Path,
    n_workers: int,
    *,
    layers: list[tuple[int, int]] | None = None,
    model_name: str = "kimi-k2-tiny",
    runtime: dict | None = None,
    memory_gb: float = 16,
    extra: str = "",
) -> Path:
    """A loopback cluster config with fresh free ports."""
    ports = free_ports(2 + 2 * n_workers)
    runtime = {"prefill_chunk": 16, "max_context": 1024, "max_concurrent": 8, **(runtime or {})}
    lines = [
        "[model]",
        f"path = {json.dumps(str(model_path))}",
        f"name = {json.dumps(model_name)}",
        "",
        "[coordinator]",
        'host = "127.0.0.1"',
        f"api_port = {ports[0]}",
        f"result_port = {ports[1]}",
        "",
        "[runtime]",
        *(f"{k} = {json.dumps(v)}" for k, v in runtime.items()),
        "",
        "[logging]",
        f"dir = {json.dumps(str(path.parent / 'log'))}",
        "",
    ]
    for i in range(n_workers):
        lines += [
            "[[workers]]",
            f'name = "w{i}"',
            'host = "127.0.0.1"',
            f"memory_gb = {memory_gb}",
            f"control_port = {ports[2 + 2 * i]}",
            f"data_port = {ports[3 + 2 * i]}",
        ]
        if layers is not None:
            lines.append(f"layers = [{layers[i][0]}, {layers[i][1]}]")
        lines.append("")
    path.write_text("\n".join(lines) + extra)
    return path


def _cmd(module: str) -> list[str]:
    # Not `-m kimizmq.X`: that would load the daemon's module twice (as
    # __main__ and as kimizmq.X), with two copies of every exception class.
    return [sys.executable, "-c", f"from kimizmq.{module} import main; main()"]


class LocalCluster:
    """Start with `with LocalCluster(config_path) as c:`; c.api is the base URL."""

    def __init__(self, config_path: Path, *, env: dict | None = None, ready_timeout: float = READY_TIMEOUT_S):
        self.config_path = Path(config_path)
        self.cfg: Config = load_config(self.config_path)
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.workers: dict[str, subprocess.Popen] = {}
        self.coordinator: subprocess.Popen | None = None
        self.log_dir = self.cfg.log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.cfg.coordinator.api_port}"

    def _spawn(self, args: list[str], stderr_name: str) -> subprocess.Popen:
        err = open(self.log_dir / f"{stderr_name}.stderr", "ab")  # noqa: SIM115 - owned by the child
        try:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=self.env)
        finally:
            err.close()

    def start_worker(self, name: str) -> subprocess.Popen:
        p = self._spawn(_cmd("worker") + ["--config", str(self.config_path), "--name", name], f"worker-{name}")
        self.workers[name] = p
        return p

    def start_coordinator(self) -> subprocess.Popen:
        self.coordinator = self._spawn(_cmd("coordinator") + ["--config", str(self.config_path)], "coordinator")
        return self.coordinator

    def start(self) -> LocalCluster:
        try:
            for w in self.cfg.workers:
                self.start_worker(w.name)
            self.start_coordinator()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"{self.api}/health", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait_ready(self, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        last = None
        while time.monotonic() < deadline:
            if self.coordinator is not None and self.coordinator.poll() is not None:
                raise RuntimeError(
                    f"coordinator exited with {self.coordinator.returncode}: {self.stderr('coordinator')}"
                )
            try:
                status, body = self.health()
                last = body
                if status == 200:
                    return body
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"cluster not ready after {timeout or self.ready_timeout:g} s; last health: {last}")

    def stderr(self, name: str) -> str:
        p = self.log_dir / f"{name}.stderr"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    @staticmethod
    def _stop(p: subprocess.Popen | None) -> None:
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            p.terminate()
            p.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def stop(self) -> None:
        self._stop(self.coordinator)
        for p in self.workers.values():
            self._stop(p)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
