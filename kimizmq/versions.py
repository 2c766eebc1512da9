"""The versions every daemon of one cluster must share.

Workers and the coordinator exchange them on every control command and
reply: the wire protocol, kimizmq itself and MLX (two MLX releases may
compute the same layer differently, and a cluster must answer as one model).
A worker refuses a coordinator whose versions differ before it loads
anything, naming both sides.
"""

from __future__ import annotations

import functools

import click

from . import __version__
from .wire import PROTOCOL_VERSION

KEYS = ("protocol", "kimizmq", "mlx")


@functools.cache
def local_versions() -> dict[str, str]:
    """This process's versions, as strings, in the order of KEYS."""
    import mlx.core as mx

    return {"protocol": str(PROTOCOL_VERSION), "kimizmq": __version__, "mlx": mx.__version__}


def describe(versions: dict | None) -> str:
    if not isinstance(versions, dict):
        return "no versions (an older kimizmq)"
    return ", ".join(f"{k} {versions.get(k, '?')}" for k in KEYS)


def mismatch(mine: dict, theirs: dict | None, *, me: str, them: str) -> str | None:
    """None when `theirs` equals `mine` on every key, else a message naming both."""
    if isinstance(theirs, dict) and all(str(theirs.get(k)) == mine[k] for k in KEYS):
        return None
    return (
        f"version mismatch: {me} runs {describe(mine)} but {them} runs {describe(theirs)}; "
        "install the same kimizmq and MLX on every machine of the cluster"
    )


def version_text() -> str:
    v = local_versions()
    return f"kimizmq {v['kimizmq']}, MLX {v['mlx']}, wire protocol {v['protocol']}"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


# `--version` for every program; MLX is imported only when it is asked for.
version_option = click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="print the kimizmq, MLX and wire-protocol versions",
)
