"""Running shell commands on the cluster's machines over OpenSSH.

`kimi up`, `kimi down` and `kimi sync` reach a daemon's machine with the
system's `ssh` client (keys, agents, ~/.ssh/config and known_hosts work as
they do by hand) and run POSIX sh there, which macOS and Linux both have.
A daemon with no ssh table runs on this machine, through the same scripts.
Failures are told apart by what ssh says: unreachable, refused login,
unknown host key, missing remote command.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass

from .config import SshConfig

CONNECT_TIMEOUT_S = 10
CALL_TIMEOUT_S = 120.0
SSH_FAILED = 255  # ssh's own exit status: the connection or the login failed
NOT_FOUND = 127  # sh: command not found


class RemoteError(RuntimeError):
    """A remote step failed; the message names the machine and the cause."""


def sh_path(path: str) -> str:
    """`path` quoted for sh, with a leading ~/ left for the remote shell to expand."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


@dataclass(frozen=True)
class Machine:
    """Where scripts run: over ssh, or here when `ssh` is None."""

    ssh: SshConfig | None

    @property
    def label(self) -> str:
        if self.ssh is None:
            return "this machine"
        return f"{self.ssh.target}" + (f" port {self.ssh.port}" if self.ssh.port else "")

    def argv(self, script: str) -> list[str]:
        if self.ssh is None:
            return ["sh", "-c", script]
        s = self.ssh
        return [
            "ssh",
            *s.options,  # first: for each option ssh keeps the first value it is given
            "-o",
            "BatchMode=yes",  # never wait on a password prompt
            "-o",
            f"ConnectTimeout={CONNECT_TIMEOUT_S}",
            *(["-p", str(s.port)] if s.port else []),
            s.target,
            "--",
            "sh -c " + shlex.quote(script),  # the same shell whatever the login shell is
        ]

    def run(
        self, script: str, *, what: str, input: bytes | None = None, timeout: float = CALL_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run `script`; with `check`, a RemoteError saying why unless it exits 0."""
        try:
            proc = subprocess.run(self.argv(script), input=input, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self.label}: {what}: no answer within {timeout:g} s") from None
        except FileNotFoundError as e:
            raise RemoteError(f"{self.label}: {what}: cannot run {e.filename} here (is OpenSSH installed?)") from None
        if check and proc.returncode != 0:
            raise RemoteError(f"{self.label}: {what}: {failure(self, proc)}")
        return proc

    def popen(self, script: str) -> subprocess.Popen:
        """`script` started, its stdin a pipe (a copy streams into it)."""
        return subprocess.Popen(
            self.argv(script), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )


def failure(machine: Machine, proc: subprocess.CompletedProcess) -> str:
    """Why a command failed, in the words a person fixing it needs."""
    err = proc.stderr.decode(errors="replace").strip() if isinstance(proc.stderr, bytes) else str(proc.stderr or "")
    last = err.splitlines()[-1] if err else f"exit status {proc.returncode}"
    if machine.ssh is not None and proc.returncode == SSH_FAILED:
        if "Permission denied" in err or "Too many authentication failures" in err:
            return (
                f"cannot log in (ssh refused the key: {last}); "
                f"copy your public key there with `ssh-copy-id {machine.ssh.target}`"
            )
        if "Host key verification failed" in err or "REMOTE HOST IDENTIFICATION HAS CHANGED" in err:
            return f"its host key is unknown or changed ({last}); run `ssh {machine.ssh.target}` once by hand"
        return f"unreachable ({last})"
    if proc.returncode == NOT_FOUND or "not found" in last or "No such file or directory" in last:
        return f"remote command missing ({last}); set ssh.command to the program's full path there"
    return last
