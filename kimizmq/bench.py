"""`kimi bench`: kimizmq against mlx-lm on one model, side by side, in one run.

Systems, each measured with the same prompts and the same protocol:

  mlx-lm        single-process mlx-lm (the reference): `generate_step` for one
                request, `BatchGenerator` (batched decode) for several
  kimizmq       1, 2 and 3 stages on loopback: real worker and coordinator
                processes, driven through the OpenAI-compatible HTTP API
  mlx-lm-ring   mlx-lm's own pipeline (`model.model.pipeline(group)`) over
                mx.distributed with 2 ranks, started by mlx.launch with the
                ring backend on 127.0.0.1 (`mlx-lm-nccl`: the NCCL backend)

Metrics, one JSON row each (`Row`):

  decode     tokens/s of one request after its first token (concurrency 1)
  aggregate  tokens/s of all requests together, `concurrency` of them at once
             (generated tokens / wall time from the first submit to the last token)
  ttft       time to first token for a prompt of `prompt_tokens` tokens
  hop_us     per-hop overhead of a decode step: kimizmq, the step time not spent
             computing in a stage (the workers' own counters) over its hops
             (stages: stage 0 -> ... -> last stage -> stage 0, the decode ring;
             a single stage feeds itself in process, counted as one); the mlx-lm
             pipeline, its step time above single-process mlx-lm over 2 hops (the
             send between ranks and the all_gather back)
  build_ms   kimizmq decode: of the stages' compute per token, the time until a
             stage's graph was built (on a GPU the device starts its first
             layers meanwhile); the rest is waiting for the device

The mlx-lm processes run this module (`python -m kimizmq.bench SPEC.json`);
rank 0 writes their rows. Prints a table, writes the rows to a JSON file and
draws a PNG (matplotlib, the `bench` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import click

from .config import DECODE_MODES, MAX_STREAM_INTERVAL_MS, RuntimeConfig, load_config
from .local import LocalCluster, write_config

DEFAULT_OUT = "bench-results"
DECODE_PROMPT_TOKENS = 32
TOKEN_SPAN = 1000  # prompt ids are drawn from 1..TOKEN_SPAN: ordinary tokens of the test tokenizer
SYSTEMS = ("mlx-lm", "kimizmq-1", "kimizmq-2", "kimizmq-3", "mlx-lm-ring", "mlx-lm-nccl")
DEFAULT_SYSTEMS = ("mlx-lm", "kimizmq-1", "kimizmq-2", "kimizmq-3", "mlx-lm-ring")
NO_CHUNK = 1 << 20  # a prefill_chunk larger than any prompt: the prompt goes in one piece
SYSTEM_TIMEOUT_S = 3600.0
STATS_TIMEOUT_MS = 10_000
SHARED_DEVICE_CACHE_GB = 2.0  # each worker's MLX buffer cache when workers share a GPU
PIPELINE_HOPS = 2  # mlx-lm's pipeline: one send between the ranks, one all_gather back
LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; main()"


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
    metric: str  # decode | aggregate | ttft | error
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

    # One row per protocol (BENCHMARKS.md "What is measured"), for every system.

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
            aggregate_tps=_median(results),
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


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _decode_rate(times: list[float]) -> float:
    """Tokens/s of one request after its first token, from each token's arrival time."""
    return (len(times) - 1) / (times[-1] - times[0])


# -- the machine -----------------------------------------------------------------------


def describe_device() -> tuple[str, bool]:
    """("NVIDIA H100 80GB HBM3", True) or ("CPU AMD EPYC, 2 cores", False)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [smi, "--query-gpu=index,name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            )
            gpus = dict(line.split(",", 1) for line in out.stdout.splitlines() if "," in line)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None:
                gpus = {i: n for i, n in gpus.items() if i.strip() in visible.split(",")}
            names = [n.strip() for n in gpus.values()]
            if out.returncode == 0 and names:
                return (f"{len(names)} x {names[0]}" if len(names) > 1 else names[0]), True
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        probe = "import mlx.core as mx; print(hasattr(mx, 'cuda') and mx.cuda.is_available())"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        if out.stdout.strip() == "True":
            return "NVIDIA GPU (nvidia-smi not found)", True
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu}, {os.cpu_count()} cores", False


def _pin(pid: int, core: int) -> None:
    """Hold every thread of `pid` to one core (Linux); the threads it starts later inherit it."""
    if not hasattr(os, "sched_setaffinity"):
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), {core})


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _free_port_pair() -> int:
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


# -- mlx-lm: single process and its own pipeline ---------------------------------------------


def _mlx_lm_rows(bc: BenchConfig, backend: str | None) -> list[Row]:
    """Run the mlx-lm measurements in fresh processes; rank 0 writes the rows."""
    system = "mlx-lm" if backend is None else f"mlx-lm-{backend}"
    stages = 1 if backend is None else 2
    spec_dir = Path(tempfile.mkdtemp(prefix=f"kimi-bench-{system}-", dir=bc.work))
    out = spec_dir / "rows.json"
    spec = {
        "model": str(bc.model),
        "out": str(out),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(bc).items()},
        "system": system,
        "stages": stages,
        "distributed": backend is not None,
    }
    spec_path = spec_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if backend is None:
        if bc.gpus:
            env["CUDA_VISIBLE_DEVICES"] = "0"
        cmd = [sys.executable, "-m", "kimizmq.bench", str(spec_path)]
    else:
        cmd = [sys.executable, "-c", LAUNCH, "--backend", backend, "-n", "2"]
        if backend == "ring":
            cmd += ["--starting-port", str(_free_port_pair())]
        else:
            cmd += ["--nccl-port", str(_free_port_pair())]
        cmd += ["--python", sys.executable, "--", "-m", "kimizmq.bench", str(spec_path)]
    log = spec_dir / "log.txt"
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env, start_new_session=True)
        try:
            p.wait(bc.system_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            with open(log, "a") as f2:
                f2.write(f"killed: no result after {bc.system_timeout_s:g} s\n")
        finally:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    rows = [Row.from_dict(r) for r in json.loads(out.read_text())] if out.exists() else []
    if p.returncode != 0 and not any(r.error for r in rows):
        tail = log.read_text(errors="replace").strip().splitlines()[-6:]
        message = " | ".join(tail) or f"exit status {p.returncode}"
        rows.append(bc.row(system, stages, concurrency=1, prompt_tokens=0, metric="error", error=message))
    return rows


def _mlx_lm_process(spec_path: str) -> int:
    """One mlx-lm process (or pipeline rank): measure, and on rank 0 write the rows."""
    spec = json.loads(Path(spec_path).read_text())
    cfg = spec["config"]
    rank = int(os.environ.get("MLX_RANK", "0"))
    if spec["distributed"] and cfg["gpus"] and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank % cfg["gpus"])
    if spec["distributed"] and cfg["pin"]:
        cores = _cores()
        _pin(os.getpid(), cores[rank % len(cores)])

    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator, generate_step
    from mlx_lm.utils import load_model

    from .shard import compute_dtype

    bc = BenchConfig(**{**cfg, "model": Path(cfg["model"]), "work": Path(cfg["work"])})
    system, stages = spec["system"], spec["stages"]
    rows: list[Row] = []

    def write() -> None:
        if rank == 0:
            Path(spec["out"]).write_text(json.dumps([asdict(r) for r in rows], indent=1))

    try:
        group = (
            mx.distributed.init(backend=system.removeprefix("mlx-lm-"), strict=True) if spec["distributed"] else None
        )
        # What mlx_lm.utils.sharded_load does, minus its tokenizer (the test
        # model's tokenizer needs no remote code, and none is run here).
        model, _ = load_model(bc.model, lazy=True, strict=group is None)
        if group is not None:
            model.model.pipeline(group)
        dtype = compute_dtype("auto")
        if dtype is not None:
            model.set_dtype(dtype)
        mx.eval(model.parameters())
        if group is not None:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))

        def timed_generate(prompt: list[int], n: int) -> tuple[float, list[float]]:
            t0 = time.perf_counter()
            times = []
            for _ in generate_step(mx.array(prompt), model, max_tokens=n, prefill_step_size=bc.mlx_prefill_step):
                times.append(time.perf_counter())
            mx.synchronize()
            return t0, times

        def batch_generate(prompts: list[list[int]], n: int) -> tuple[float, int]:
            gen = BatchGenerator(
                model,
                max_tokens=n,
                stop_tokens=None,
                completion_batch_size=max(len(prompts), 32),
                prefill_batch_size=min(len(prompts), 8),
                prefill_step_size=bc.mlx_prefill_step,
            )
            t0 = time.perf_counter()
            gen.insert(prompts, [n] * len(prompts))
            tokens = 0
            while responses := gen.next_generated():
                tokens += len(responses)
            mx.synchronize()
            wall = time.perf_counter() - t0
            gen.close()
            return wall, tokens

        timed_generate(prompt_ids(DECODE_PROMPT_TOKENS, 0), min(16, bc.decode_tokens))  # warm up
        rates = []
        for trial in range(bc.decode_trials):
            _, times = timed_generate(prompt_ids(DECODE_PROMPT_TOKENS, 1 + trial), bc.decode_tokens)
            rates.append(_decode_rate(times))
        rows.append(bc.decode_row(system, stages, _median(rates)))
        write()

        for c in bc.concurrency:
            results = []
            for trial in range(bc.aggregate_trials):
                prompts = [prompt_ids(DECODE_PROMPT_TOKENS, 100 * (trial + 1) + i) for i in range(c)]
                if c == 1:
                    t0, times = timed_generate(prompts[0], bc.aggregate_tokens)
                    results.append(len(times) / (times[-1] - t0))
                else:
                    wall, tokens = batch_generate(prompts, bc.aggregate_tokens)
                    results.append(tokens / wall)
            rows.append(bc.aggregate_row(system, stages, c, results))
            write()

        for n in bc.prompts:
            ttfts = []
            for trial in range(bc.ttft_trials(n)):
                t0, times = timed_generate(prompt_ids(n, 7 + trial), 1)
                ttfts.append(times[0] - t0)
            rows.append(bc.ttft_row(system, stages, n, ttfts, prefill_chunk=bc.mlx_prefill_step))
            write()
    except Exception as e:  # noqa: BLE001 - reported in the rows, then the exit status
        rows.append(
            bc.row(system, stages, concurrency=1, prompt_tokens=0, metric="error", error=f"{type(e).__name__}: {e}")
        )
        write()
        raise
    return 0


# -- kimizmq: a loopback cluster driven over HTTP -------------------------------------------------


def _worker_stats(cfg) -> dict[str, tuple[int, float, float]] | None:
    """Each worker's (forwards, seconds computing decode steps, of those building
    their graphs) from its control socket; None if unavailable."""
    from .control import ControlError, ControlTimeout, call_once

    if getattr(getattr(cfg, "security", None), "curve_dir", None):
        return None
    out = {}
    for w in cfg.workers:
        try:
            result = call_once(w.control_address, "stats", timeout_s=STATS_TIMEOUT_MS / 1000, name=w.name)
            out[w.name] = (int(result["forwards"]), float(result["decode_compute_s"]), float(result["decode_build_s"]))
        except (ControlError, ControlTimeout, KeyError, TypeError, ValueError):
            return None
    return out


async def _stream(session, url: str, body: dict) -> tuple[float, list[float], int]:
    """POST a streaming completion: (send time, arrival time of each token, completion tokens)."""
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise BenchError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            obj = json.loads(line[6:])
            if "error" in obj:
                raise BenchError(f"stream error: {obj['error'].get('message')}")
            for choice in obj.get("choices") or []:
                lp = choice.get("logprobs")
                if lp and lp.get("token_ids") is not None:
                    times.extend([now] * len(lp["token_ids"]))
                elif choice.get("text"):
                    times.append(now)
            usage = obj.get("usage") or usage
    tokens = usage["completion_tokens"] if usage else len(times)
    return t0, times, tokens


def _body(prompt: list[int], n: int, *, per_token: bool) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if per_token:
        body["logprobs"] = 0  # every token in a chunk of its own, with its id
    return body


async def _drive_kimizmq(
    bc: BenchConfig, api: str, cfg, stages: int, chunk: int, rows: list[Row], *, only_ttft: bool
) -> None:
    """Measure a running cluster; each row is appended as soon as it is measured."""
    import aiohttp

    url = f"{api}/v1/completions"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=bc.system_timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(prompt: list[int], n: int, per_token: bool = True):
            return await _stream(session, url, _body(prompt, n, per_token=per_token))

        await one(prompt_ids(DECODE_PROMPT_TOKENS, 0), min(16, bc.decode_tokens))  # warm up
        if not only_ttft:
            before = _worker_stats(cfg)
            rates = []
            for trial in range(bc.decode_trials):
                _, times, _ = await one(prompt_ids(DECODE_PROMPT_TOKENS, 1 + trial), bc.decode_tokens)
                if len(times) < 2:
                    raise BenchError(f"decode: {len(times)} tokens streamed, expected {bc.decode_tokens}")
                rates.append(_decode_rate(times))
            after = _worker_stats(cfg)
            tps = _median(rates)
            compute_ms = build_ms = hop_us = None
            if before and after:
                # The stages' own time in one-token passes (a prompt's pass is not one).
                total_s = sum(after[w][1] - before[w][1] for w in after)
                steps = bc.decode_trials * (bc.decode_tokens - 1)
                compute_ms = 1e3 * total_s / steps
                build_ms = 1e3 * sum(after[w][2] - before[w][2] for w in after) / steps
                hop_us = max(0.0, (1e3 / tps - compute_ms) * 1e3 / stages)
            rows.append(
                bc.decode_row(
                    "kimizmq", stages, tps, compute_ms=compute_ms, build_ms=build_ms, hop_us=hop_us, prefill_chunk=chunk
                )
            )

            for c in bc.concurrency:
                results = []
                for trial in range(bc.aggregate_trials):
                    prompts = [prompt_ids(DECODE_PROMPT_TOKENS, 100 * (trial + 1) + i) for i in range(c)]
                    t0 = time.perf_counter()
                    done = await asyncio.gather(*(one(p, bc.aggregate_tokens, per_token=False) for p in prompts))
                    wall = time.perf_counter() - t0
                    results.append(sum(tokens for _, _, tokens in done) / wall)
                rows.append(bc.aggregate_row("kimizmq", stages, c, results, prefill_chunk=chunk))

        prompts = [bc.nochunk_prompt] if only_ttft else list(bc.prompts)
        for n in prompts:
            ttfts = []
            for trial in range(bc.ttft_trials(n)):
                t0, times, _ = await one(prompt_ids(n, 7 + trial), 1)
                if not times:
                    raise BenchError(f"ttft: no token streamed for a {n}-token prompt")
                ttfts.append(times[0] - t0)
            rows.append(bc.ttft_row("kimizmq", stages, n, ttfts, prefill_chunk=chunk))


def _kimizmq_rows(bc: BenchConfig, stages: int, rows: list[Row], *, chunk: int | None = None) -> list[Row]:
    """Start a loopback cluster of `stages` workers, measure it over HTTP, stop it."""
    only_ttft = chunk is not None
    chunk = chunk or bc.prefill_chunk
    longest = max([*bc.prompts, bc.nochunk_prompt or 0, DECODE_PROMPT_TOKENS])
    work = Path(tempfile.mkdtemp(prefix=f"kimi-bench-kimizmq-{stages}-", dir=bc.work))
    runtime = {
        "prefill_chunk": chunk,
        "max_context": longest + max(bc.decode_tokens, bc.aggregate_tokens, 16) + 64,
        "max_concurrent": max(16, *bc.concurrency),
        # a long unchunked prefill keeps a CPU worker busy for minutes: not a dead worker
        "liveness_timeout_s": 3600.0,
        "decode": bc.decode,
        "stream_interval_ms": bc.stream_interval_ms,
    }
    if stages > max(bc.gpus, 1):  # workers share a device: no process may hoard freed memory
        runtime["cache_limit_gb"] = SHARED_DEVICE_CACHE_GB
    cfg_path = write_config(work / "kimi.toml", bc.model, stages, runtime=runtime)
    worker_env = {f"w{i}": {"CUDA_VISIBLE_DEVICES": str(i % bc.gpus)} for i in range(stages)} if bc.gpus else {}
    cluster = _Cluster(cfg_path, worker_env, ready_timeout=bc.system_timeout_s)
    first = len(rows)
    try:
        with cluster:
            if bc.pin:
                cores = _cores()
                for i, p in enumerate(cluster.workers.values()):
                    _pin(p.pid, cores[i % len(cores)])
            drive = _drive_kimizmq(bc, cluster.api, load_config(cfg_path), stages, chunk, rows, only_ttft=only_ttft)
            asyncio.run(asyncio.wait_for(drive, bc.system_timeout_s))
    except Exception as e:  # noqa: BLE001 - one system failing must not lose the others' rows
        detail = cluster.stderr("coordinator")[-300:] if cluster.coordinator is not None else ""
        what = f"no result after {bc.system_timeout_s:g} s" if isinstance(e, TimeoutError) else str(e)
        message = f"{type(e).__name__}: {what}" + (f" | {detail}" if detail else "")
        rows.append(bc.row("kimizmq", stages, concurrency=1, prompt_tokens=0, metric="error", error=message))
    return rows[first:]


class _Cluster(LocalCluster):
    """LocalCluster with an environment of its own for each worker (its GPU)."""

    def __init__(self, config_path: Path, worker_env: dict[str, dict], **kw):
        super().__init__(config_path, **kw)
        self.worker_env = worker_env

    def start_worker(self, name: str):
        common = self.env
        self.env = {**common, **self.worker_env.get(name, {})}
        try:
            return super().start_worker(name)
        finally:
            self.env = common


# -- running, reporting ---------------------------------------------------------------------


def run_bench(bc: BenchConfig, save) -> list[Row]:
    """Measure every system in turn; `save(rows)` after each row, so a cut-off run keeps what it has."""
    rows = Rows(save)
    for system in bc.systems:
        click.echo(f"[bench] {system} ...", err=True)
        t0 = time.monotonic()
        if system == "mlx-lm":
            new = _mlx_lm_rows(bc, None)
            rows.extend(new)
        elif system.startswith("mlx-lm-"):
            new = _mlx_lm_rows(bc, system.removeprefix("mlx-lm-"))
            rows.extend(new)
        else:
            new = _kimizmq_rows(bc, int(system.removeprefix("kimizmq-")), rows)
        for r in new:
            if r.error:
                click.echo(f"[bench] {system}: {r.error}", err=True)
        click.echo(f"[bench] {system}: {len(new)} rows in {time.monotonic() - t0:.0f} s", err=True)
        save(rows)
        if system == "kimizmq-2" and bc.nochunk_prompt:
            click.echo(f"[bench] kimizmq-2, a {bc.nochunk_prompt}-token prompt in one piece ...", err=True)
            for r in _kimizmq_rows(bc, 2, rows, chunk=NO_CHUNK):
                if r.error:
                    click.echo(f"[bench] kimizmq-2 (one piece): {r.error}", err=True)
    fill_pipeline_hops(rows)
    save(rows)
    return list(rows)


def fill_pipeline_hops(rows: list[Row]) -> None:
    """hop_us of the mlx-lm pipeline rows: step time above single-process mlx-lm, per hop."""
    ref = next((r for r in rows if r.system == "mlx-lm" and r.metric == "decode" and r.step_ms), None)
    for r in rows:
        if ref and r.system.startswith("mlx-lm-") and r.metric == "decode" and r.step_ms:
            r.hop_us = max(0.0, (r.step_ms - ref.step_ms) * 1e3 / PIPELINE_HOPS)


def _chunk(r: Row) -> str:
    if r.prefill_chunk is None:
        return "-"
    return "whole" if r.metric == "ttft" and r.prefill_chunk >= r.prompt_tokens else str(r.prefill_chunk)


def _label(r: Row) -> str:
    name = f"{r.system}-{r.stages}" if r.system == "kimizmq" else r.system
    return f"{name}/{r.gpus}gpu" if r.gpus > 1 else name


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(rows: list[Row]) -> str:
    head = ["system", "stages", "conc", "prompt", "chunk", "decode tok/s", "aggregate tok/s", "TTFT s", "step ms"]
    head += ["compute ms", "build ms", "hop us", "error"]
    table = [head]
    for r in rows:
        table.append(
            [
                f"{r.system} ({r.decode_graph})" if r.decode_graph else r.system,
                str(r.stages),
                str(r.concurrency),
                str(r.prompt_tokens),
                _chunk(r),
                _num(r.decode_tps, ".1f"),
                _num(r.aggregate_tps, ".1f"),
                _num(r.ttft_s, ".3f"),
                _num(r.step_ms, ".2f"),
                _num(r.compute_ms, ".2f"),
                _num(r.build_ms, ".2f"),
                _num(r.hop_us, ".0f"),
                (r.error or "")[:80],
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [
        "  ".join(c.rjust(w) if i and i < len(head) - 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in table
    ]
    return "\n".join(line.rstrip() for line in lines)


def _find(rows: list[Row], system: str, stages: int, metric: str, **kw) -> Row | None:
    for r in rows:
        if (r.system, r.stages, r.metric) == (system, stages, metric) and all(
            getattr(r, k) == v for k, v in kw.items()
        ):
            return r
    return None


def goals(rows: list[Row], *, gpu: bool) -> list[tuple[str, str, bool | None]]:
    """The issue's goals, as (goal, measured, met); met is None where not measured."""
    out = []
    ref = _find(rows, "mlx-lm", 1, "decode")
    two = _find(rows, "kimizmq", 2, "decode")
    want = 0.95 if gpu else 0.9
    if ref and two and ref.decode_tps and two.decode_tps:
        ratio = two.decode_tps / ref.decode_tps
        measured = f"{ratio:.2f} x ({two.decode_tps:.1f} vs {ref.decode_tps:.1f} tok/s)"
        out.append((f"decode c=1, 2 stages >= {want} x mlx-lm", measured, ratio >= want))
    else:
        out.append((f"decode c=1, 2 stages >= {want} x mlx-lm", "not measured", None))
    a1 = _find(rows, "kimizmq", 2, "aggregate", concurrency=1)
    a8 = _find(rows, "kimizmq", 2, "aggregate", concurrency=8)
    if a1 and a8 and a1.aggregate_tps and a8.aggregate_tps:
        ratio = a8.aggregate_tps / a1.aggregate_tps
        measured = f"{ratio:.2f} x ({a8.aggregate_tps:.1f} vs {a1.aggregate_tps:.1f} tok/s)"
        out.append(("aggregate c=8 >= 1.8 x c=1, 2 stages", measured, ratio >= 1.8))
    else:
        out.append(("aggregate c=8 >= 1.8 x c=1, 2 stages", "not measured", None))
    ttft2 = [r for r in rows if (r.system, r.stages, r.metric) == ("kimizmq", 2, "ttft") and r.ttft_s]
    nochunk = next((r for r in ttft2 if (r.prefill_chunk or 0) >= NO_CHUNK), None)
    chunked = nochunk and next(
        (r for r in ttft2 if r.prompt_tokens == nochunk.prompt_tokens and (r.prefill_chunk or 0) < r.prompt_tokens),
        None,
    )
    if nochunk and chunked and nochunk.ttft_s and chunked.ttft_s:
        ratio = chunked.ttft_s / nochunk.ttft_s
        measured = f"{ratio:.2f} x ({chunked.ttft_s:.2f} s vs {nochunk.ttft_s:.2f} s)"
        out.append((f"TTFT {nochunk.prompt_tokens} tokens, 2 stages, chunked <= 0.7 x whole", measured, ratio <= 0.7))
    else:
        out.append(("TTFT, 2 stages, chunked <= 0.7 x whole", "not measured", None))
    ring = [r for r in rows if r.system.startswith("mlx-lm-") and r.metric != "error"]

    def kimizmq_two(r: Row) -> Row | None:  # the same measurement, kimizmq's own prefill chunk
        return next(
            (
                k
                for k in rows
                if (k.system, k.stages, k.metric, k.concurrency, k.prompt_tokens)
                == ("kimizmq", 2, r.metric, r.concurrency, r.prompt_tokens)
                and (k.prefill_chunk or 0) < NO_CHUNK
            ),
            None,
        )

    pairs = [(r, kimizmq_two(r)) for r in ring]
    pairs = [(r, k) for r, k in pairs if k is not None]
    if pairs:
        lost = []
        for r, k in pairs:
            if r.metric == "ttft":
                if k.ttft_s is None or r.ttft_s is None or k.ttft_s > r.ttft_s:
                    lost.append(f"{r.metric}/{r.prompt_tokens}")
            else:
                kv, rv = (k.decode_tps, r.decode_tps) if r.metric == "decode" else (k.aggregate_tps, r.aggregate_tps)
                if kv is None or rv is None or kv < rv:
                    lost.append(f"{r.metric}/c{r.concurrency}")
        name = ring[0].system
        out.append(
            (
                f"kimizmq 2 stages ahead of {name} on every row",
                "behind on " + ", ".join(lost) if lost else "ahead on all",
                not lost,
            )
        )
    else:
        errs = [r.error for r in rows if r.system.startswith("mlx-lm-") and r.error]
        out.append(
            (
                "kimizmq ahead of the mlx-lm pipeline on every row",
                "pipeline not measured" + (f": {errs[0][:120]}" if errs else ""),
                None,
            )
        )
    return out


def format_goals(rows: list[Row], *, gpu: bool) -> str:
    mark = {True: "met", False: "MISSED", None: "-"}
    return "\n".join(f"  [{mark[met]:>6}] {goal}: {measured}" for goal, measured, met in goals(rows, gpu=gpu))


def plot(rows: list[Row], path: Path) -> bool:
    """Four panels: decode tok/s, aggregate tok/s by concurrency, TTFT by prompt, hop overhead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r.metric != "error"]
    labels = list(dict.fromkeys(_label(r) for r in ok))
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    dec = [(lbl, next((r.decode_tps for r in ok if _label(r) == lbl and r.metric == "decode"), None)) for lbl in labels]
    dec = [(lbl, v) for lbl, v in dec if v]
    ax[0][0].bar([d[0] for d in dec], [d[1] for d in dec], color="tab:blue")
    ax[0][0].set_title("decode tokens/s, one request")
    for lbl in labels:
        pts = sorted((r.concurrency, r.aggregate_tps) for r in ok if _label(r) == lbl and r.metric == "aggregate")
        if pts:
            ax[0][1].plot(*zip(*pts), marker="o", label=lbl)
        pts = sorted(
            (r.prompt_tokens, r.ttft_s)
            for r in ok
            if _label(r) == lbl and r.metric == "ttft" and (r.prefill_chunk or 0) < NO_CHUNK
        )
        if pts:
            ax[1][0].plot(*zip(*pts), marker="o", label=lbl)
    whole = sorted((r.prompt_tokens, r.ttft_s) for r in ok if r.metric == "ttft" and (r.prefill_chunk or 0) >= NO_CHUNK)
    if whole:
        ax[1][0].plot(*zip(*whole), marker="x", linestyle="none", color="black", label="kimizmq-2, prompt whole")
    ax[0][1].set_title("aggregate tokens/s by concurrency")
    ax[0][1].set_xlabel("requests in flight")
    ax[0][1].legend(fontsize=8)
    ax[1][0].set_title("time to first token (s)")
    ax[1][0].set_xlabel("prompt tokens")
    ax[1][0].set_xscale("log", base=2)
    ax[1][0].set_yscale("log")
    ax[1][0].legend(fontsize=8)
    hops = [(_label(r), r.hop_us) for r in ok if r.metric == "decode" and r.hop_us is not None]
    ax[1][1].bar([h[0] for h in hops], [h[1] for h in hops], color="tab:orange")
    ax[1][1].set_title("per-hop overhead of a decode step (us)")
    first = ok[0] if ok else None
    if first:
        fig.suptitle(f"{first.model} on {first.device}" + (f", {first.gpus} GPUs" if first.gpus else ""))
    for a in (ax[0][0], ax[1][1]):
        a.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return values


def _report(rows: list[Row], json_path: Path, *, gpu: bool, draw: bool) -> None:
    click.echo(format_table(rows))
    click.echo("\ngoals:")
    click.echo(format_goals(rows, gpu=gpu))
    click.echo(f"\nrows: {json_path}")
    if draw:
        png = json_path.with_suffix(".png")
        if plot(rows, png):
            click.echo(f"plot: {png}")
        else:
            click.echo("plot: skipped (matplotlib is not installed: pip install -e '.[bench]')")


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model", "model_dir", type=click.Path(file_okay=False), help="model directory (default: the test model)"
)
@click.option("--kimi-geometry", is_flag=True, help="a synthetic model with Kimi-K2's per-layer geometry instead")
@click.option("--layers", type=click.IntRange(2), default=16, show_default=True, help="layers of --kimi-geometry")
@click.option(
    "--models",
    "models_dir",
    default="models",
    show_default=True,
    type=click.Path(file_okay=False),
    help="where generated models are kept",
)
@click.option("--quick", is_flag=True, help="fewer tokens, short prompts: a few minutes on 2 CPU cores")
@click.option("--systems", default=",".join(DEFAULT_SYSTEMS), show_default=True, help=f"of {', '.join(SYSTEMS)}")
@click.option("--decode-tokens", type=click.IntRange(2), help="tokens per decode request")
@click.option("--aggregate-tokens", type=click.IntRange(1), help="tokens per request in aggregate rows")
@click.option("--concurrency", "concurrency_text", help="requests in flight for aggregate rows, e.g. 1,4,8,16")
@click.option("--prompts", "prompts_text", help="prompt lengths for time to first token, e.g. 128,2048,8192")
@click.option("--nochunk-prompt", type=click.IntRange(0), help="prompt for kimizmq-2 unchunked (0: skip)")
@click.option("--prefill-chunk", type=click.IntRange(1), help="kimizmq's prefill_chunk")
@click.option(
    "--decode",
    type=click.Choice(DECODE_MODES),
    default=RuntimeConfig.decode,
    show_default=True,
    help="kimizmq's one-token steps (runtime.decode)",
)
@click.option(
    "--stream-interval-ms",
    type=click.FloatRange(0, MAX_STREAM_INTERVAL_MS),
    default=RuntimeConfig.stream_interval_ms,
    show_default=True,
    help="kimizmq's runtime.stream_interval_ms (0: every token sent on its own)",
)
@click.option("--gpus", type=click.IntRange(0), default=0, show_default=True, help="one worker / rank per GPU")
@click.option(
    "--pin/--no-pin",
    default=False,
    help="each worker / rank on its own CPU core (off: a stage evaluates each layer while building the next, on a second core)",
)
@click.option(
    "--system-timeout", type=click.FloatRange(1), default=SYSTEM_TIMEOUT_S, show_default=True, help="seconds per system"
)
@click.option("--out", "out_dir", default=DEFAULT_OUT, show_default=True, type=click.Path(file_okay=False))
@click.option("--name", help="file name stem for the JSON and PNG (default: model, device, time)")
@click.option("--no-plot", is_flag=True, help="no PNG")
@click.option("--replot", type=click.Path(dir_okay=False, exists=True), help="print and draw an earlier JSON; no run")
def bench_command(
    model_dir, kimi_geometry, layers, models_dir, quick, systems, decode_tokens, aggregate_tokens, concurrency_text, prompts_text,
    nochunk_prompt, prefill_chunk, decode, stream_interval_ms, gpus, pin, system_timeout, out_dir, name, no_plot, replot,
):  # fmt: skip
    """Measure kimizmq (1, 2, 3 stages on loopback) against single-process mlx-lm and
    mlx-lm's own pipeline: decode tokens/s, aggregate tokens/s under concurrency,
    time to first token, per-hop overhead. Prints a table, writes JSON and a PNG."""
    if replot:
        rows = [Row.from_dict(r) for r in json.loads(Path(replot).read_text())]
        fill_pipeline_hops(rows)
        _report(rows, Path(replot), gpu=any("NVIDIA" in r.device for r in rows), draw=not no_plot)
        return
    from .testmodel import KIMI_K2_GEOMETRY, make_test_model

    chosen = tuple(s.strip() for s in systems.split(",") if s.strip())
    if bad := [s for s in chosen if s not in SYSTEMS]:
        raise click.BadParameter(
            f"unknown system(s) {bad}; expected some of {', '.join(SYSTEMS)}", param_hint="--systems"
        )
    device, gpu = describe_device()
    if model_dir and kimi_geometry:
        raise click.BadParameter("give --model or --kimi-geometry, not both")
    if kimi_geometry:
        experts = KIMI_K2_GEOMETRY["n_routed_experts"]
        path = (Path(models_dir) / f"kimi-k2-geometry-l{layers}-e{experts}").resolve()
        click.echo(f"[bench] making the Kimi-geometry model at {path} (once) ...", err=True)
        model = make_test_model(path, seed=0, num_layers=layers, geometry=KIMI_K2_GEOMETRY)
        label = f"kimi-k2-geometry ({layers} layers, {experts} routed experts)"
    elif model_dir:
        model = Path(model_dir).resolve()
        label = model.name
    else:
        model = make_test_model((Path(models_dir) / "kimi-k2-tiny").resolve())
        label = "kimi-k2-tiny test model (7 layers, hidden 256)"
    if not (model / "config.json").exists():
        raise click.ClickException(f"{model}: no config.json; is --model a model directory?")

    bc = BenchConfig(model=model, model_label=label, systems=chosen, gpus=gpus, device=device, gpu=gpu)
    bc.system_timeout_s = system_timeout
    bc.dtype = "bfloat16 activations (the checkpoint's)" if gpu else "float32"
    bc.pin = bool(pin)
    bc.decode = decode
    bc.stream_interval_ms = stream_interval_ms
    if quick:
        bc.decode_tokens, bc.decode_trials = 48, 2
        bc.aggregate_tokens = 32
        bc.prompts, bc.nochunk_prompt, bc.prefill_chunk = (128, 1024), 1024, 128
    bc.decode_tokens = decode_tokens or bc.decode_tokens
    bc.aggregate_tokens = aggregate_tokens or bc.aggregate_tokens
    if concurrency_text:
        bc.concurrency = _ints(concurrency_text)
    if prompts_text:
        bc.prompts = _ints(prompts_text)
    if nochunk_prompt is not None:
        bc.nochunk_prompt = nochunk_prompt or None
    bc.prefill_chunk = prefill_chunk or bc.prefill_chunk

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bc.work = Path(tempfile.mkdtemp(prefix="work-", dir=out.resolve()))
    stem = name or f"bench-{model.name}-{'gpu' if gpu else 'cpu'}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path = out / f"{stem}.json"

    def save(rows: list[Row]) -> None:
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")

    click.echo(f"[bench] {label} on {device}; systems: {', '.join(chosen)}; pinned: {bc.pin}", err=True)
    t0 = time.monotonic()
    rows = run_bench(bc, save)
    shutil.rmtree(bc.work, ignore_errors=True)
    click.echo(f"[bench] done in {time.monotonic() - t0:.0f} s\n", err=True)
    _report(rows, json_path, gpu=gpu, draw=not no_plot)


if __name__ == "__main__":
    sys.exit(_mlx_lm_process(sys.argv[1]))
