"""The kimizmq side: a loopback cluster of real worker and coordinator processes
per system, measured through its OpenAI-compatible HTTP API and the workers'
own counters (`stats` on their control sockets)."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from kimizmq.config import load_config
from kimizmq.local import LocalCluster, write_config

from .machine import cores, pin
from .rows import DECODE_PROMPT_TOKENS, BenchConfig, BenchError, Row, decode_rate, median, prompt_ids

STATS_TIMEOUT_MS = 10_000
SHARED_DEVICE_CACHE_GB = 2.0  # each worker's MLX buffer cache when workers share a GPU


def _worker_stats(cfg) -> dict[str, tuple[int, float, float]] | None:
    """Each worker's (forwards, seconds computing decode steps, of those building
    their graphs) from its control socket; None if unavailable."""
    from kimizmq.control import ControlError, ControlTimeout, call_once

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


async def sse_chunks(session, url: str, body: dict):
    """The JSON chunks of a streamed completion, each with the time it arrived;
    an HTTP error or an error in the stream raises BenchError."""
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
            yield now, obj


async def stream(session, url: str, body: dict) -> tuple[float, list[float], int]:
    """POST a streaming completion: (send time, arrival time of each token, completion tokens)."""
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    async for now, obj in sse_chunks(session, url, body):
        for choice in obj.get("choices") or []:
            lp = choice.get("logprobs")
            if lp and lp.get("token_ids") is not None:
                times.extend([now] * len(lp["token_ids"]))
            elif choice.get("text"):
                times.append(now)
        usage = obj.get("usage") or usage
    tokens = usage["completion_tokens"] if usage else len(times)
    return t0, times, tokens


def body(prompt: list[int], n: int, *, per_token: bool) -> dict:
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
            return await stream(session, url, body(prompt, n, per_token=per_token))

        await one(prompt_ids(DECODE_PROMPT_TOKENS, 0), min(16, bc.decode_tokens))  # warm up
        if not only_ttft:
            before = _worker_stats(cfg)
            rates = []
            for trial in range(bc.decode_trials):
                _, times, _ = await one(prompt_ids(DECODE_PROMPT_TOKENS, 1 + trial), bc.decode_tokens)
                if len(times) < 2:
                    raise BenchError(f"decode: {len(times)} tokens streamed, expected {bc.decode_tokens}")
                rates.append(decode_rate(times))
            after = _worker_stats(cfg)
            tps = median(rates)
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


def kimizmq_rows(bc: BenchConfig, stages: int, rows: list[Row], *, chunk: int | None = None) -> list[Row]:
    """Start a loopback cluster of `stages` workers, measure it over HTTP, stop it."""
    only_ttft = chunk is not None
    chunk = chunk or bc.prefill_chunk
    longest = max([*bc.prompts, bc.nochunk_prompt or 0, DECODE_PROMPT_TOKENS])
    work = Path(tempfile.mkdtemp(prefix=f"kimi-bench-kimizmq-{stages}-", dir=bc.work))
    runtime = {
        "prefill_chunk": chunk,
        "max_context": longest + max(bc.decode_tokens, bc.aggregate_tokens, 16) + 64,
        "max_concurrent": max(16, *bc.concurrency),
        "decode": bc.decode,
        "stream_interval_ms": bc.stream_interval_ms,
    }
    if stages > max(bc.gpus, 1):  # workers share a device: no process may hoard freed memory
        runtime["cache_limit_gb"] = SHARED_DEVICE_CACHE_GB
    cfg_path = write_config(work / "kimi.toml", bc.model, stages, runtime=runtime)
    worker_env = {f"w{i}": {"CUDA_VISIBLE_DEVICES": str(i % bc.gpus)} for i in range(stages)} if bc.gpus else {}
    cluster = Cluster(cfg_path, worker_env, ready_timeout=bc.system_timeout_s)
    first = len(rows)
    try:
        with cluster:
            if bc.pin:
                mine = cores()
                for i, p in enumerate(cluster.workers.values()):
                    pin(p.pid, mine[i % len(mine)])
            drive = _drive_kimizmq(bc, cluster.api, load_config(cfg_path), stages, chunk, rows, only_ttft=only_ttft)
            asyncio.run(asyncio.wait_for(drive, bc.system_timeout_s))
    except Exception as e:  # noqa: BLE001 - one system failing must not lose the others' rows
        detail = cluster.stderr("coordinator")[-300:] if cluster.coordinator is not None else ""
        what = f"no result after {bc.system_timeout_s:g} s" if isinstance(e, TimeoutError) else str(e)
        message = f"{type(e).__name__}: {what}" + (f" | {detail}" if detail else "")
        rows.append(bc.row("kimizmq", stages, concurrency=1, prompt_tokens=0, metric="error", error=message))
    return rows[first:]


class Cluster(LocalCluster):
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
