"""Write a tiny test model (see kimizmq/testmodel.py and kimizmq/testlayouts.py).

    python tools/make_test_model.py --out models/kimi-k2-tiny --seed 0 --layers 7
    python tools/make_test_model.py --layout k3 --layers 14 --out models/kimi-k3-tiny \\
        --chat-template ../shared/reference/kimi-k3/chat_template.llama-cpp-port.jinja

Needs kimizmq importable (``pip install -e .``, or run with ``PYTHONPATH=.``).
"""

from pathlib import Path

import click

from kimizmq.testlayouts import LAYOUTS, make_layout_model
from kimizmq.testmodel import make_test_model

MLX_LAYOUT = "kimi_k2"  # the MLX conversion of Kimi-K2 (testmodel.py)


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
@click.option(
    "--layout",
    type=click.Choice([MLX_LAYOUT, *LAYOUTS]),
    default=MLX_LAYOUT,
    show_default=True,
    help="kimi_k2: an MLX conversion; kvb: an older one (quantized kv_b_proj); int4: K2-Thinking "
    "(compressed-tensors); k25: K2.5/K2.6 (nested, with a vision tower); k3: Kimi K3",
)
@click.option(
    "--chat-template",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="a published chat_template.jinja to ship with a --layout other than kimi_k2",
)
def main(out: Path, seed: int, layers: int, layout: str, chat_template: Path | None) -> None:
    """Write a deterministic tiny model with a Kimi checkpoint's exact layout."""
    if layout == MLX_LAYOUT and chat_template is not None:
        raise click.UsageError("--chat-template is for the published layouts; kimi_k2 carries Kimi-K2's own")
    try:
        if layout == MLX_LAYOUT:
            path = make_test_model(out, seed=seed, num_layers=layers)
        else:
            path = make_layout_model(out, layout, seed=seed, num_layers=layers, chat_template=chat_template)
    except FileExistsError as e:
        raise click.ClickException(str(e)) from None
    files = sorted(p for p in path.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    click.echo(f"{path}: {len(files)} files, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
