"""The machine a run is on: its device, its cores, free ports."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from .rows import BenchError


def _mlx_on_gpu() -> bool:
    """Whether MLX computes on a GPU here (CUDA or Metal), asked of a fresh process."""
    probe = "import mlx.core as mx; print(mx.default_device().type == mx.DeviceType.gpu)"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        return out.stdout.strip() == "True"
    return False


def _nvidia_names() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [smi, "--query-gpu=index,name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        gpus = dict(line.split(",", 1) for line in out.stdout.splitlines() if "," in line)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = {i: n for i, n in gpus.items() if i.strip() in visible.split(",")}
        if out.returncode == 0:
            return [n.strip() for n in gpus.values()]
    return []


def describe_device() -> tuple[str, bool]:
    """("NVIDIA H100 80GB HBM3", True) or ("CPU AMD EPYC, 2 cores", False): the
    device MLX computes on, not merely one the machine has."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    if not _mlx_on_gpu():
        return f"CPU {cpu}, {os.cpu_count()} cores", False
    if names := _nvidia_names():
        return (f"{len(names)} x {names[0]}" if len(names) > 1 else names[0]), True
    if sys.platform == "darwin":
        return f"Apple GPU ({cpu})", True
    return "GPU", True


def pin(pid: int, core: int) -> None:
    """Hold every thread of `pid` to one core (Linux); the threads it starts later inherit it."""
    if not hasattr(os, "sched_setaffinity"):
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), {core})


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (mlx.launch's ring takes consecutive ports)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise BenchError("no two consecutive free ports on 127.0.0.1")
