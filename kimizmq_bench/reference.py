"""The reference side: single-process mlx-lm (`generate_step` for one request,
`BatchGenerator` for several) and mlx-lm's own pipeline over mx.distributed
(`model.model.pipeline(group)`, 2 ranks started by mlx.launch). Each runs in a
fresh process, `python -m kimizmq_bench.reference SPEC.json`; rank 0 writes
the rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .machine import cores, free_port_pair, pin
from .rows import DECODE_PROMPT_TOKENS, BenchConfig, Row, decode_rate, median, prompt_ids

LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; main()"


def mlx_lm_rows(bc: BenchConfig, backend: str | None) -> list[Row]:
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
        cmd = [sys.executable, "-m", "kimizmq_bench.reference", str(spec_path)]
    else:
        cmd = [sys.executable, "-c", LAUNCH, "--backend", backend, "-n", "2"]
        if backend == "ring":
            cmd += ["--starting-port", str(free_port_pair())]
        else:
            cmd += ["--nccl-port", str(free_port_pair())]
        cmd += ["--python", sys.executable, "--", "-m", "kimizmq_bench.reference", str(spec_path)]
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


def mlx_lm_process(spec_path: str) -> int:
    """One mlx-lm process (or pipeline rank): measure, and on rank 0 write the rows."""
    spec = json.loads(Path(spec_path).read_text())
    cfg = spec["config"]
    rank = int(os.environ.get("MLX_RANK", "0"))
    if spec["distributed"] and cfg["gpus"] and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank % cfg["gpus"])
    if spec["distributed"] and cfg["pin"]:
        mine = cores()
        pin(os.getpid(), mine[rank % len(mine)])

    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator, generate_step
    from mlx_lm.utils import load_model

    from kimizmq.shard import compute_dtype

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
            rates.append(decode_rate(times))
        rows.append(bc.decode_row(system, stages, median(rates)))
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


if __name__ == "__main__":
    sys.exit(mlx_lm_process(sys.argv[1]))
