"""`kimi bench`: kimizmq (1, 2 and 3 stages on loopback) against single-process
mlx-lm and mlx-lm's own pipeline, the same prompts and protocol for each
(BENCHMARKS.md, "What is measured"). Prints a table, writes the rows to a JSON
file as they come and draws a PNG (matplotlib, the `bench` extra)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import click

from kimizmq.config import DECODE_MODES, MAX_STREAM_INTERVAL_MS, RuntimeConfig
from kimizmq.testmodel import KIMI_K2_GEOMETRY, make_test_model

from .driver import kimizmq_rows
from .machine import describe_device
from .multiturn import format_turns, turn_rows
from .reference import mlx_lm_rows
from .report import fill_pipeline_hops, report
from .rows import DEFAULT_SYSTEMS, NO_CHUNK, SYSTEM_TIMEOUT_S, SYSTEMS, BenchConfig, Row, Rows

DEFAULT_OUT = "bench-results"


def run_bench(bc: BenchConfig, save) -> list[Row]:
    """Measure every system in turn; `save(rows)` after each row, so a cut-off run keeps what it has."""
    rows = Rows(save)
    for system in bc.systems:
        click.echo(f"[bench] {system} ...", err=True)
        t0 = time.monotonic()
        if system == "mlx-lm":
            new = mlx_lm_rows(bc, None)
            rows.extend(new)
        elif system.startswith("mlx-lm-"):
            new = mlx_lm_rows(bc, system.removeprefix("mlx-lm-"))
            rows.extend(new)
        else:
            new = kimizmq_rows(bc, int(system.removeprefix("kimizmq-")), rows)
        for r in new:
            if r.error:
                click.echo(f"[bench] {system}: {r.error}", err=True)
        click.echo(f"[bench] {system}: {len(new)} rows in {time.monotonic() - t0:.0f} s", err=True)
        save(rows)
        if system == "kimizmq-2" and bc.nochunk_prompt:
            click.echo(f"[bench] kimizmq-2, a {bc.nochunk_prompt}-token prompt in one piece ...", err=True)
            for r in kimizmq_rows(bc, 2, rows, chunk=NO_CHUNK):
                if r.error:
                    click.echo(f"[bench] kimizmq-2 (one piece): {r.error}", err=True)
    fill_pipeline_hops(rows)
    save(rows)
    return list(rows)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return values


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
@click.option(
    "--multi-turn",
    is_flag=True,
    help="only the multi-turn row: an 8-turn conversation, kimizmq with and without its prefix cache and mlx-lm's prompt cache",
)
@click.option("--replot", type=click.Path(dir_okay=False, exists=True), help="print and draw an earlier JSON; no run")
def bench_command(
    model_dir, kimi_geometry, layers, models_dir, quick, systems, decode_tokens, aggregate_tokens, concurrency_text, prompts_text,
    nochunk_prompt, prefill_chunk, decode, stream_interval_ms, gpus, pin, system_timeout, out_dir, name, no_plot,
    multi_turn, replot,
):  # fmt: skip
    """Measure kimizmq (1, 2, 3 stages on loopback) against single-process mlx-lm and
    mlx-lm's own pipeline: decode tokens/s, aggregate tokens/s under concurrency,
    time to first token, per-hop overhead. Prints a table, writes JSON and a PNG."""
    if replot:
        rows = [Row.from_dict(r) for r in json.loads(Path(replot).read_text())]
        if any(r.metric == "turn_ttft" for r in rows):  # a --multi-turn run
            click.echo(format_turns(rows))
            return
        fill_pipeline_hops(rows)
        report(rows, Path(replot), draw=not no_plot)
        return
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
    kind = "turns-" if multi_turn else ""
    stem = name or f"bench-{kind}{model.name}-{'gpu' if gpu else 'cpu'}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path = out / f"{stem}.json"

    def save(rows: list[Row]) -> None:
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")

    t0 = time.monotonic()
    if multi_turn:
        click.echo(f"[bench] {label} on {device}: the multi-turn conversation", err=True)
        rows = turn_rows(bc)
        save(rows)
        shutil.rmtree(bc.work, ignore_errors=True)
        click.echo(f"[bench] done in {time.monotonic() - t0:.0f} s\n", err=True)
        click.echo(format_turns(rows))
        click.echo(f"\nrows: {json_path}")
        return
    click.echo(f"[bench] {label} on {device}; systems: {', '.join(chosen)}; pinned: {bc.pin}", err=True)
    rows = run_bench(bc, save)
    shutil.rmtree(bc.work, ignore_errors=True)
    click.echo(f"[bench] done in {time.monotonic() - t0:.0f} s\n", err=True)
    report(rows, json_path, draw=not no_plot)
