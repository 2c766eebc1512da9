"""Which kimi.toml a command uses, whatever way kimizmq was installed.

In order: `--config PATH`, the KIMI_CONFIG environment variable, ./kimi.toml,
then kimi.toml in the user's config folder (click.get_app_dir: ~/.config/kimi
on Linux, ~/Library/Application Support/kimi on macOS). A source checkout
also finds its own etc/kimi.toml last, so the shipped loopback example works
from the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

ENV_VAR = "KIMI_CONFIG"
FILE_NAME = "kimi.toml"
APP_NAME = "kimi"
# Present only in a source checkout (an installed wheel has no etc/).
CHECKOUT_CONFIG = Path(__file__).resolve().parent.parent / "etc" / FILE_NAME


class NoConfig(click.ClickException):
    """No config was given and none was found: says where it looked."""


def user_config_path() -> Path:
    return Path(click.get_app_dir(APP_NAME)) / FILE_NAME


def candidates(cwd: Path | None = None) -> list[tuple[str, Path]]:
    """(how it was found, path) in the order they are tried, without --config."""
    found = []
    if env := os.environ.get(ENV_VAR):
        found.append((f"${ENV_VAR}", Path(env).expanduser()))
    found.append(("the current folder", (cwd or Path.cwd()) / FILE_NAME))
    found.append(("the user config folder", user_config_path()))
    found.append(("the source checkout", CHECKOUT_CONFIG))
    return found


def find_config(explicit: str | Path | None = None, cwd: Path | None = None) -> Path:
    """The config to use. An explicit path or $KIMI_CONFIG is used as given
    (load_config then says if it is missing); the other places only if they exist."""
    if explicit:
        return Path(explicit).expanduser()
    tried = []
    for how, path in candidates(cwd):
        if how == f"${ENV_VAR}" or path.is_file():
            return path
        tried.append(str(path))
    raise NoConfig(
        f"no config file: pass --config PATH, set {ENV_VAR}, or write one with `kimi init` "
        f"(looked at {', '.join(tried)})"
    )


config_option = click.option(
    "--config",
    "config_path",
    default=None,
    type=click.Path(dir_okay=False),
    help=f"cluster config (default: ${ENV_VAR}, ./{FILE_NAME}, then {user_config_path()})",
)
