"""kimi-coordinator: the daemon. Plans the cluster, starts the engine
(kimizmq.engine) and serves its API (kimizmq.api) until SIGTERM. Holds no weights."""

from __future__ import annotations

import asyncio
import os
import resource
import signal

import click

from . import log
from .api import run_api
from .config import Config, ConfigError, load_config
from .control import ControlError, ControlTimeout
from .engine import Engine, RequestError
from .plan import PlanError, make_plan
from .tokenizer import load_tokenizer
from .versions import version_option

FD_SOFT_LIMIT = 65536  # open files the coordinator asks for (HTTP clients and ZMQ sockets)

logger = log.get_logger()


def raise_fd_limit(want: int = FD_SOFT_LIMIT) -> int:
    """Raise this process's soft limit on open files towards `want` (at most
    the hard limit): many idle HTTP clients must not starve the liveness
    checks' sockets. The limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            logger.warning("fd_limit_not_raised", soft=soft, hard=hard, error=str(e))
    return soft


async def serve(cfg: Config) -> None:
    plan = make_plan(cfg)
    tokenizer = load_tokenizer(cfg.model_path)
    engine = Engine(cfg, plan, tokenizer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = await run_api(engine)
    c = cfg.coordinator
    log.announce(
        f"kimi-coordinator: API listening on http://{c.api_host}:{c.api_port}/v1; "
        f"loading {len(plan.stages)} workers (tokens come back to {c.result_address})"
    )
    try:
        starter = asyncio.create_task(engine.start())
        done, _ = await asyncio.wait([starter, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if starter in done and starter.exception() is not None:
            raise starter.exception()
        await stop.wait()
    finally:
        engine.state = "stopping"
        engine.fail_all("the coordinator is shutting down")
        await runner.cleanup()
        await engine.close()
        logger.info("coordinator_stopped")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="etc/kimi.toml")
@click.option("-v", "--verbose", is_flag=True, help="also print every log line on stderr")
@version_option
def main(config_path: str, verbose: bool) -> None:
    """Run the coordinator of the cluster config."""
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    log.configure("coordinator", cfg.log_dir, verbose=verbose)
    logger.info("coordinator_started", pid=os.getpid(), api_port=cfg.coordinator.api_port, fd_limit=raise_fd_limit())
    try:
        asyncio.run(serve(cfg))
    except (PlanError, RequestError, ControlError, ControlTimeout, OSError, ValueError) as e:
        logger.error("coordinator_failed", error=str(e))
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
