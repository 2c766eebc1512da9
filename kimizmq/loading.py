"""A worker's `load`: the memory its shard needs checked before a byte is read,
the shard read a module at a time (shard.py's ShardLoader), then the Stage that
serves it. A generator, so the worker's loop reads one module per round and
answers commands in between (MLX wants one thread for it all)."""

from __future__ import annotations

import time
from collections.abc import Generator

from . import log, wired
from .checkpoint import CheckpointError
from .config import Config
from .loadspec import LoadSpec
from .memory import available_memory_bytes, check_stage_memory
from .plan import StageAssignment
from .shard import ShardError, ShardLoader, compiled_decode
from .stage import Stage

# what a load can fail with: the worker reports it and stays up
LOAD_ERRORS = (ShardError, CheckpointError, ValueError, OSError, RuntimeError)

logger = log.get_logger()


def load_stage(cfg: Config, name: str, spec: LoadSpec) -> Generator[dict, None, Stage]:
    """Yield the load's progress after every module read ({"done_bytes",
    "total_bytes", "rate_bytes_s"}); return the stage; raise LOAD_ERRORS."""
    model_dir = cfg.model_path
    t0 = time.monotonic()
    loader = ShardLoader(model_dir, spec.start, spec.end, dtype=spec.dtype)  # headers only, so far
    weights = loader.loaded_bytes
    planned = StageAssignment(name, spec.start, spec.end, weights, spec.reserve_bytes, memory_bytes=0)
    check_stage_memory(planned, available_memory_bytes())  # before a byte is read
    if (wired_limit := wired.apply(cfg.runtime.wired_limit_gb)) is not None:
        logger.info("wired_limit_set", bytes=wired_limit)
    logger.info("load_started", start=spec.start, end=spec.end, bytes=weights, model=str(model_dir))
    for done, total in loader:
        rate = done / max(time.monotonic() - t0, 1e-9)
        logger.info("load_progress", done_bytes=done, total_bytes=total, rate_mb_s=round(rate / 1e6, 1))
        yield {"done_bytes": done, "total_bytes": total, "rate_bytes_s": rate}
    return Stage(
        loader.shard,
        max_requests=spec.max_requests,
        max_context=spec.max_context,
        compiled_decode=compiled_decode(cfg.runtime.decode),
        model_dir=model_dir,
        prefix_cache_bytes=spec.prefix_cache_bytes,
    )
