"""A loopback cluster under concurrent requests, with what each worker did: how
many batched passes, how many request steps in them, how many found their batch
kept, how often a round waited for the rest of a batch (BENCHMARKS.md, "Why
aggregate scales").

    python tools/cluster_probe.py MODEL_DIR [--stages 2] [--gpus 2] [--tokens 64] [--concurrency 1,4,8,1,8]

Each run sends `c` requests of `--tokens` tokens (32-token prompts) at once over
HTTP and prints tokens/s, when each first token came, and every worker's
counters over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kimizmq.config import load_config  # noqa: E402
from kimizmq.control import call_once  # noqa: E402
from kimizmq.local import write_config  # noqa: E402
from kimizmq_bench.driver import Cluster, body, stream  # noqa: E402
from kimizmq_bench.rows import prompt_ids  # noqa: E402

COUNTERS = [
    "forwards",
    "batched_forwards",
    "batched_steps",
    "kept_batch_steps",
    "split_waves",
    "partner_waits",
    "partner_waits_expired",
    "compute_s",
    "decode_compute_s",
]


async def drive(api: str, cfg, tokens: int, rounds: list[int]) -> None:
    import aiohttp

    def stats() -> dict[str, dict]:
        return {w.name: call_once(w.control_address, "stats", timeout_s=10, name=w.name) for w in cfg.workers}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        url = f"{api}/v1/completions"

        def one(seed: int, n: int):
            return stream(session, url, body(prompt_ids(32, seed), n, per_token=False))

        await one(0, 16)  # warm up: one request, then a batch
        await asyncio.gather(*(one(50 + i, 16) for i in range(max(rounds))))
        for c in rounds:
            before = stats()
            t0 = time.perf_counter()
            done = await asyncio.gather(*(one(100 + i, tokens) for i in range(c)))
            wall = time.perf_counter() - t0
            after = stats()
            firsts = sorted(round(times[0] - t0, 3) for _, times, _ in done if times)
            print(f"c={c}: {sum(n for _, _, n in done) / wall:.1f} tok/s, wall {wall:.2f} s, first tokens at {firsts}")
            for name in after:
                diff = {k: after[name][k] - before[name][k] for k in COUNTERS if k in after[name]}
                shown = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in diff.items())
                print(f"  {name}: {shown}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=0, help="one worker per GPU (CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,8,1,8")
    args = ap.parse_args()
    rounds = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="kimi-cluster-probe-"))
    runtime = {"prefill_chunk": 256, "max_context": 1024, "max_concurrent": max(16, *rounds), "decode": "compiled"}
    cfg_path = write_config(work / "kimi.toml", args.model.resolve(), args.stages, runtime=runtime)
    env = {f"w{i}": {"CUDA_VISIBLE_DEVICES": str(i % args.gpus)} for i in range(args.stages)} if args.gpus else {}
    with Cluster(cfg_path, env, ready_timeout=600) as cluster:
        asyncio.run(drive(cluster.api, load_config(cfg_path), args.tokens, rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
