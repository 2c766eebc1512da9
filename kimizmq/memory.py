"""How much memory this machine can give a shard now, and the check a worker
makes before it reads a byte of one."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .plan import PlanError, StageAssignment, format_gib

_VM_PAGE_SIZE = re.compile(r"page size of (\d+) bytes")
_VM_LINE = re.compile(r"^(Pages [a-z ]+):\s+(\d+)\.", re.MULTILINE)
VM_STAT_TIMEOUT_S = 5.0


def vm_stat_available_bytes(out: str) -> int:
    """Free + inactive + speculative pages in `vm_stat` output, in bytes."""
    page = _VM_PAGE_SIZE.search(out)
    if page is None:
        raise OSError(f"cannot read vm_stat output (no page size): {out[:200]!r}")
    pages = {k: int(v) for k, v in _VM_LINE.findall(out)}
    wanted = ("Pages free", "Pages inactive", "Pages speculative")
    return int(page.group(1)) * sum(pages.get(k, 0) for k in wanted)


def _darwin_available_bytes() -> int:
    """Free + inactive + speculative pages from vm_stat: what macOS can hand
    out without swapping. Capped by the GPU's wired-memory limit, which is
    where Metal weights live."""
    try:
        out = subprocess.run(
            ["vm_stat"],
            capture_output=True,
            text=True,
            check=True,
            timeout=VM_STAT_TIMEOUT_S,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise OSError(f"cannot read free memory from vm_stat: {e}") from None
    free = vm_stat_available_bytes(out)
    try:
        import mlx.core as mx

        limit = mx.device_info().get("max_recommended_working_set_size")
    except (ImportError, RuntimeError, AttributeError, ValueError):
        limit = None
    return min(free, int(limit)) if limit else free


def available_memory_bytes() -> int:
    """Memory this machine can give a new shard now, without swapping.

    Linux: MemAvailable from /proc/meminfo. macOS: free + inactive +
    speculative pages from `vm_stat`, at most the GPU wired-memory limit
    (mx.device_info()'s max_recommended_working_set_size, which follows
    `sysctl iogpu.wired_limit_mb`). Elsewhere: available physical pages.
    """
    if sys.platform == "darwin":
        return _darwin_available_bytes()
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_stage_memory(stage: StageAssignment, available: int | None = None) -> None:
    """Raise PlanError when this machine cannot hold `stage` now: refusing
    beats swapping a few hundred GB."""
    if available is None:
        available = available_memory_bytes()
    need = stage.weight_bytes + stage.reserved_bytes
    if need > available:
        raise PlanError(
            f"not enough free memory: worker {stage.worker!r} needs {format_gib(need)} for {stage.layers_phrase} "
            f"({format_gib(stage.weight_bytes)} weights + {format_gib(stage.reserved_bytes)} reserved) "
            f"but only {format_gib(available)} is free now ({format_gib(need - available)} short); "
            "close other programs or give this worker fewer layers"
        )
