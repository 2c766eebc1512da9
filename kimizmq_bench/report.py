"""Reporting: the table, the ratios BENCHMARKS.md states goals for, the plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from .rows import NO_CHUNK, Row

PIPELINE_HOPS = 2  # mlx-lm's pipeline: one send between the ranks, one all_gather back


def fill_pipeline_hops(rows: list[Row]) -> None:
    """hop_us of the mlx-lm pipeline rows: step time above single-process mlx-lm, per hop."""
    ref = next((r for r in rows if r.system == "mlx-lm" and r.metric == "decode" and r.step_ms), None)
    for r in rows:
        if ref and r.system.startswith("mlx-lm-") and r.metric == "decode" and r.step_ms:
            r.hop_us = max(0.0, (r.step_ms - ref.step_ms) * 1e3 / PIPELINE_HOPS)


def chunk_label(r: Row) -> str:
    if r.prefill_chunk is None:
        return "-"
    return "whole" if r.metric == "ttft" and r.prefill_chunk >= r.prompt_tokens else str(r.prefill_chunk)


def system_label(r: Row) -> str:
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
                chunk_label(r),
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


@dataclass
class Comparison:
    """One ratio BENCHMARKS.md states a goal for; `ratio` is None where not measured."""

    what: str
    ratio: float | None
    detail: str


def _ratio(what: str, num: float | None, den: float | None, unit: str) -> Comparison:
    if num and den:
        return Comparison(what, num / den, f"{num:.2f} vs {den:.2f}{unit}")
    return Comparison(what, None, "not measured")


def comparisons(rows: list[Row]) -> list[Comparison]:
    """The ratios BENCHMARKS.md's goals are stated in, from one run's rows."""
    ref = _find(rows, "mlx-lm", 1, "decode")
    two = _find(rows, "kimizmq", 2, "decode")
    a1 = _find(rows, "kimizmq", 2, "aggregate", concurrency=1)
    a8 = _find(rows, "kimizmq", 2, "aggregate", concurrency=8)
    ttft2 = [r for r in rows if (r.system, r.stages, r.metric) == ("kimizmq", 2, "ttft") and r.ttft_s]
    whole = next((r for r in ttft2 if (r.prefill_chunk or 0) >= NO_CHUNK), None)
    chunked = whole and next(
        (r for r in ttft2 if r.prompt_tokens == whole.prompt_tokens and (r.prefill_chunk or 0) < r.prompt_tokens),
        None,
    )
    prompt = f" {whole.prompt_tokens} tokens" if whole else ""
    return [
        _ratio(
            "decode c=1, kimizmq 2 stages / mlx-lm",
            two and two.decode_tps,
            ref and ref.decode_tps,
            " tok/s",
        ),
        _ratio(
            "aggregate, kimizmq 2 stages, c=8 / c=1",
            a8 and a8.aggregate_tps,
            a1 and a1.aggregate_tps,
            " tok/s",
        ),
        _ratio(
            f"TTFT{prompt}, kimizmq 2 stages, chunked / whole",
            chunked and chunked.ttft_s,
            whole and whole.ttft_s,
            " s",
        ),
        _ahead_of_pipeline(rows),
    ]


def _ahead_of_pipeline(rows: list[Row]) -> Comparison:
    """The share of the mlx-lm pipeline's rows that kimizmq with 2 stages beats."""
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

    pairs = [(r, k) for r in ring if (k := kimizmq_two(r)) is not None]
    if not pairs:
        errs = [r.error for r in rows if r.system.startswith("mlx-lm-") and r.error]
        detail = "pipeline not measured" + (f": {errs[0][:120]}" if errs else "")
        return Comparison("rows where kimizmq 2 stages is ahead of the mlx-lm pipeline", None, detail)
    lost = []
    for r, k in pairs:
        if r.metric == "ttft":
            if k.ttft_s is None or r.ttft_s is None or k.ttft_s > r.ttft_s:
                lost.append(f"{r.metric}/{r.prompt_tokens}")
        else:
            kv, rv = (k.decode_tps, r.decode_tps) if r.metric == "decode" else (k.aggregate_tps, r.aggregate_tps)
            if kv is None or rv is None or kv < rv:
                lost.append(f"{r.metric}/c{r.concurrency}")
    what = f"rows where kimizmq 2 stages is ahead of {ring[0].system}"
    detail = "behind on " + ", ".join(lost) if lost else "ahead on all"
    return Comparison(what, 1 - len(lost) / len(pairs), detail)


def format_comparisons(rows: list[Row]) -> str:
    return "\n".join(
        f"  {'-' if c.ratio is None else format(c.ratio, '.2f'):>5} {c.what} ({c.detail})" for c in comparisons(rows)
    )


def plot(rows: list[Row], path: Path) -> bool:
    """Four panels: decode tok/s, aggregate tok/s by concurrency, TTFT by prompt, hop overhead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r.metric != "error"]
    labels = list(dict.fromkeys(system_label(r) for r in ok))
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    dec = [
        (lbl, next((r.decode_tps for r in ok if system_label(r) == lbl and r.metric == "decode"), None))
        for lbl in labels
    ]
    dec = [(lbl, v) for lbl, v in dec if v]
    ax[0][0].bar([d[0] for d in dec], [d[1] for d in dec], color="tab:blue")
    ax[0][0].set_title("decode tokens/s, one request")
    for lbl in labels:
        pts = sorted((r.concurrency, r.aggregate_tps) for r in ok if system_label(r) == lbl and r.metric == "aggregate")
        if pts:
            ax[0][1].plot(*zip(*pts), marker="o", label=lbl)
        pts = sorted(
            (r.prompt_tokens, r.ttft_s)
            for r in ok
            if system_label(r) == lbl and r.metric == "ttft" and (r.prefill_chunk or 0) < NO_CHUNK
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
    hops = [(system_label(r), r.hop_us) for r in ok if r.metric == "decode" and r.hop_us is not None]
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


def report(rows: list[Row], json_path: Path, *, draw: bool) -> None:
    """Print the table and the ratios, say where the rows are, draw the PNG."""
    click.echo(format_table(rows))
    click.echo("\nratios (the goals are in BENCHMARKS.md):")
    click.echo(format_comparisons(rows))
    click.echo(f"\nrows: {json_path}")
    if draw:
        png = json_path.with_suffix(".png")
        if plot(rows, png):
            click.echo(f"plot: {png}")
        else:
            click.echo("plot: skipped (matplotlib is not installed: pip install -e '.[bench]')")
