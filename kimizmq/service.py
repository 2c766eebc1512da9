"""`kimi service install`: run this machine's daemon at login and restart it
when it fails, as a launchd agent on macOS or a systemd user unit on Linux.

Its stdout and stderr go to files in the config's log folder (the JSON log
stays where the daemon writes it).
"""

from __future__ import annotations

import plistlib
import shlex
import shutil
import sys
from pathlib import Path

from .config import Config

LABEL_PREFIX = "org.kimizmq"
RESTART_DELAY_S = 5


def daemon_id(worker: str | None) -> str:
    return f"worker-{worker}" if worker else "coordinator"


def program_args(cfg: Config, worker: str | None) -> list[str]:
    """The daemon's command line, with the program of this installation."""
    name = "kimi-worker" if worker else "kimi-coordinator"
    beside = Path(sys.executable).parent / name
    program = str(beside) if beside.exists() else shutil.which(name) or name
    return [program, "--config", str(cfg.path), *(["--name", worker] if worker else [])]


def launchd_plist(cfg: Config, worker: str | None) -> bytes:
    ident = daemon_id(worker)
    return plistlib.dumps(
        {
            "Label": f"{LABEL_PREFIX}.{ident}",
            "ProgramArguments": program_args(cfg, worker),
            "RunAtLoad": True,
            "KeepAlive": {"SuccessfulExit": False},  # restart when it fails, not after `launchctl stop`
            "ThrottleInterval": RESTART_DELAY_S,
            "StandardOutPath": str(cfg.log_dir / f"{ident}.out"),
            "StandardErrorPath": str(cfg.log_dir / f"{ident}.err"),
            "WorkingDirectory": str(cfg.path.parent),
            "ProcessType": "Interactive",  # no App Nap or background throttling for the GPU work
        }
    )


def systemd_unit(cfg: Config, worker: str | None) -> str:
    ident = daemon_id(worker)
    command = " ".join(shlex.quote(a) for a in program_args(cfg, worker))
    return "\n".join(
        [
            "[Unit]",
            f"Description=kimizmq {ident} ({cfg.path})",
            "After=network-online.target",
            "Wants=network-online.target",
            "",
            "[Service]",
            f"ExecStart={command}",
            f"WorkingDirectory={cfg.path.parent}",
            "Restart=on-failure",
            f"RestartSec={RESTART_DELAY_S}",
            f"StandardOutput=append:{cfg.log_dir / f'{ident}.out'}",
            f"StandardError=append:{cfg.log_dir / f'{ident}.err'}",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def install(cfg: Config, worker: str | None, platform: str, folder: Path | None = None) -> tuple[Path, str]:
    """Write the service file; its path and the command that starts it."""
    ident = daemon_id(worker)
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    if platform == "darwin":
        folder = folder or Path.home() / "Library" / "LaunchAgents"
        path = folder / f"{LABEL_PREFIX}.{ident}.plist"
        data = launchd_plist(cfg, worker)
        start = f"launchctl bootstrap gui/$(id -u) {shlex.quote(str(path))}"
    else:
        folder = folder or Path.home() / ".config" / "systemd" / "user"
        path = folder / f"kimi-{ident}.service"
        data = systemd_unit(cfg, worker).encode()
        start = f"systemctl --user daemon-reload && systemctl --user enable --now {path.name}"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, start
