"""What one measurement is (`Row`), how a run is set up (`BenchConfig`), and the
prompts every system is given."""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from kimizmq.config import RuntimeConfig

DECODE_PROMPT_TOKENS = 32
TOKEN_SPAN = 1000  # prompt ids are drawn from 1..TOKEN_SPAN: ordinary tokens of the test tokenizer
SYSTEMS = ("mlx-lm", "kimizmq-1", "kimizmq-2", "kimizmq-3", "mlx-lm-ring", "mlx-lm-nccl")
DEFAULT_SYSTEMS = ("mlx-lm", "kimizmq-1", "kimizmq-2", "kimizmq-3", "mlx-lm-ring")
NO_CHUNK = 1 << 20  # a prefill_chunk larger than any prompt: the prompt goes in one piece
SYSTEM_TIMEOUT_S = 3600.0


class BenchError(RuntimeError):
    """A system that could not be measured; the message goes into its rows."""


class Rows(list):
    """The run's rows; each one appended is saved at once, so a run cut off keeps what it measured."""

    def __init__(self, save=None):
        super().__init__()
        self.save = save

    def append(self, row) -> None:
        super().append(row)
        if self.save is not None:
            self.save(self)


@dataclass
class Row:
    """One measurement. `metric` says which of the three numbers it holds."""

    system: str  # mlx-lm | kimizmq | mlx-lm-ring | mlx-lm-nccl
    stages: int
    concurrency: int
    prompt_tokens: int
    metric: str  # decode | aggregate | ttft | turn_ttft | error
    decode_tps: float | None = None
    aggregate_tps: float | None = None
    ttft_s: float | None = None
    decode_tokens: int = 0  # tokens generated per request
    prefill_chunk: int | None = None  # kimizmq's runtime prefill_chunk; mlx-lm's prefill_step_size
    step_ms: float | None = None  # decode: wall time per token
    compute_ms: float | None = None  # decode, kimizmq: the stages' own compute per token, summed
    build_ms: float | None = None  # decode, kimizmq: of compute_ms, until the graphs were built
    hop_us: float | None = None
    trials: int = 1
    model: str = ""
    device: str = ""
    gpus: int = 0  # GPUs this system's processes were spread over (0: all on the default device)
    pinned: bool = False  # each worker / rank held to its own CPU core
    dtype: str = ""
    load_avg: float | None = None  # the machine's 1-minute load average when measured: others' work skews CPU rows
    decode_graph: str = ""  # kimizmq: its stages' one-token steps, "compiled" or "eager" (runtime.decode)
    stream_interval_ms: float | None = None  # kimizmq: runtime.stream_interval_ms (tokens gathered into runs)
    turn: int | None = None  # turn_ttft: the turn of the conversation, from 1
    cached_tokens: int | None = None  # turn_ttft: prompt tokens the system took from its cache
    error: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class BenchConfig:
    model: Path
    model_label: str
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    decode_tokens: int = 128
    decode_trials: int = 3
    aggregate_tokens: int = 64
    aggregate_trials: int = 1
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    prompts: tuple[int, ...] = (128, 2048, 4096, 8192)
    nochunk_prompt: int | None = 4096  # kimizmq 2 stages, prompt in one piece: the pipelined-prefill goal
    prefill_chunk: int = 256
    mlx_prefill_step: int = 2048  # mlx-lm's own default
    gpus: int = 0
    pin: bool = False
    gpu: bool = False
    system_timeout_s: float = SYSTEM_TIMEOUT_S
    device: str = ""
    dtype: str = ""
    decode: str = RuntimeConfig.decode  # kimizmq's runtime.decode
    stream_interval_ms: float = RuntimeConfig.stream_interval_ms  # kimizmq's runtime.stream_interval_ms
    work: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    def ttft_trials(self, prompt_tokens: int) -> int:
        """Twice for prompts up to 2048 tokens (the first run of a shape may compile
        kernels; longer prompts reuse them), the best counting; once above."""
        return 2 if prompt_tokens <= 2048 else 1

    def row(self, system: str, stages: int, **kw) -> Row:
        return Row(
            system=system,
            stages=stages,
            model=self.model_label,
            device=self.device,
            gpus=min(self.gpus, stages),
            pinned=self.pin,
            dtype=self.dtype,
            load_avg=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            decode_graph=self.decode if system == "kimizmq" else "",
            stream_interval_ms=self.stream_interval_ms if system == "kimizmq" else None,
            **kw,
        )

    # One row per protocol (BENCHMARKS.md, "What is measured"), for every system.

    def decode_row(self, system: str, stages: int, tps: float, **kw) -> Row:
        return self.row(
            system,
            stages,
            concurrency=1,
            prompt_tokens=DECODE_PROMPT_TOKENS,
            metric="decode",
            decode_tps=tps,
            step_ms=1e3 / tps,
            decode_tokens=self.decode_tokens,
            trials=self.decode_trials,
            **kw,
        )

    def aggregate_row(self, system: str, stages: int, concurrency: int, results: list[float], **kw) -> Row:
        return self.row(
            system,
            stages,
            concurrency=concurrency,
            prompt_tokens=DECODE_PROMPT_TOKENS,
            metric="aggregate",
            aggregate_tps=median(results),
            decode_tokens=self.aggregate_tokens,
            trials=self.aggregate_trials,
            **kw,
        )

    def ttft_row(self, system: str, stages: int, prompt_tokens: int, ttfts: list[float], **kw) -> Row:
        return self.row(
            system,
            stages,
            concurrency=1,
            prompt_tokens=prompt_tokens,
            metric="ttft",
            ttft_s=min(ttfts),
            decode_tokens=1,
            trials=len(ttfts),
            **kw,
        )


def prompt_ids(n: int, seed: int) -> list[int]:
    """A fixed pseudo-random prompt of n ordinary token ids."""
    x = (seed * 2654435761 + 12345) & 0xFFFFFFFF
    out = []
    for _ in range(n):
        x = (1103515245 * x + 12345) & 0x7FFFFFFF
        out.append(1 + x % TOKEN_SPAN)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def decode_rate(times: list[float]) -> float:
    """Tokens/s of one request after its first token, from each token's arrival time."""
    return (len(times) - 1) / (times[-1] - times[0])
