"""The multi-turn row: one conversation of TURNS turns growing to about 4 000
tokens, the time to the first token of every turn, for kimizmq with its prefix
cache, kimizmq without it (`prefix_cache_gb = 0`) and mlx-lm with its prompt
cache, side by side in one run.

Each turn's prompt is the previous turn's prompt, the reply the system gave
(greedy) and a new user message, as a chat client sends it. mlx-lm's side runs
mlx_lm.server's own cache (`LRUPromptCache`: fetch_nearest_cache before a
request, insert_cache after) around `generate_step` in one process, without
its HTTP layer: mlx_lm.server loads its tokenizer through transformers, which
cannot read the test model (it ships no tokenizer code to run)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .driver import Cluster, sse_chunks
from .rows import BenchConfig, BenchError, Row, prompt_ids

TURNS = 8
FIRST_TOKENS = 500  # the system prompt and first question
USER_TOKENS = 450  # each later user message
REPLY_TOKENS = 32
STAGES = 2
MLX_LM_SYSTEM = "mlx-lm prompt cache"
MLX_LM_CACHE_ENTRIES = 10  # mlx_lm.server's --prompt-cache-size default


def user_message(turn: int) -> list[int]:
    return prompt_ids(FIRST_TOKENS if turn == 0 else USER_TOKENS, 9000 + turn)


def _row(bc: BenchConfig, system: str, stages: int, turn: int, prompt: int, cached: int | None, ttft: float) -> Row:
    return bc.row(
        system,
        stages,
        concurrency=1,
        prompt_tokens=prompt,
        metric="turn_ttft",
        ttft_s=ttft,
        decode_tokens=REPLY_TOKENS,
        turn=turn + 1,
        cached_tokens=cached,
    )


# -- kimizmq -----------------------------------------------------------------------


async def _turn(session, url: str, prompt: list[int]) -> tuple[float, list[int], int]:
    """One streamed turn: (time to first token, the reply's token ids, cached prompt tokens)."""
    body = {
        "prompt": prompt,
        "max_tokens": REPLY_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "logprobs": 0,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, reply, usage = None, [], {}
    async for now, obj in sse_chunks(session, url, body):
        for choice in obj.get("choices") or []:
            ids = (choice.get("logprobs") or {}).get("token_ids") or []
            if ids and ttft is None:
                ttft = now - t0
            reply += ids
        usage = obj.get("usage") or usage
    if ttft is None or len(reply) != REPLY_TOKENS:
        raise BenchError(f"a turn streamed {len(reply)} tokens, expected {REPLY_TOKENS}")
    return ttft, reply, (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


async def _conversation(api: str) -> list[tuple[int, int, float]]:
    import aiohttp

    url = f"{api}/v1/completions"
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=3600)) as session:
        await _turn(session, url, prompt_ids(64, 1))  # warm up: compiled decode, first allocations
        history: list[int] = []
        for turn in range(TURNS):
            prompt = history + user_message(turn)
            ttft, reply, cached = await _turn(session, url, prompt)
            out.append((len(prompt), cached, ttft))
            history = prompt + reply
    return out


def kimizmq_turn_rows(bc: BenchConfig, *, prefix_cache: bool) -> list[Row]:
    system = "kimizmq" if prefix_cache else "kimizmq no prefix cache"
    work = Path(tempfile.mkdtemp(prefix="kimi-bench-turns-", dir=bc.work))
    from kimizmq.local import write_config

    runtime = {
        "prefill_chunk": bc.prefill_chunk,
        "max_context": FIRST_TOKENS + TURNS * (USER_TOKENS + REPLY_TOKENS) + 64,
        "decode": bc.decode,
        "stream_interval_ms": bc.stream_interval_ms,
        "prefix_cache_gb": -1.0 if prefix_cache else 0.0,  # on: the default budget
    }
    cfg_path = write_config(work / "kimi.toml", bc.model, STAGES, runtime=runtime)
    worker_env = {f"w{i}": {"CUDA_VISIBLE_DEVICES": str(i % bc.gpus)} for i in range(STAGES)} if bc.gpus else {}
    try:
        with Cluster(cfg_path, worker_env, ready_timeout=bc.system_timeout_s) as cluster:
            turns = asyncio.run(asyncio.wait_for(_conversation(cluster.api), bc.system_timeout_s))
    except Exception as e:  # noqa: BLE001 - one system failing must not lose the others' rows
        return [
            bc.row(system, STAGES, concurrency=1, prompt_tokens=0, metric="error", error=f"{type(e).__name__}: {e}")
        ]
    return [_row(bc, system, STAGES, k, p, c, t) for k, (p, c, t) in enumerate(turns)]


# -- mlx-lm, in a process of its own ---------------------------------------------------


def mlx_lm_turn_rows(bc: BenchConfig) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="kimi-bench-turns-mlx-lm-", dir=bc.work))
    out = work / "turns.json"
    spec = {"model": str(bc.model), "out": str(out), "prefill_step": bc.mlx_prefill_step}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": "0"} if bc.gpus else {})}
    cmd = [sys.executable, "-m", "kimizmq_bench.multiturn", str(work / "spec.json")]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=bc.system_timeout_s)
    except subprocess.TimeoutExpired:
        return [bc.row(MLX_LM_SYSTEM, 1, concurrency=1, prompt_tokens=0, metric="error", error="timed out")]
    if done.returncode != 0 or not out.exists():
        tail = " | ".join(done.stderr.strip().splitlines()[-4:])
        return [bc.row(MLX_LM_SYSTEM, 1, concurrency=1, prompt_tokens=0, metric="error", error=tail)]
    return [_row(bc, MLX_LM_SYSTEM, 1, k, p, c, t) for k, (p, c, t) in enumerate(json.loads(out.read_text()))]


def _mlx_lm_conversation(spec: dict) -> list[tuple[int, int, float]]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import LRUPromptCache, make_prompt_cache
    from mlx_lm.utils import load_model

    from kimizmq.shard import compute_dtype

    model, _ = load_model(Path(spec["model"]))
    if (dtype := compute_dtype("auto")) is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    store = LRUPromptCache(max_size=MLX_LM_CACHE_ENTRIES)

    def turn(prompt: list[int]) -> tuple[float, list[int], int]:
        t0 = time.perf_counter()
        cache, rest = store.fetch_nearest_cache("model", prompt)
        cached = len(prompt) - len(rest)
        if cache is None:
            cache, rest, cached = make_prompt_cache(model), prompt, 0
        ttft, reply = None, []
        steps = generate_step(
            mx.array(rest), model, prompt_cache=cache, max_tokens=REPLY_TOKENS, prefill_step_size=spec["prefill_step"]
        )
        for token, _ in steps:
            if ttft is None:
                ttft = time.perf_counter() - t0
            reply.append(int(token))
        store.insert_cache("model", prompt + reply[:-1], cache)  # the last token was never fed
        return ttft, reply, cached

    turn(prompt_ids(64, 1))  # warm up
    out, history = [], []
    for k in range(TURNS):
        prompt = history + user_message(k)
        ttft, reply, cached = turn(prompt)
        out.append((len(prompt), cached, ttft))
        history = prompt + reply
    return out


def turn_rows(bc: BenchConfig) -> list[Row]:
    """The three systems one after the other, on the same conversation."""
    return [
        *kimizmq_turn_rows(bc, prefix_cache=True),
        *kimizmq_turn_rows(bc, prefix_cache=False),
        *mlx_lm_turn_rows(bc),
    ]


def format_turns(rows: list[Row]) -> str:
    """Time to first token per turn, a column per system."""
    systems = list(dict.fromkeys(r.system for r in rows if r.metric == "turn_ttft"))
    by = {(r.system, r.turn): r for r in rows if r.metric == "turn_ttft"}
    head = ["turn", "prompt", *(f"{s} TTFT s (cached)" for s in systems)]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for turn in range(1, TURNS + 1):
        cells = [str(turn)]
        first = next((by[(s, turn)] for s in systems if (s, turn) in by), None)
        cells.append(str(first.prompt_tokens) if first else "-")
        for s in systems:
            r = by.get((s, turn))
            cells.append(f"{r.ttft_s:.3f} ({r.cached_tokens})" if r else "-")
        lines.append(" | ".join(cells))
    last = {s: by[(s, TURNS)].ttft_s for s in systems if (s, TURNS) in by}
    if "kimizmq" in last and "kimizmq no prefix cache" in last:
        lines.append(
            f"\nturn {TURNS}: kimizmq with its prefix cache takes "
            f"{last['kimizmq'] / last['kimizmq no prefix cache']:.3f} x its time without"
        )
    if "kimizmq" in last and MLX_LM_SYSTEM in last:
        lines.append(f"turn {TURNS}: kimizmq / {MLX_LM_SYSTEM} = {last['kimizmq'] / last[MLX_LM_SYSTEM]:.3f}")
    errors = [f"{r.system}: {r.error}" for r in rows if r.metric == "error"]
    return "\n".join(lines + errors)


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["out"]).write_text(json.dumps(_mlx_lm_conversation(spec)))
    sys.exit(0)
