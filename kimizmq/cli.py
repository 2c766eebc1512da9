"""`kimi`: the command-line client."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """kimizmq: run one model across several Macs."""
