"""The API's TCP site: at most so many HTTP connections at once; one beyond
them is answered 503 with Retry-After and closed."""

from __future__ import annotations

import asyncio
import resource

from aiohttp import web

from .bodies import RETRY_AFTER_S

MAX_CONNECTIONS = 1024  # open HTTP connections; more get 503 and are closed
FD_RESERVE = 128  # open files kept for everything but HTTP (ZMQ sockets, logs)


class _Refuse(asyncio.Protocol):
    """A connection beyond the limit: 503 with Retry-After, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(  # type: ignore[attr-defined]
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: %d\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n" % RETRY_AFTER_S
        )
        transport.close()


class BoundedSite(web.TCPSite):
    """A TCPSite that serves at most `max_connections` connections at once."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, max_connections: int):
        super().__init__(runner, host, port)
        self.max_connections = max_connections

    def _protocol(self) -> asyncio.Protocol:
        server = self._runner.server
        if len(server.connections) >= self.max_connections:
            return _Refuse()
        return server()

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self._host, self._port, reuse_address=True)


def max_connections() -> int:
    """MAX_CONNECTIONS, or fewer where the open-file limit would not allow them."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(16, min(MAX_CONNECTIONS, soft - FD_RESERVE))
