"""`kimi`: the command-line client."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import click

from .config import Config, ConfigError, load_config
from .plan import plan_command

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "etc" / "kimi.toml"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)


def _config(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def _api(cfg: Config) -> str:
    host = cfg.coordinator.host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '*') else host}:{cfg.coordinator.api_port}"


def _headers(cfg: Config) -> dict:
    key = cfg.security.api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


config_option = click.option(
    "--config",
    "config_path",
    default=str(DEFAULT_CONFIG),
    show_default=True,
    type=click.Path(dir_okay=False),
    help="cluster config (etc/kimi.toml)",
)


async def stream_completion(cfg: Config, body: dict, out) -> str:
    """POST a streaming request and write the text to `out` as it arrives."""
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    body = {**body, "stream": True, "model": cfg.model_name}
    text = []
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT, headers=_headers(cfg)) as session:
        async with session.post(_api(cfg) + path, json=body) as resp:
            if resp.status != 200:
                try:
                    msg = (await resp.json())["error"]["message"]
                except (aiohttp.ContentTypeError, KeyError, TypeError, json.JSONDecodeError):
                    msg = await resp.text()
                raise click.ClickException(f"HTTP {resp.status}: {msg}")
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise click.ClickException(chunk["error"]["message"])
                for choice in chunk.get("choices", []):
                    piece = choice.get("text") if "text" in choice else choice.get("delta", {}).get("content")
                    if piece:
                        out.write(piece)
                        out.flush()
                        text.append(piece)
    return "".join(text)


def _run(coro):
    try:
        return asyncio.run(coro)
    except aiohttp.ClientConnectionError as e:
        raise click.ClickException(f"cannot reach the coordinator: {e}; is kimi-coordinator running?") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """kimizmq: run one model across several Macs."""


@main.command("prompt")
@config_option
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.6, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--raw", is_flag=True, help="send exactly the tokens of TEXT: no chat template, no BOS")
@click.argument("text")
def prompt_command(config_path, max_tokens, temperature, top_p, seed, raw, text):
    """Write the completion of TEXT, and only it, to stdout as it streams."""
    cfg = _config(config_path)
    body = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    if seed is not None:
        body["seed"] = seed
    if raw:
        body["prompt"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]
    _run(stream_completion(cfg, body, sys.stdout))
    sys.stdout.write("\n")


@main.command("demo")
@click.option("--workers", type=click.IntRange(1, 8), default=2, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=48, show_default=True)
@click.option("--dir", "work_dir", default="var/demo", show_default=True, type=click.Path(file_okay=False))
@click.argument("text", default="Tell me about pipelines of Macs.")
def demo_command(workers, max_tokens, work_dir, text):
    """Bring up a coordinator and workers on loopback with the tiny test model
    (made on first use) and stream one completion."""
    from .local import LocalCluster, write_config
    from .testmodel import make_test_model

    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = make_test_model(Path("models/kimi-k2-tiny").resolve())
    cfg_path = write_config(work / "kimi.toml", model, workers)
    click.echo(f"model: {model}\nconfig: {cfg_path}\nstarting {workers} workers and a coordinator ...", err=True)
    with LocalCluster(cfg_path) as cluster:
        health = cluster.health()[1]
        for s in health["stages"]:
            click.echo(f"  {s['worker']}: layers [{s['start']}, {s['end']})", err=True)
        click.echo(f"ready at {cluster.api}; streaming a completion:\n", err=True)
        cfg = _config(str(cfg_path))
        _run(
            stream_completion(
                cfg,
                {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0.0},
                sys.stdout,
            )
        )
        sys.stdout.write("\n")
    click.echo(f"\nstopped. logs: {cluster.log_dir} (try: kimi logs --config {cfg_path})", err=True)


def _rows(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def _fmt_gb(b) -> str:
    return f"{b / 1e9:.2f}" if isinstance(b, (int, float)) else "-"


@main.command("keys")
@config_option
@click.option("--name", help="make the keypair of this daemon: coordinator, or a worker's name")
@click.option("--all", "all_names", is_flag=True, help="make a keypair for every daemon (a cluster on one machine)")
@click.option("--force", is_flag=True, help="replace keys that exist (then copy the new public keys again)")
def keys_command(config_path, name, all_names, force):
    """Make CURVE keys in [security] curve_dir; with neither --name nor --all,
    list the cluster's keys found there.

    On each Mac, make the keys of the daemon it runs with --name, then copy every
    public/<name>.key to public/ on every other Mac. SECURITY.md has the steps."""
    from . import security

    cfg = _config(config_path)
    if name and all_names:
        raise click.UsageError("give --name or --all, not both")
    names = security.daemon_names(cfg) if all_names else [name] if name else []
    try:
        for n in names:
            public, secret = security.create_keys(cfg, n, force=force)
            click.echo(f"{n}: secret key {secret} (stays on this machine)\n{n}: public key {public}")
        if names:
            click.echo(
                f"copy the public key(s) to {security.public_path(cfg, names[0]).parent}/ "
                "on every other machine of the cluster (SECURITY.md)"
            )
            return
        public_dir = security.public_path(cfg, security.COORDINATOR).parent
        allowed = security.load_public_keys(public_dir) if public_dir.is_dir() else {}
        by_name = {n: key.decode() for key, n in allowed.items()}
        table = [["daemon", "secret key here", "public key"]]
        for n in security.daemon_names(cfg):
            table.append([n, "yes" if security.secret_path(cfg, n).exists() else "-", by_name.get(n, "-")])
        click.echo(_rows(table))
    except security.SecurityError as e:
        raise click.ClickException(str(e)) from None


main.add_command(plan_command, "plan")


if __name__ == "__main__":
    main()
