"""What a handler is given: one parsed request, its body (bytes, or an upload still
arriving as a :class:`BodyStream`), and :class:`ClientGone` for a client that left.

This module knows nothing of the protocol or the routes: a stream talks back to its
connection through the three methods of :class:`Connection`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Protocol

from ..errors import DispatchError

__all__ = ["Request", "BodyStream", "ClientGone", "Connection"]

_STREAM_HIGH = 1 << 20         # upload bytes buffered before reading pauses ...
_STREAM_LOW = 1 << 18          # ... and resumes


class ClientGone(Exception):
    """The connection closed before the request was answered."""


class Connection(Protocol):
    """The side of a connection an upload talks back to."""

    def pause(self, reason: str) -> None:
        """Stop reading from the socket (until every reason given is resumed)."""

    def resume(self, reason: str) -> None:
        """Read again, as far as *reason* is concerned."""

    def send_continue(self, req: Request) -> None:
        """``100 Continue``, if the client waits for it before sending the body."""


class Request:
    """One parsed request; ``body`` is bytes, or ``stream`` an upload being received.

    ``route`` is what the handler's ``match`` found for the method and path (None if
    nothing matched: then ``error`` says why), ``params`` its path parameters.
    """

    __slots__ = ("method", "target", "path", "query", "headers", "http11", "keep_alive", "route", "params",
                 "error", "body", "stream", "complete", "expect_continue", "distributor", "admin", "started", "_waiter",
                 "_parts", "_size")

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.path = ""
        self.query = b""
        self.headers: dict[bytes, bytes] = {}
        self.http11 = True
        self.keep_alive = True
        self.route: Any = None
        self.params: dict[str, str] = {}
        self.error: DispatchError | None = None
        self.body = b""
        self.stream: BodyStream | None = None
        self.complete = False
        self.expect_continue = False
        self.distributor: str | None = None
        #: The name of the admin token that made the request, once authenticated.
        self.admin: str | None = None
        self.started = time.perf_counter()
        self._waiter: asyncio.Future[None] | None = None
        self._parts: list[bytes] = []
        self._size = 0

    @classmethod
    def failed(cls, error: DispatchError) -> Request:
        req = cls()
        req.error, req.complete, req.keep_alive = error, True, False
        return req

    def finish(self, error: BaseException | None = None) -> None:
        """The body is all in (or never will be, with *error*)."""
        if self.complete:
            return
        self.complete = True
        if self._parts:
            self.body = b"".join(self._parts)
            self._parts = []
        if self.stream is not None:
            self.stream.end(error)
        w = self._waiter
        if w is not None and not w.done():
            if error is None:
                w.set_result(None)
            else:
                w.set_exception(error)

    async def wait(self) -> None:
        if not self.complete:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


class BodyStream:
    """An upload as an async iterator of byte blocks, with backpressure on the socket."""

    __slots__ = ("_conn", "_req", "_blocks", "_buffered", "_error", "_done", "_waiter", "_started")

    def __init__(self, conn: Connection, req: Request) -> None:
        self._conn = conn
        self._req = req
        self._blocks: deque[bytes] = deque()
        self._buffered = 0
        self._error: BaseException | None = None
        self._done = False
        self._waiter: asyncio.Future[None] | None = None
        self._started = False

    def feed(self, data: bytes) -> None:
        self._blocks.append(data)
        self._buffered += len(data)
        if self._buffered > _STREAM_HIGH:
            self._conn.pause("stream")
        self._wake()

    def end(self, error: BaseException | None = None) -> None:
        if error is not None and self._error is None:
            self._error = error
        self._done = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        if not self._started:
            self._started = True
            self._conn.send_continue(self._req)
        while True:
            if self._error is not None:
                raise self._error
            if self._blocks:
                block = self._blocks.popleft()
                self._buffered -= len(block)
                if self._buffered < _STREAM_LOW:
                    self._conn.resume("stream")
                return block
            if self._done:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
