"""`kimi plan`: the placement of every layer as a table (or JSON), with what
each worker holds, reserves and has free, and the prefix cache's budgets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import wired
from .checkpoint import CheckpointError, is_fp8, read_config, text_config
from .config import Config, ConfigError, load_config
from .plan import GIB, WIRED_LIMIT_HINT, Plan, PlanError, format_gib, kv_dtype_bytes, make_plan
from .sizes import is_linear_layer, kv_bytes_per_token_per_layer, layer_sizes, recurrent_state_bytes


def format_plan(plan: Plan, cfg: Config, model_config: dict) -> str:
    """The table `kimi plan` prints; sizes in GiB (MiB for a model under 1 GiB)."""
    rt = cfg.runtime
    dtype_bytes = kv_dtype_bytes(cfg, model_config)
    kv = kv_bytes_per_token_per_layer(model_config, dtype_bytes)
    if plan.estimated:
        source = "estimated from config.json and its quantization block (no safetensors found)"
    else:
        source = "exact, from the safetensors headers (no tensor data read)"
    if is_fp8(model_config):
        source += (
            "; FP8 weights counted at their bfloat16 size, as mlx-lm dequantizes them on load "
            "(twice their size on disk): convert with `mlx_lm.convert -q` to fit in less"
        )
    text = text_config(model_config)
    linear = sum(is_linear_layer(text, i) for i in range(plan.num_layers))
    reserved = f"KV cache ({rt.max_context} tokens x {rt.max_concurrent} requests x {kv} B per token and layer)"
    if linear:
        state = recurrent_state_bytes(model_config, dtype_bytes)
        reserved = (
            f"KV cache on {plan.num_layers - linear} attention layers ({rt.max_context} tokens x "
            f"{rt.max_concurrent} requests x {kv} B per token and layer) + recurrent state on {linear} "
            f"linear-attention layers ({rt.max_concurrent} requests x {state / (1 << 20):.2f} MiB per layer)"
        )
    weights = plan.total_weight_bytes
    unit, scale = ("GiB", GIB) if weights >= GIB else ("MiB", 1 << 20)
    rows = [("worker", "layers", "[start, end)", "weights", "reserved", "usable", "free")]
    for s in plan.stages:
        sizes = (s.weight_bytes, s.reserved_bytes, s.memory_bytes, s.free_bytes)
        rows.append((s.worker, s.layers_label, f"[{s.start}, {s.end})") + tuple(f"{b / scale:.1f}" for b in sizes))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    table = ["  ".join(v.ljust(w) if c < 3 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))) for r in rows]
    header = [
        (
            f"model:    {cfg.model_path} ({plan.num_layers} layers, "
            f"{weights / scale:.1f} {unit} = {weights / 1e9:.3g} GB of weights)"
        ),
        f"sizes:    {source}",
        (
            f"balance:  {plan.balance}; usable = {cfg.plan.memory_fraction:.0%} of memory; "
            f"reserved = {reserved} + {cfg.plan.runtime_margin_gb:g} GiB margin + prefix cache"
        ),
        f"prefix cache: {_prefix_phrase(plan, rt.prefix_cache_gb)}",
    ]
    power = 30 if unit == "GiB" else 20
    units = f"sizes in {unit} (2^{power} bytes); memory_gb is read as GiB"
    return "\n".join([*header, "", units, *table])


def _prefix_phrase(plan: Plan, setting: float) -> str:
    sizes = ", ".join(f"{s.worker} {format_gib(s.prefix_cache_bytes)}" for s in plan.stages)
    if setting == 0:
        return "off ([runtime] prefix_cache_gb = 0)"
    if setting > 0:
        return f"{sizes} ([runtime] prefix_cache_gb)"
    return f"{sizes} (half of each stage's free memory; set [runtime] prefix_cache_gb to choose)"


@click.command("plan")
@click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="the cluster's kimi.toml (default: $KIMI_CONFIG, ./kimi.toml, then the user config folder)",
)
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def plan_command(config_path: Path | None, as_json: bool) -> None:
    """Show which worker holds which layers, and whether it fits; loads nothing.

    Exit 0 when the plan fits, 1 when it does not, 2 on a configuration error.
    """
    from .discovery import NoConfig, find_config

    try:
        cfg = load_config(find_config(config_path))
        model_config = read_config(cfg.model_path)
        plan = make_plan(cfg, layer_sizes(cfg.model_path), model_config=model_config)
        error = None
    except PlanError as e:
        if e.plan is None:
            click.echo(f"kimi plan: {e}", err=True)
            sys.exit(2)
        plan, error = e.plan, e
    except (ConfigError, CheckpointError, NoConfig) as e:
        click.echo(f"kimi plan: {e}", err=True)
        sys.exit(2)

    if as_json:
        click.echo(json.dumps(plan.to_json(), indent=2))
    else:
        click.echo(format_plan(plan, cfg, model_config))
        click.echo("")
        click.echo("fits." if error is None else "does NOT fit.")
        if error is None:
            click.echo(f"note: {WIRED_LIMIT_HINT}.")
            for s in plan.stages:
                need = s.weight_bytes + s.reserved_bytes
                click.echo(
                    f"  wired memory for {s.worker}: {need / (1 << 20):.0f} MB; if `sysctl -n iogpu.wired_limit_mb` "
                    f"there is lower (0 means about 75% of RAM), run `{wired.sysctl_command(need)}`"
                )
            if not plan.estimated:
                from .sync import describe_files, local_checkpoint, worker_files

                ck = local_checkpoint(cfg.model_path)
                click.echo("files each worker needs (kimi sync copies just these):")
                for name, files in worker_files(cfg, ck)[1].items():
                    click.echo(f"  files for {name}: {describe_files(files, ck.sizes)}")
    if error is not None:
        click.echo(f"kimi plan: {error}", err=True)
        sys.exit(1)
