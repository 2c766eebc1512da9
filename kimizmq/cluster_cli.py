"""The `kimi` commands that set a cluster up: init, sync, up, down, service."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import click

from .checkpoint import CheckpointError
from .config import Config, ConfigError, load_config, parse_config
from .discovery import FILE_NAME, config_option, find_config
from .remote import RemoteError


def _config(path: str | None) -> Config:
    try:
        return load_config(find_config(path))
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


# -- kimi up / down -----------------------------------------------------------------


@click.command("up")
@config_option
@click.option(
    "--timeout", type=click.FloatRange(0, min_open=True), help="seconds to wait for ready (default: load_timeout_s)"
)
def up_command(config_path, timeout):
    """Start every worker and the coordinator of the config, over ssh where a
    daemon has an ssh table, and wait until the API is ready.

    Each machine is checked first: reachable, the program there, the same
    kimizmq, MLX and protocol versions. `kimi down` stops what this started."""
    from . import cluster

    cfg = _config(config_path)
    try:
        url = cluster.up(cfg, lambda s: click.echo(s, err=True), timeout)
    except RemoteError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"ready: {url}/v1 (model {cfg.model_name}); stop with: kimi down --config {cfg.path}")


@click.command("down")
@config_option
def down_command(config_path):
    """Stop the daemons `kimi up` started with this config, and only those."""
    from . import cluster

    cfg = _config(config_path)
    try:
        cluster.down(cfg, click.echo)
    except RemoteError as e:
        raise click.ClickException(str(e)) from None


# -- kimi sync ----------------------------------------------------------------------


@click.command("sync")
@config_option
@click.option(
    "--from",
    "source",
    required=True,
    help="a model folder here, NAME:FOLDER on the machine of worker NAME (or coordinator), or a Hugging Face repo id",
)
@click.option("--revision", help="with a repo id: the branch, tag or commit")
@click.option("--dry-run", is_flag=True, help="say what each machine needs; copy nothing")
def sync_command(config_path, source, revision, dry_run):
    """Copy to each machine exactly the checkpoint files its workers' layers
    need, plus the small files (config, tokenizer); the coordinator's machine
    gets the small files. Resumes an interrupted copy, skips files already
    there with the right size, and checks every size after copying."""
    from . import sync
    from .plan import PlanError

    cfg = _config(config_path)
    hub = sync.is_repo_id(source)
    try:
        if hub:
            ck = sync.hub_checkpoint(source, revision)
        elif (holder := sync.source_daemon(cfg, source)) is not None:
            ck = sync.remote_checkpoint(holder.machine, sync.python_of(holder), source.split(":", 1)[1])
        else:
            ck = sync.local_checkpoint(Path(source).expanduser())
        plan, files = sync.worker_files(cfg, ck)
        dests = sync.destinations(cfg, files, ck)
    except (CheckpointError, PlanError, OSError, RemoteError) as e:
        raise click.ClickException(f"{source}: {e}") from None
    for name, f in files.items():
        s = plan.stage(name)
        click.echo(f"{name} [{s.start}, {s.end}): {sync.describe_files(f, ck.sizes)}")
    if dry_run:
        return
    try:
        if hub:
            sync.sync_hub(dests, source, revision, ck.made, click.echo)
        else:
            sync.sync_files(dests, ck, click.echo, progress=sys.stdout.isatty())
    except RemoteError as e:
        raise click.ClickException(str(e)) from None
    click.echo("in sync.")


# -- kimi init ----------------------------------------------------------------------

INIT_HEADER = """\
# kimizmq cluster configuration, written by `kimi init`.
# Every daemon and `kimi` command reads this one file; `kimi up` copies it to
# each machine. Relative paths resolve against this file's folder; ~ expands.
# Check the split with `kimi plan`, copy the weights with
# `kimi sync --from <folder>`, start everything with `kimi up`.
"""


def render_init(model: str, workers: list[tuple[str, str, float]], user: str, first_port: int) -> str:
    coordinator_host = workers[0][1]
    lines = [
        INIT_HEADER,
        "[model]",
        f"path = {json.dumps(model)}            # the same path on every machine",
        f"name = {json.dumps(Path(model).name)}  # the model name the API serves",
        "",
        "[coordinator]",
        f"host = {json.dumps(coordinator_host)}  # runs here; the last worker sends tokens to this address",
        f"api_port = {first_port + 15}",
        '# api_host = "0.0.0.0"               # the API on every interface (e.g. the LAN too)',
        f"result_port = {first_port}",
        "",
        "[runtime]",
        "max_context = 8192",
        "max_concurrent = 8",
        "# wired_limit_gb = -1                # macOS: wired memory for the weights (-1: the GPU's recommended size)",
        "",
        "[logging]",
        'dir = "log"',
        "",
    ]
    for i, (name, host, memory) in enumerate(workers):
        base = first_port + 101 + 10 * i
        lines += [
            "[[workers]]",
            f"name = {json.dumps(name)}",
            f"host = {json.dumps(host)}                # the address the other machines reach it at",
            f"memory_gb = {memory:g}",
            f"control_port = {base}",
            f"data_port = {base + 1}",
            "# layers = [0, 30]                  # optional: a fixed range instead of the plan's",
            "[workers.ssh]                        # how `kimi up` and `kimi sync` reach it",
            *([f"user = {json.dumps(user)}"] if user else ['# user = "me"']),
            '# command = "~/kimizmq/.venv/bin/kimi-worker"   # if kimi-worker is not on its PATH over ssh',
            '# options = ["-i", "~/.ssh/id_ed25519"]',
            "",
        ]
    return "\n".join(lines)


def _worker_spec(value: str) -> tuple[str, str, float]:
    try:
        name, rest = value.split("=", 1)
        host, memory = rest.rsplit(":", 1)
        return name.strip(), host.strip(), float(memory)
    except ValueError:
        raise click.BadParameter(f"{value!r}: write NAME=HOST:MEMORY_GB, e.g. m3=10.0.0.1:512") from None


@click.command("init")
@click.option("--model", "model", required=True, help="the model folder (the same path on every machine)")
@click.option(
    "--worker",
    "workers",
    multiple=True,
    required=True,
    help="NAME=HOST:MEMORY_GB, one per machine, in pipeline order (the first holds embed_tokens)",
)
@click.option("--user", default="", help="the ssh user on the machines")
@click.option("--first-port", type=click.IntRange(1024, 65000), default=52400, show_default=True)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path(FILE_NAME), show_default=True
)
@click.option("--force", is_flag=True, help="replace an existing file")
def init_command(model, workers, user, first_port, output, force):
    """Write a commented starter config for a model and a list of machines."""
    specs = [_worker_spec(w) for w in workers]
    text = render_init(model, specs, user, first_port)
    try:
        parse_config(tomllib.loads(text), output.resolve())
    except ConfigError as e:
        raise click.ClickException(f"that config would not load: {e}") from None
    if output.exists() and not force:
        raise click.ClickException(f"{output} exists; pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    click.echo(f"wrote {output}; next: kimi plan --config {output}")


# -- kimi service -------------------------------------------------------------------


@click.group("service")
def service_group():
    """Run this machine's daemon as a service (launchd on macOS, systemd on Linux)."""


@service_group.command("install")
@config_option
@click.option("--worker", "worker", help="the worker this machine runs (its name in the config)")
@click.option("--coordinator", is_flag=True, help="the coordinator")
@click.option("--platform", type=click.Choice(["darwin", "linux"]), default=None, help="default: this machine's")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), help="where to write the file")
def service_install(config_path, worker, coordinator, platform, folder):
    """Write a launchd agent (macOS) or a systemd user unit (Linux) that starts
    the daemon at login and restarts it when it fails; print how to start it."""
    from . import service

    if bool(worker) == coordinator:
        raise click.UsageError("give --worker NAME or --coordinator")
    cfg = _config(config_path)
    if worker:
        try:
            cfg.worker(worker)
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
    platform = platform or ("darwin" if sys.platform == "darwin" else "linux")
    path, start = service.install(cfg, worker, platform, folder)
    click.echo(f"wrote {path}\nstart it with: {start}")
