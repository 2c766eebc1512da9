"""Wired memory on macOS: the GPU keeps a worker's weights resident only up
to the wired limit.

A worker sets MLX's wired limit for its shard ([runtime] wired_limit_gb; by
default the GPU's recommended working set, as mlx-lm does). macOS itself caps
what can be wired at `iogpu.wired_limit_mb` (0: its default, about three
quarters of RAM); `kimi plan` and `kimi up` say when a shard needs more, with
the sysctl to run. Elsewhere this does nothing.
"""

from __future__ import annotations

import math
import sys

MIB = 1 << 20
MACOS_DEFAULT_WIRED_FRACTION = 0.75  # iogpu.wired_limit_mb = 0: about 3/4 of RAM
OS_RESERVE_BYTES = 8 << 30  # left to macOS when suggesting a higher limit


def limit_bytes(wired_limit_gb: float, recommended: int | None) -> int | None:
    """The wired limit a worker sets: None to leave MLX's default."""
    if wired_limit_gb == 0:
        return None
    if wired_limit_gb < 0:
        return int(recommended) if recommended else None
    return int(wired_limit_gb * (1 << 30))


def apply(wired_limit_gb: float, platform: str = sys.platform) -> int | None:
    """Set MLX's wired limit on macOS; the bytes set, or None (not macOS, or left as is)."""
    if platform != "darwin":
        return None
    import mlx.core as mx

    limit = limit_bytes(wired_limit_gb, mx.device_info().get("max_recommended_working_set_size"))
    if limit is not None:
        mx.set_wired_limit(limit)
    return limit


def suggested_mb(need_bytes: int) -> int:
    """A wired limit (MB, rounded up to a whole GB) that holds `need_bytes`."""
    return math.ceil(need_bytes / MIB / 1024) * 1024


def sysctl_command(need_bytes: int) -> str:
    return f"sudo sysctl iogpu.wired_limit_mb={suggested_mb(need_bytes)}"


def sysctl_warning(worker: str, need_bytes: int, wired_mb: str | None, mem_bytes: str | None) -> str | None:
    """A warning when a Mac's wired limit (`sysctl -n iogpu.wired_limit_mb`,
    and hw.memsize for its default) is below what `worker`'s shard needs."""
    try:
        mb = int(wired_mb or 0)
        mem = int(mem_bytes or 0)
    except ValueError:
        return None
    limit = mb * MIB if mb > 0 else int(mem * MACOS_DEFAULT_WIRED_FRACTION)
    if limit <= 0 or need_bytes <= limit:
        return None
    now = f"{mb} MB" if mb > 0 else f"0 (the default, about {limit // MIB} MB)"
    advice = f"run `{sysctl_command(need_bytes)}` there (it lasts until reboot)"
    if mem and suggested_mb(need_bytes) * MIB > mem - OS_RESERVE_BYTES:
        advice += f"; that leaves macOS under {OS_RESERVE_BYTES >> 30} GB, so give {worker} fewer layers instead"
    return (
        f"worker {worker!r} needs {need_bytes // MIB} MB wired for its shard but iogpu.wired_limit_mb is {now}; "
        + advice
    )
