"""The App: what one process serves with, wired together: the engine, the
authenticator, the metrics, the router (the protocol's handler, given those), and
the limits and shared state that every connection (an :class:`HttpProtocol`) is
built from, with the router. The metrics hear of connections and answers through
the state's hooks.

Shutdown (:meth:`App.shutdown`): stop accepting, close idle connections, answer every
request already received (up to ``shutdown_timeout_s``), then close the engine,
which lets queued script calls finish and stops the embedded Redis. An order is
shielded inside the engine: one cut off by the deadline still runs to its end or,
after a crash, is finished by the recovery sweep.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import msgspec

from ..config import Config
from ..engine import Engine
from . import openapi
from .auth import Authenticator
from .metrics import Metrics
from .protocol import HttpProtocol, Limits, ServerState
from .request import Request
from .routes import ROUTES, Router

__all__ = ["App"]

log = logging.getLogger("dispatch.server")
access_log = logging.getLogger("dispatch.access")
_encode = msgspec.json.encode


class App:
    """Everything one process serves with. ``await app.start(...)``, then ``await app.shutdown()``."""

    def __init__(self, config: Config, engine: Engine, *, worker: int = 0) -> None:
        self.config = config
        self.engine = engine
        self.worker = worker
        self.auth = Authenticator(engine, config)
        self.metrics = Metrics(engine)
        self.limits = Limits.from_config(config)
        self.state = ServerState(on_reply=self._observe, on_timeout=self.metrics.timeout,
                                 on_reject=self.metrics.rejected, on_connections=self.metrics.connections.set)
        self.router = Router(ROUTES, engine, self.auth, metrics=self.metrics, state=self.state,
                             openapi=_encode(openapi.document(ROUTES)))
        self._server: asyncio.AbstractServer | None = None
        self._access = config.access_log
        if not config.admin_token:
            log.warning("no admin_token is configured: every admin endpoint answers 401")

    async def start(self, host: str | None = None, port: int | None = None, *,
                    sock: socket.socket | None = None) -> asyncio.AbstractServer:
        """Listen on *sock*, or on *host*:*port* (default: the config's)."""
        loop = asyncio.get_running_loop()
        limits, state, router = self.limits, self.state, self.router

        def connection() -> HttpProtocol:
            return HttpProtocol(limits, state, router)

        if sock is not None:
            self._server = await loop.create_server(connection, sock=sock, backlog=2048)
        else:
            self._server = await loop.create_server(connection, host or self.config.host,
                                                    self.config.port if port is None else port, backlog=2048)
        return self._server

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, finish what was received (within *timeout*), close the engine."""
        if self._server is not None:
            self._server.close()
        await self.state.drain(self.config.shutdown_timeout_s if timeout is None else timeout)
        await self.engine.close()

    def _observe(self, req: Request, status: int) -> None:
        """Metrics and the access log line of an answered request (never a body, code or key)."""
        seconds = time.perf_counter() - req.started
        route = req.route.template if req.route is not None else "-"
        method = req.method if req.route is not None else "-"
        self.metrics.request(route, method, status, seconds)
        if self._access:
            access_log.info("%s %s %d", method, route, status,
                            extra={"access": {"method": req.method or "-", "route": route, "status": status,
                                              "ms": round(seconds * 1000, 3), "distributor": req.distributor,
                                              "admin": req.admin, "worker": self.worker}})
