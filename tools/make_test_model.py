"""Write the tiny Kimi-K2-layout test model (see kimizmq/testmodel.py).

    python tools/make_test_model.py --out models/kimi-k2-tiny --seed 0 --layers 7

Needs kimizmq importable (``pip install -e .``, or run with ``PYTHONPATH=.``).
"""

from pathlib import Path

import click

from kimizmq.testmodel import make_test_model


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--out",
    default="models/kimi-k2-tiny",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="directory to write (left alone if it already holds this model)",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", type=click.IntRange(2), default=7, show_default=True)
def main(out: Path, seed: int, layers: int) -> None:
    """Write a deterministic tiny model with Kimi-K2's exact layout."""
    try:
        path = make_test_model(out, seed=seed, num_layers=layers)
    except FileExistsError as e:
        raise click.ClickException(str(e)) from None
    files = sorted(p for p in path.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    click.echo(f"{path}: {len(files)} files, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
