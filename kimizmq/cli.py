"""`kimi`: the command-line client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import aiohttp
import click

from .cluster_cli import down_command, init_command, service_group, sync_command, up_command
from .config import Config, ConfigError, load_config
from .discovery import config_option, find_config
from .log import LEVELS
from .plan_cli import plan_command
from .versions import version_option

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)


def _config(path: str | None) -> Config:
    try:
        return load_config(find_config(path))
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def _api(cfg: Config) -> str:
    host = cfg.coordinator.api_host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '*', '::') else host}:{cfg.coordinator.api_port}"


def _headers(cfg: Config) -> dict:
    key = cfg.security.api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


class StreamStats:
    """What `kimi prompt --verbose` reports: time to first token, tokens/s."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.first: float | None = None
        self.end: float | None = None
        self.completion_tokens: int | None = None

    def summary(self) -> str:
        if self.first is None or self.end is None:
            return "no tokens came back"
        ttft = self.first - self.start
        n = self.completion_tokens
        rest = self.end - self.first
        rate = f"{(n - 1) / rest:.1f} tokens/s after the first" if n and n > 1 and rest > 0 else "tokens/s: -"
        return f"{n if n is not None else '?'} tokens; TTFT {ttft * 1e3:.0f} ms; {rate}; {self.end - self.start:.2f} s in all"


async def stream_completion(cfg: Config, body: dict, out, stats: StreamStats | None = None) -> str:
    """POST a streaming request and write the text to `out` as it arrives
    (with `stats`, also ask for the usage and time the stream)."""
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    body = {**body, "stream": True, "model": cfg.model_name}
    if stats is not None:
        body["stream_options"] = {"include_usage": True}
    text = []
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT, headers=_headers(cfg)) as session:
        async with session.post(_api(cfg) + path, json=body) as resp:
            if resp.status != 200:
                try:
                    msg = (await resp.json())["error"]["message"]
                except (aiohttp.ContentTypeError, KeyError, TypeError, json.JSONDecodeError):
                    msg = await resp.text()
                raise click.ClickException(f"HTTP {resp.status}: {msg}")
            try:
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise click.ClickException(chunk["error"]["message"])
                    if stats is not None and chunk.get("usage"):
                        stats.completion_tokens = chunk["usage"].get("completion_tokens")
                    for choice in chunk.get("choices", []):
                        piece = choice.get("text") if "text" in choice else choice.get("delta", {}).get("content")
                        if piece:
                            if stats is not None and stats.first is None:
                                stats.first = time.monotonic()
                            out.write(piece)
                            out.flush()
                            text.append(piece)
            except asyncio.CancelledError:  # Ctrl-C
                # Drop the connection now (a plain release would read the rest
                # of the answer first); the coordinator then cancels the request.
                resp.close()
                raise
    if stats is not None:
        stats.end = time.monotonic()
    return "".join(text)


def _run(coro):
    try:
        return asyncio.run(coro)
    except aiohttp.ClientConnectionError as e:
        raise click.ClickException(f"cannot reach the coordinator: {e}; is kimi-coordinator running?") from None


class _Commands(click.Group):
    """`kimi bench` comes from the kimizmq_bench package, imported only when asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "bench"])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "bench":
            from kimizmq_bench.cli import bench_command

            return bench_command
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@version_option
def main() -> None:
    """kimizmq: run one model across several Macs."""


@main.command("prompt")
@config_option
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.6, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--raw", is_flag=True, help="send exactly the tokens of TEXT: no chat template, no BOS")
@click.option("-v", "--verbose", is_flag=True, help="then print tokens, time to first token and tokens/s on stderr")
@click.argument("text")
def prompt_command(config_path, max_tokens, temperature, top_p, seed, raw, verbose, text):
    """Write the completion of TEXT, and only it, to stdout as it streams.
    TEXT "-" reads the prompt from stdin."""
    cfg = _config(config_path)
    if text == "-":
        text = sys.stdin.read()
    body = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    if seed is not None:
        body["seed"] = seed
    if raw:
        body["prompt"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]
    stats = StreamStats() if verbose else None
    _run(stream_completion(cfg, body, sys.stdout, stats))
    sys.stdout.write("\n")
    if stats is not None:
        click.echo(stats.summary(), err=True)


@main.command("demo")
@click.option("--workers", type=click.IntRange(1, 8), default=2, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=96, show_default=True)
@click.option("--dir", "work_dir", default="var/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--keep", is_flag=True, help="then keep the cluster up, to use its page in a browser, until Ctrl-C")
@click.argument("text", default="Hello!")
def demo_command(workers, max_tokens, work_dir, keep, text):
    """Bring up a coordinator and workers on loopback with the small trained
    demo model (Kimi-K2's layout, shipped with kimizmq) and stream one answer."""
    from .demomodel import DEMO_MODEL, DEMO_MODEL_NAME
    from .local import LocalCluster, write_config

    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = write_config(work / "kimi.toml", DEMO_MODEL, workers, model_name=DEMO_MODEL_NAME)
    click.echo(f"model: {DEMO_MODEL}\nconfig: {cfg_path}\nstarting {workers} workers and a coordinator ...", err=True)
    with LocalCluster(cfg_path) as cluster:
        health = cluster.health()[1]
        for s in health["stages"]:
            click.echo(f"  {s['worker']}: layers [{s['start']}, {s['end']})", err=True)
        click.echo(f"ready at {cluster.api}; streaming a greedy answer to: {text}\n", err=True)
        cfg = _config(str(cfg_path))
        stats = StreamStats()
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0.0}
        _run(stream_completion(cfg, body, sys.stdout, stats))
        sys.stdout.write("\n")
        click.echo(f"\n{stats.summary()}; through {len(health['stages'])} workers", err=True)
        if keep:
            click.echo(f"\nthe cluster stays up: open {cluster.api}/ in a browser; Ctrl-C stops it", err=True)
            with contextlib.suppress(KeyboardInterrupt):
                cluster.coordinator.wait()
    click.echo(f"\nstopped. logs: {cluster.log_dir} (try: kimi logs --config {cfg_path})", err=True)


def _rows(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


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


# -- kimi chat ----------------------------------------------------------------------

CHAT_PROMPT = "you> "


class _Transcript:
    """Writes an answer through to `out` and keeps it, also when it is cut short."""

    def __init__(self, out):
        self.out = out
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)
        self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    @property
    def text(self) -> str:
        return "".join(self.parts)


@main.command("chat")
@config_option
@click.option("--system", default=None, help="a system message to start the conversation with")
@click.option("--max-tokens", type=click.IntRange(1), default=1024, show_default=True, help="per answer")
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.6, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
def chat_command(config_path, system, max_tokens, temperature, top_p, seed):
    """Chat with the model, turn after turn.

    Answers stream as they are written, and every turn sees the conversation
    so far. Ctrl-C stops the answer being written, not the chat; Ctrl-D or
    /exit ends the chat; /reset forgets the conversation."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and input history

    cfg = _config(config_path)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    click.echo(
        f"{cfg.model_name} at {_api(cfg)}: Ctrl-C stops an answer, Ctrl-D or /exit quits, /reset starts over.",
        err=True,
    )
    while True:
        try:
            text = input(CHAT_PROMPT).strip()
        except EOFError:
            click.echo(err=True)
            return
        except KeyboardInterrupt:
            click.echo(err=True)
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(start)
            click.echo("(the conversation is forgotten)", err=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        body = {"messages": history, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        if seed is not None:
            body["seed"] = seed
        answer = _Transcript(sys.stdout)
        try:
            _run(stream_completion(cfg, body, answer))
        except KeyboardInterrupt:
            click.echo("\n[stopped]", err=True)
        except click.ClickException as e:
            click.echo(f"\nerror: {e.format_message()}", err=True)
            history.pop()
            continue
        else:
            sys.stdout.write("\n")
        history.append({"role": "assistant", "content": answer.text})


# -- kimi status --------------------------------------------------------------------

STATUS_HTTP_TIMEOUT_S = 10.0  # /health itself waits up to a few seconds for slow workers
STATUS_CONTROL_TIMEOUT_S = 3.0  # each worker's stats, asked directly when the coordinator is down
STATUS_RATE_MARGIN_S = 0.3  # beyond one heartbeat, to measure tokens/s when /health has no recent sample


async def _health(cfg: Config) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STATUS_HTTP_TIMEOUT_S)) as session:
        async with session.get(_api(cfg) + "/health") as resp:
            body = await resp.json(content_type=None)
    if not isinstance(body, dict) or not isinstance(body.get("workers"), dict) or "coordinator" not in body:
        raise ValueError("its /health does not answer like kimi-coordinator's")
    return body


async def _status_from_coordinator(cfg: Config) -> dict:
    body = await _health(cfg)
    rates = [body["coordinator"].get("tokens_per_s")] + [w.get("tokens_per_s") for w in body["workers"].values()]
    if body.get("status") == "ready" and None in rates:
        # Rates come from the samples /health has seen: nobody asked lately, so measure over one heartbeat.
        await asyncio.sleep(cfg.runtime.heartbeat_interval_s + STATUS_RATE_MARGIN_S)
        body = await _health(cfg)
    coordinator = {
        **body["coordinator"],
        "up": True,
        "requests_in_flight": body.get("requests_in_flight"),
        "queue_depth": body.get("queue_depth"),
    }
    return {
        "model": body.get("model"),
        "coordinator": coordinator,
        "workers": [{"name": n, **w} for n, w in body["workers"].items()],
    }


async def _status_from_workers(cfg: Config, reason: str) -> dict:
    """The coordinator is down: ask each worker's control socket directly."""
    import zmq.asyncio

    from . import security, status
    from .control import ControlClient, ControlError, ControlTimeout

    report = {
        "model": cfg.model_name,
        "coordinator": {"state": "down", "up": False, "address": _api(cfg).removeprefix("http://"), "error": reason},
        "workers": [],
    }
    try:
        curve = security.Curve.for_daemon(cfg, security.COORDINATOR, peers=tuple(w.name for w in cfg.workers))
    except security.SecurityError as e:
        curve, key_error = None, f"cannot ask it directly: {e}"
    else:
        key_error = None
    ctx = zmq.asyncio.Context()
    clients = {
        w.name: ControlClient(ctx, w.name, w.control_address, curve.client if curve is not None else None)
        for w in cfg.workers
    }

    async def one(w) -> dict:
        if key_error is not None:
            answer = {"state": "unknown", "up": False, "error": key_error}
        else:
            try:
                s = await clients[w.name].call("stats", timeout=STATUS_CONTROL_TIMEOUT_S)
            except (ControlTimeout, ControlError) as e:
                answer = {"state": "down", "up": False, "error": str(e), "last_seen": None}
            else:
                answer = {**s, "up": True, "last_seen": time.time()}
        return {"name": w.name, **status.worker_row(answer, w)}

    try:
        report["workers"] = list(await asyncio.gather(*(one(w) for w in cfg.workers)))
    finally:
        for c in clients.values():
            c.close()
        ctx.term()
    return report


async def cluster_status(cfg: Config) -> dict:
    """The coordinator's /health; when it cannot be asked, the workers' own stats."""
    try:
        return await _status_from_coordinator(cfg)
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        return await _status_from_workers(cfg, f"{_api(cfg)}: {str(e) or type(e).__name__}")


def _size(b) -> str:
    if not isinstance(b, (int, float)):
        return "-"
    return f"{b / (1 << 30):.1f} GiB" if b >= 1 << 30 else f"{b / (1 << 20):.1f} MiB"


def _load(w: dict) -> str:
    p = w.get("progress") or {}
    total = p.get("total_bytes")
    if not total:
        return "-"
    text = f"{p.get('done_bytes', 0) / total:.0%} of {_size(total)}"
    if w.get("state") == "loading" and p.get("rate_bytes_s"):
        text += f" at {p['rate_bytes_s'] / 1e6:.0f} MB/s"
    return text


def format_status(report: dict) -> str:
    c = report["coordinator"]
    if c.get("up"):
        rate = f", {c['tokens_per_s']:.1f} tokens/s" if c.get("tokens_per_s") is not None else ""
        head = (
            f"coordinator {c.get('address')}: {c.get('state')} (model {report.get('model')}, "
            f"{c.get('requests_in_flight')} in flight, {c.get('queue_depth')} queued{rate}, "
            f"up {c.get('uptime_s', 0):.0f} s)"
        )
    else:
        head = f"coordinator {c.get('address')}: down ({c.get('error')}); the workers answered directly:"
    if prefix := c.get("prefix_cache"):
        head += (
            f"\nprefix cache: {prefix['hits']} hits, {prefix['misses']} misses, {prefix['tokens_reused']} prompt "
            f"tokens reused, {prefix['entries']} entries, {prefix['evictions']} evicted"
        )
    table = [["WORKER", "ADDRESS", "STATE", "LAYERS", "MEMORY", "PREFIX CACHE", "LOAD", "TOK/S", "HEARTBEAT"]]
    notes = []
    for w in report["workers"]:
        layers = w.get("layers")
        rate = w.get("tokens_per_s")
        seen = w.get("last_seen")
        table.append(
            [
                w["name"],
                str(w.get("address", "-")).removeprefix("tcp://"),
                str(w.get("state", "unknown")),
                f"[{layers[0]}, {layers[1]})" if layers else "-",
                f"{_size(w.get('memory_bytes'))} / {_size(w.get('memory_total_bytes'))}",
                f"{_size(w.get('prefix_bytes'))} / {_size(w.get('prefix_budget_bytes'))}",
                _load(w),
                f"{rate:.1f}" if rate is not None else "-",
                f"{max(time.time() - seen, 0):.1f} s ago" if seen else "-",
            ]
        )
        if w.get("error"):
            notes.append(f"{w['name']}: {w['error']}")
    return "\n".join([head, _rows(table), *notes])


@main.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def status_command(config_path, as_json):
    """Show the state of the coordinator and of every worker.

    One row per worker: address, state, layers, memory used and total, the
    prefix cache's bytes and budget, load progress, tokens/s, last heartbeat. Asks the coordinator; when it is down,
    asks every worker directly. Exits 1 unless the cluster is ready."""
    cfg = _config(config_path)
    report = asyncio.run(cluster_status(cfg))
    click.echo(json.dumps(report, indent=2) if as_json else format_status(report))
    raise SystemExit(0 if report["coordinator"].get("state") == "ready" else 1)


# -- kimi logs ----------------------------------------------------------------------


@main.command("logs")
@config_option
@click.option("-f", "--follow", is_flag=True, help="keep printing lines as they are written")
@click.option("--request", "request_id", help="only the lines of this request (its id is the response's id)")
@click.option("--level", type=click.Choice(list(LEVELS)), help="only lines of this level or worse")
@click.option("--daemon", "daemons", multiple=True, help="only this daemon's lines: coordinator, worker-NAME")
@click.option("-n", "--lines", type=click.IntRange(0), help="of the lines there already, only the last N")
@click.option("--json", "as_json", is_flag=True, help="print the merged lines as they are, JSON")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
def logs_command(config_path, follow, request_id, level, daemons, lines, as_json, paths):
    """Show the daemons' logs, merged in time order.

    Reads the log folder of the config, the logs of workers on other machines
    (over their control sockets) and PATHS (more log files or folders).
    `--request ID` follows one request through the coordinator and every stage."""
    from .logs import LogReader, RemoteLogs, matcher, show
    from .security import SecurityError

    cfg = _config(config_path)
    try:
        remote = RemoteLogs(cfg, cfg.log_dir / "remote")
    except SecurityError as e:
        raise click.ClickException(f"cannot read the workers' logs over the network: {e}") from None
    remote.refresh()
    for problem in remote.errors.values():
        click.echo(f"warning: {problem}", err=True)
    reader = LogReader([cfg.log_dir, cfg.log_dir / "remote", *paths])
    if not reader.files() and not follow:
        raise click.ClickException(f"no logs in {cfg.log_dir} and no worker answered: is the cluster running?")
    with contextlib.suppress(KeyboardInterrupt):  # how following ends
        show(
            reader,
            matcher(request_id, level, daemons),
            click.echo,
            as_json=as_json,
            last=lines,
            follow=follow,
            refresh=remote.refresh,
        )


main.add_command(plan_command, "plan")
for _command in (up_command, down_command, sync_command, init_command, service_group):
    main.add_command(_command)


if __name__ == "__main__":
    main()
