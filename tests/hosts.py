"""Machines for the tests of `kimi up`, `kimi down` and `kimi sync`: Linux
network namespaces on one bridge, each with its own address and a real
OpenSSH server, and its own model folder (a private mount namespace binds it
over the shared model path, as each Mac has its own disk).

Needs root, iproute2, util-linux's unshare and Debian's openssh-server;
`unavailable()` says what is missing so the tests can skip with the reason.
Everything is removed on exit, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def unavailable() -> str | None:
    """Why these machines cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2, util-linux, openssh-client)"
    if not os.path.exists(SSHD):
        return f"needs {SSHD} (apt-get install openssh-server)"
    probe = f"kzprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"cannot make a network namespace: {e.stderr.decode().strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    """`n` machines at `address(i)`, sshd on port 22, each seeing its own
    `folder(i)` at `shared_path` (and the rest of the file system as is)."""

    def __init__(self, root: Path, n: int, shared_path: Path):
        self.root = root
        self.n = n
        self.shared_path = shared_path
        tag = os.getpid() % 100000
        self.prefix = f"kz{tag}"
        self.net = f"198.18.{tag % 250}"  # RFC 2544's range for tests: no real network uses it
        self.namespaces: list[str] = []
        self.sshd: list[subprocess.Popen] = []
        self.ssh_config = root / "ssh_config"

    def address(self, i: int) -> str:
        return f"{self.net}.{i + 2}"

    @property
    def here(self) -> str:
        """This machine's address on the bridge."""
        return f"{self.net}.1"

    def folder(self, i: int) -> Path:
        return self.root / f"host{i}" / "disk"

    def ns(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    def __enter__(self) -> Hosts:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        p, switch = self.prefix, f"{self.prefix}sw"
        _run("ip", "netns", "add", switch)
        self.namespaces.append(switch)
        _run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", switch, "link", "set", "br0", "up")
        _run("ip", "link", "add", f"{p}r", "type", "veth", "peer", "name", f"{p}rb", "netns", switch)
        _run("ip", "-n", switch, "link", "set", f"{p}rb", "master", "br0", "up")
        _run("ip", "addr", "add", f"{self.here}/24", "dev", f"{p}r")
        _run("ip", "link", "set", f"{p}r", "up")

        key = self.root / "id_ed25519"
        host_key = self.root / "host_ed25519"
        for k in (key, host_key):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k))
        (self.root / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
        self.ssh_config.write_text(
            "Host *\n"
            f"  IdentityFile {key}\n  IdentitiesOnly yes\n  User root\n"
            f"  UserKnownHostsFile {self.root / 'known_hosts'}\n  StrictHostKeyChecking accept-new\n"
            "  LogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        self.shared_path.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            ns = self.ns(i)
            _run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            _run(
                "ip",
                "link",
                "add",
                f"{p}a{i}",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                f"{p}b{i}",
                "netns",
                switch,
            )
            _run("ip", "-n", switch, "link", "set", f"{p}b{i}", "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", f"{p}a{i}")
            _run("ip", "-n", ns, "link", "set", f"{p}a{i}", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            self.folder(i).mkdir(parents=True, exist_ok=True)
            conf = self.root / f"sshd_config{i}"
            conf.write_text(
                f"ListenAddress {self.address(i)}\nPort 22\nHostKey {host_key}\n"
                f"AuthorizedKeysFile {self.root / 'authorized_keys'}\nPidFile {self.root / f'sshd{i}.pid'}\n"
                "UsePAM no\nPermitRootLogin prohibit-password\nStrictModes no\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nMaxStartups 100\nMaxSessions 100\n"
            )
            script = f"mount --bind {self.folder(i)} {self.shared_path} && exec {SSHD} -D -e -f {conf}"
            log = open(self.root / f"sshd{i}.log", "ab")  # noqa: SIM115 - owned by the child
            self.sshd.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private", "sh", "-c", script],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            )
            log.close()
        for i in range(self.n):
            self._wait_listening(i)

    def _wait_listening(self, i: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.sshd[i].poll() is not None:
                raise RuntimeError(f"sshd on host {i} exited: {(self.root / f'sshd{i}.log').read_text()}")
            try:
                with socket.create_connection((self.address(i), 22), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"sshd on host {i} ({self.address(i)}) not listening after {READY_TIMEOUT_S:g} s")

    def pids(self, i: int) -> set[int]:
        """The processes in host i's network namespace, its sshd and any other."""
        out = subprocess.run(["ip", "netns", "pids", self.ns(i)], capture_output=True, text=True).stdout
        return {int(x) for x in out.split()}

    def others(self, i: int) -> list[str]:
        """Command lines of host i's processes other than its sshd listener."""
        rows = []
        for pid in self.pids(i) - {self.sshd[i].pid}:
            try:
                rows.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
            except FileNotFoundError:
                continue
        return rows

    def close(self) -> None:
        for p in self.sshd:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        # Anything still in the namespaces was started there by these tests.
        for i in range(len(self.sshd)):
            for pid in self.pids(i):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
