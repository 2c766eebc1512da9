"""The coordinator's `load` command to a worker, its arguments checked: which
layers this stage holds, where it sends, and the limits it serves under."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config

MAX_STAGES = 1024  # a load's `stages` (Kimi-K2 has 61 layers)
LOAD_MARGIN_BYTES = 1 << 30  # beyond the shard's own bytes when the load names no reserve


@dataclass
class LoadSpec:
    start: int
    end: int
    next_address: str
    report_address: str
    first_address: str | None
    dtype: str
    max_requests: int
    max_context: int
    reserve_bytes: int
    stages: int  # of the pipeline: the first stage splits waves into this many batches
    prefix_cache_bytes: int = 0  # finished requests' states this stage may keep for reuse

    @classmethod
    def from_args(cls, args: dict, cfg: Config) -> LoadSpec:
        try:
            spec = cls(
                start=args["start"],
                end=args["end"],
                next_address=args["next"],
                report_address=args.get("report", cfg.coordinator.result_address),
                first_address=args.get("first"),
                dtype=args.get("dtype", cfg.runtime.dtype),
                max_requests=args.get("max_requests", cfg.runtime.max_concurrent),
                max_context=args.get("max_context", cfg.runtime.max_context),
                reserve_bytes=args.get("reserve_bytes", LOAD_MARGIN_BYTES),
                stages=args.get("stages", 1),
                prefix_cache_bytes=args.get("prefix_cache_bytes", 0),
            )
        except KeyError as e:
            raise ValueError(f"load needs {e.args[0]!r}") from None
        ints = (
            spec.start,
            spec.end,
            spec.max_requests,
            spec.max_context,
            spec.reserve_bytes,
            spec.stages,
            spec.prefix_cache_bytes,
        )
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise ValueError(
                "load: start, end, max_requests, max_context, reserve_bytes, stages and prefix_cache_bytes "
                "must be integers"
            )
        if spec.prefix_cache_bytes < 0:
            raise ValueError("load: prefix_cache_bytes must be >= 0")
        if not all(isinstance(v, str) for v in (*spec.peers, spec.dtype)):
            raise ValueError("load: next, report, first and dtype must be strings")
        if not all(a.startswith("tcp://") for a in spec.peers):
            raise ValueError("load: next, report and first must be tcp:// addresses")
        if not 0 <= spec.start < spec.end or spec.max_requests < 1 or spec.max_context < 1:
            raise ValueError("load: needs 0 <= start < end, max_requests >= 1 and max_context >= 1")
        if not 1 <= spec.stages <= MAX_STAGES:
            raise ValueError(f"load: stages must be in 1..{MAX_STAGES}")
        return spec

    @property
    def first(self) -> bool:
        """Whether this stage takes token ids (it holds layer 0): the last
        stage then feeds its decode steps to itself, not through `first`."""
        return self.start == 0

    @property
    def peers(self) -> list[str]:
        """The addresses this stage sends to."""
        first = [] if self.first_address is None else [self.first_address]
        return [self.next_address, self.report_address, *first]
