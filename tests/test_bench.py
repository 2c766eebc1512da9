"""`kimi bench` runs every kind of system end to end and writes rows a reader can
trust: one JSON list, every row with its system, stages, concurrency, prompt
and the number its metric names. Timings are not asserted: a benchmark is a
script with a table, not a test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kimizmq_bench.report import comparisons, format_table
from kimizmq_bench.rows import Row

REQUIRED = {"system", "stages", "concurrency", "prompt_tokens", "decode_tps", "aggregate_tps", "ttft_s"}
NUMBER_OF = {"decode": "decode_tps", "aggregate": "aggregate_tps", "ttft": "ttft_s"}


def test_bench_quick_path_writes_valid_rows_for_every_system(tiny_model, tmp_path):
    out = tmp_path / "results"
    args = [sys.executable, "-m", "kimizmq.cli", "bench", "--quick", "--model", str(tiny_model)]
    args += ["--systems", "mlx-lm,kimizmq-2,mlx-lm-ring", "--decode-tokens", "4", "--concurrency", "1,2"]
    args += ["--prompts", "16", "--nochunk-prompt", "24", "--prefill-chunk", "8"]
    args += ["--out", str(out), "--name", "tiny", "--no-plot"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]

    rows = json.loads((out / "tiny.json").read_text())
    assert isinstance(rows, list)
    for row in rows:
        assert row.keys() >= REQUIRED
        assert row["error"] is None, row
        value = row[NUMBER_OF[row["metric"]]]
        assert isinstance(value, float) and value > 0, row
    seen = {(r["system"], r["stages"], r["metric"], r["concurrency"], r["prompt_tokens"]) for r in rows}
    for system, stages in (("mlx-lm", 1), ("kimizmq", 2), ("mlx-lm-ring", 2)):
        assert (system, stages, "decode", 1, 32) in seen
        assert {(system, stages, "aggregate", c, 32) for c in (1, 2)} <= seen
        assert (system, stages, "ttft", 1, 16) in seen
    assert ("kimizmq", 2, "ttft", 1, 24) in seen  # the prompt in one piece
    kimizmq = next(r for r in rows if r["system"] == "kimizmq" and r["metric"] == "decode")
    assert kimizmq["compute_ms"] > 0 and kimizmq["hop_us"] is not None
    assert 0 < kimizmq["build_ms"] <= kimizmq["compute_ms"]
    assert "ratios (the goals are in BENCHMARKS.md):" in run.stdout and "mlx-lm-ring" in run.stdout

    again = subprocess.run(
        [sys.executable, "-m", "kimizmq.cli", "bench", "--replot", str(out / "tiny.json"), "--no-plot"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0].split()[:4] == ["system", "stages", "conc", "prompt"]


def _row(system, stages, metric, value, concurrency=1, prompt=32, **kw) -> Row:
    return Row(system, stages, concurrency, prompt, metric, **{NUMBER_OF[metric]: value}, **kw)


def test_comparisons_take_the_ratios_from_the_rows_the_goals_name():
    rows = [
        _row("mlx-lm", 1, "decode", 100.0),
        _row("kimizmq", 2, "decode", 95.0),
        _row("kimizmq", 2, "aggregate", 50.0),
        _row("kimizmq", 2, "aggregate", 80.0, concurrency=8),
        _row("kimizmq", 2, "ttft", 6.0, prompt=4096, prefill_chunk=256),
        _row("kimizmq", 2, "ttft", 10.0, prompt=4096, prefill_chunk=1 << 20),
        _row("mlx-lm-ring", 2, "decode", 90.0),
        _row("mlx-lm-ring", 2, "ttft", 5.0, prompt=4096),
    ]
    decode, aggregate, ttft, ahead = comparisons(rows)
    assert decode.ratio == pytest.approx(0.95) and decode.detail == "95.00 vs 100.00 tok/s"
    assert aggregate.ratio == pytest.approx(1.6) and "c=8 / c=1" in aggregate.what
    assert ttft.ratio == pytest.approx(0.6) and "4096" in ttft.what
    assert ahead.ratio == 0.5 and ahead.detail == "behind on ttft/4096"
    assert [c.ratio for c in comparisons(rows[:1])] == [None] * 4  # nothing to compare: not measured
    table = format_table(rows)
    assert "whole" in table and "4096" in table
