"""One HTTP/1.1 connection: an asyncio.Protocol over httptools' parser, built (as
uvicorn's is) from three things: its :class:`Limits`, the :class:`ServerState` every
connection of the server shares, and a :class:`Handler` that turns a request into a
reply. It knows nothing of routes, the engine or the App.

Requests on a connection are answered one at a time, in the order they arrived
(pipelining); a request is queued as soon as its headers are in, so a streamed
upload reaches its handler while its body is still arriving. Flow control works
both ways: reading pauses while too many requests wait or an upload's consumer
falls behind, and the next request waits while the client does not read.

Limits and hostile clients:

- request line + headers over ``max_header_bytes``, a body over ``max_body_bytes``
  (``max_import_bytes`` for uploads): 413 and close;
- bytes that are not HTTP: 400 and close;
- headers not complete ``header_timeout_s`` after the first byte, a JSON body not
  complete ``body_timeout_s`` after the headers, an upload silent for
  ``body_timeout_s`` or not complete ``upload_timeout_s`` after its headers, a
  keep-alive connection idle for ``keepalive_timeout_s``:
  the connection is closed (nothing reached the engine); a client that reads
  none of its answers for ``body_timeout_s`` is cut off;
- beyond ``max_connections`` open connections a new one is closed at once.

Whatever the handler raises is answered by the error table (responses.py); a
client that left (:class:`ClientGone`) gets no answer.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import httptools
import msgspec

from ..errors import BadRequestError, DispatchError, PayloadTooLargeError
from .request import BodyStream, ClientGone, Request
from .responses import STATUS_LINES, Reply, StreamReply, error_reply

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["HttpProtocol", "Limits", "ServerState", "Handler"]

log = logging.getLogger("dispatch.server")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """What a connection allows its client (see the module docstring); sizes in bytes."""

    max_header_bytes: int
    max_body_bytes: int
    max_import_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int
    upload_timeout_s: float = 3600.0
    #: Requests queued on one connection before reading pauses.
    max_pipeline: int = 32

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        return cls(max_header_bytes=config.max_header_bytes, max_body_bytes=config.max_body_bytes,
                   max_import_bytes=config.max_import_bytes, header_timeout_s=config.header_timeout_s,
                   body_timeout_s=config.body_timeout_s, keepalive_timeout_s=config.keepalive_timeout_s,
                   max_connections=config.max_connections, upload_timeout_s=config.upload_timeout_s)


class Handler(Protocol):
    """What answers requests. ``match`` is called as soon as a request's headers are in
    (its route says whether the body is an upload, and so its size limit); it raises a
    DispatchError for a path or method it does not serve. Then the handler is called
    with the request, body complete or streaming, for the reply."""

    def match(self, method: str, path: str) -> tuple[Any, dict[str, str]]:
        """The route for *method* and *path* (kept as ``req.route``), and its path parameters."""
        ...

    async def __call__(self, req: Request) -> Reply | StreamReply:
        ...


def _ignore(*args: Any) -> None:
    pass


class ServerState:
    """What every connection of one server shares: the open connections, the tasks
    answering them (one per connection that has had a request), whether the server is
    draining, the date header of this second, and hooks told what happens (for metrics;
    they do nothing unless given):

    - ``on_reply(request, status)`` after each answer is written;
    - ``on_timeout(phase)`` when a connection is closed by a timer (header, body, idle, write);
    - ``on_reject()`` when a connection is closed at once (over max_connections, or draining);
    - ``on_connections(count)`` when the number of open connections changes.
    """

    def __init__(self, *, on_reply: Callable[[Request, int], None] = _ignore,
                 on_timeout: Callable[[str], None] = _ignore, on_reject: Callable[[], None] = _ignore,
                 on_connections: Callable[[int], None] = _ignore) -> None:
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.on_reply = on_reply
        self.on_timeout = on_timeout
        self.on_reject = on_reject
        self.on_connections = on_connections
        self._date = (0, b"")

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def date_header(self) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, b"date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n")
        return self._date[1]

    async def drain(self, timeout: float) -> None:
        """Graceful stop: read nothing new, answer what was received (within *timeout*),
        then close every connection and cancel what still runs."""
        self.draining = True
        for conn in list(self.connections):
            conn.shutdown()
        deadline = time.monotonic() + timeout
        while self.tasks and time.monotonic() < deadline:
            await asyncio.wait(list(self.tasks), timeout=deadline - time.monotonic())
        if self.tasks:
            log.warning("shutdown: %d connections still answering after %.1f s; cutting them off",
                        len(self.tasks), timeout)
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)


class HttpProtocol(asyncio.Protocol):
    """Parses requests, queues them in order, and writes the handler's replies."""

    # Slots: an instance dict of this many keys is past what CPython shares and reads
    # fast, which made every attribute access of a request dearer.
    __slots__ = ("_limits", "_state", "_handler", "_match", "_max_header", "_max_body", "_max_import", "_loop",
                 "_parser", "transport", "_queue", "_runner", "_waiting", "_answering", "_req", "_url", "_header_bytes",
                 "_phase", "_parsing", "_paused", "_deadline", "_kind", "_timer", "_timer_at", "_upload_timer",
                 "_write_paused", "_drain_waiter", "_draining", "_moved", "closed")

    def __init__(self, limits: Limits, state: ServerState, handler: Handler) -> None:
        self._limits = limits
        self._state = state
        self._handler = handler
        self._match = handler.match
        self._max_header = limits.max_header_bytes
        self._max_body = limits.max_body_bytes
        self._max_import = limits.max_import_bytes
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._queue: deque[Request] = deque()
        self._runner: asyncio.Task[None] | None = None
        self._waiting: asyncio.Future[None] | None = None  # the runner's, while the queue is empty
        self._answering = False
        self._req: Request | None = None       # the request being parsed
        self._url = b""
        self._header_bytes = 0
        self._phase = "idle"                   # idle | headers | body: what the parser waits for
        self._parsing = True                   # False once nothing more will be read
        self._paused: set[str] = set()
        self._deadline: float | None = None    # when the timeout of this phase (_kind) expires
        self._kind = ""
        self._timer: asyncio.TimerHandle | None = None  # fires at _timer_at, at or before _deadline
        self._timer_at = 0.0
        self._upload_timer: asyncio.TimerHandle | None = None  # the whole upload's deadline
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._draining = False
        self._moved = False
        self.closed = False

    # ---- connection ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        state = self._state
        if state.draining or len(state.connections) >= self._limits.max_connections:
            state.on_reject()
            self.closed, self._parsing = True, False
            transport.close()
            return
        state.connections.add(self)
        state.on_connections(len(state.connections))
        self._rearm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed, self._parsing = True, False
        self._stop_timer()
        self._end_upload()
        state = self._state
        state.connections.discard(self)
        state.on_connections(len(state.connections))
        gone = ClientGone()
        for req in self._queue:
            req.finish(gone)
        if self._req is not None:
            self._req.finish(gone)
        self._wake_drain()
        self._wake_runner()

    def close(self, *, abort: bool = False) -> None:
        """Close after what is buffered is sent, or at once with *abort*."""
        if not self.closed:
            self.closed, self._parsing = True, False
            self._stop_timer()
            self._wake_runner()
            assert self.transport is not None
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def shutdown(self) -> None:
        """Graceful stop: answer what was received, read nothing new, then close."""
        self._draining = True
        if self.closed:
            return
        if self.idle:
            self.close()
        elif self._phase != "body":  # a request still arriving in headers never reached the engine
            self._stop_reading("shutdown")

    @property
    def idle(self) -> bool:
        return not self._queue and not self._answering

    # ---- flow control --------------------------------------------------------------------
    def pause(self, reason: str) -> None:
        if not self._paused and not self.closed:
            assert self.transport is not None
            self.transport.pause_reading()
            self._disarm()  # a client we do not read from is not slow
        self._paused.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and not self.closed:
                assert self.transport is not None
                self.transport.resume_reading()
                self._rearm()

    def _stop_reading(self, reason: str) -> None:
        self._parsing = False
        self.pause(reason)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _drain(self) -> None:
        """Wait while the client does not read what we sent (at most body_timeout_s)."""
        if self._write_paused and not self.closed:
            self._drain_waiter = self._loop.create_future()
            try:
                await asyncio.wait_for(self._drain_waiter, self._limits.body_timeout_s)
            except asyncio.TimeoutError:
                self._state.on_timeout("write")
                log.info("closing a connection: its client stopped reading")
                self.close(abort=True)  # a plain close would wait for the unread buffer forever

    # ---- timers ----------------------------------------------------------------------------
    # A connection moves through three timeouts per request; one timer serves them all.
    # Arming only moves the deadline, and the timer, when it fires early, sleeps on to
    # it: a timer is made again only when a deadline comes before the one it fires at.
    def _disarm(self) -> None:
        self._deadline = None

    def _stop_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _end_upload(self) -> None:
        if self._upload_timer is not None:
            self._upload_timer.cancel()
            self._upload_timer = None

    def _rearm(self) -> None:
        """The timeout that fits the parser's phase: header, body, or keep-alive idle."""
        self._deadline = None
        if self.closed or self._paused:
            return
        limits = self._limits
        if self._phase == "headers":
            delay, kind = limits.header_timeout_s, "header"
        elif self._phase == "body":
            delay, kind = limits.body_timeout_s, "body"
        elif self.idle:
            delay, kind = limits.keepalive_timeout_s, "idle"
        else:
            return  # a request is being answered: the client waits for us
        at = self._loop.time() + delay
        self._deadline, self._kind = at, kind
        if self._timer is None or self._timer_at > at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = self._loop.call_at(at, self._tick), at

    def _tick(self) -> None:
        self._timer = None
        at = self._deadline
        if at is None:
            return
        if at > self._loop.time() + 0.001:  # timers may fire a little early
            self._timer, self._timer_at = self._loop.call_at(at, self._tick), at
            return
        self._timed_out(self._kind)

    def _timed_out(self, kind: str) -> None:
        if kind == "upload":
            self._upload_timer = None
        self._state.on_timeout(kind)
        if kind != "idle":
            log.info("closing a connection: %s timeout", kind)
        self.close()

    # ---- parser callbacks --------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self._parsing:
            return
        self._moved = False  # set by a callback that starts a phase (or feeds an upload)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request asking for another protocol is answered as plain HTTP; what
            # follows it is not HTTP, so nothing more is read.
            if self._queue and self._req is None:
                self._queue[-1].keep_alive = False
                self._stop_reading("upgrade")
            else:
                self._reject(BadRequestError("protocol upgrades are not supported"))
        except httptools.HttpParserError as e:
            if self._parsing:  # not a limit we stopped at ourselves
                self._reject(BadRequestError(f"malformed HTTP request: {e}"))
        if self._moved:  # once a read, for the phase the parser ended in: no time passed in between
            self._rearm()

    def on_message_begin(self) -> None:
        if not self._parsing:
            return
        self._req = Request()
        self._url = b""
        self._header_bytes = 0
        self._phase = "headers"
        self._moved = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._max_header:
            self._head_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req
        if req is None or not self._parsing:
            return
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_header:
            self._head_too_large()
        name = name.lower()
        headers = req.headers
        if name in headers:
            headers[name] += b", " + value
        else:
            headers[name] = value

    def _head_too_large(self) -> None:
        if self._parsing:
            self._reject(PayloadTooLargeError(f"request line and headers are over {self._max_header} bytes"))

    def on_headers_complete(self) -> None:
        req = self._req
        if req is None or not self._parsing:
            return
        p = self._parser
        req.method = p.get_method().decode("ascii", "replace")
        req.http11 = p.get_http_version() == "1.1"
        req.keep_alive = p.should_keep_alive()
        req.target = self._url
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            self._reject(BadRequestError("malformed request target"))
            return
        req.query = url.query or b""
        try:
            req.path = (url.path or b"/").decode()
        except UnicodeDecodeError:
            self._reject(BadRequestError("the request path is not UTF-8"))
            return
        try:
            req.route, req.params = self._match(req.method, req.path)
        except DispatchError as e:
            req.error = e
        streamed = req.route is not None and req.route.stream and req.error is None
        limit = self._max_import if streamed else self._max_body
        length = req.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self._reject(PayloadTooLargeError(f"the body is over {limit} bytes"))
            return
        req.expect_continue = req.headers.get(b"expect", b"").lower() == b"100-continue"
        if streamed:
            req.stream = BodyStream(self, req)
            self._upload_timer = self._loop.call_later(self._limits.upload_timeout_s, self._timed_out, "upload")
        self._queue.append(req)
        self._phase = "body"
        self._moved = True
        self._kick()

    def on_body(self, body: bytes) -> None:
        req = self._req
        if req is None or not self._parsing:
            return
        req._size += len(body)
        if req.stream is not None:
            if req._size > self._max_import:
                self._reject(PayloadTooLargeError(f"the upload is over {self._max_import} bytes"))
                return
            req.stream.feed(body)
            self._moved = True  # an upload may take long; it may not stall
        else:
            if req._size > self._max_body:
                self._reject(PayloadTooLargeError(f"the body is over {self._max_body} bytes"))
                return
            req._parts.append(body)

    def on_message_complete(self) -> None:
        req = self._req
        if req is None or not self._parsing:
            return
        self._req = None
        self._phase = "idle"
        self._end_upload()
        req.finish()
        if not req.keep_alive or self._draining:
            self._stop_reading("close")  # nothing after this request will be answered
        elif len(self._queue) >= self._limits.max_pipeline:
            self.pause("pipeline")
        self._moved = True

    def _reject(self, error: DispatchError) -> None:
        """Parsing cannot go on: answer *error* in turn, then close."""
        self._stop_reading("rejected")
        self._phase = "idle"
        req, self._req = self._req, None
        if req is not None and req in self._queue:  # its headers were queued: it takes the error
            req.error, req.keep_alive = error, False
            req.finish(error)
        else:
            self._queue.append(Request.failed(error))
        self._kick()

    # ---- answering ---------------------------------------------------------------------------
    # One task per connection answers its requests, made with the first and kept while
    # the connection is open: a task costs several times what waking one does.
    def _kick(self) -> None:
        if self._runner is None:
            if self._queue and not self.closed:
                self._runner = self._loop.create_task(self._run())
                self._state.track(self._runner)
        else:
            self._wake_runner()

    def _wake_runner(self) -> None:
        w = self._waiting
        if w is not None:
            self._waiting = None
            if not w.done():
                w.set_result(None)

    async def _run(self) -> None:
        try:
            while not self.closed:
                if not self._queue:
                    if self._draining:
                        break
                    self._rearm()
                    self._waiting = self._loop.create_future()
                    await self._waiting
                    continue
                req = self._queue[0]
                self._answering = True
                reply = await self._answer(req)
                if reply is None or self.closed:
                    self.close()
                    break
                # Close when the body was not all read (or could not be), the client asked,
                # or we are stopping and this is the last request received.
                keep = req.keep_alive and req.complete and not (self._draining and len(self._queue) == 1)
                if isinstance(reply, StreamReply):
                    keep = await self._send_stream(req, reply, keep)
                else:
                    self._send(req, reply, keep)
                self._queue.popleft()
                self._state.on_reply(req, reply.status)
                if not keep:
                    self.close()
                    break
                if len(self._queue) < self._limits.max_pipeline // 2:
                    self.resume("pipeline")
                if self._write_paused:
                    await self._drain()
                self._answering = False
        finally:
            self._runner = self._waiting = None
            self._answering = False
            if not self.closed:
                if self._draining and not self._queue:
                    self.close()
                else:
                    self._rearm()
                    self._kick()

    async def _answer(self, req: Request) -> Reply | StreamReply | None:
        """The reply to *req*; None if the client went away first."""
        if req.error is not None:
            return error_reply(req.error)
        try:
            if req.stream is None and not req.complete:
                self.send_continue(req)
                await req.wait()  # raises the error of a body stopped at a limit
            return await self._handler(req)
        except ClientGone:
            return None
        except Exception as e:
            return error_reply(e)

    def send_continue(self, req: Request) -> None:
        """``100 Continue`` for a client that waits for it before sending the body."""
        if req.expect_continue and not req.complete and not self.closed:
            req.expect_continue = False
            assert self.transport is not None
            self.transport.write(_CONTINUE)

    def _head(self, req: Request, status: int, content_type: bytes, length: int | None,
              headers: list[tuple[bytes, bytes]], keep: bool) -> list[bytes]:
        parts = [STATUS_LINES[status], b"content-type: ", content_type, b"\r\n", self._state.date_header()]
        if length is not None:
            parts.append(b"content-length: %d\r\n" % length)
        elif req.http11:
            parts.append(b"transfer-encoding: chunked\r\n")
        for name, value in headers:
            parts += [name, b": ", value, b"\r\n"]
        if not keep:
            parts.append(b"connection: close\r\n")
        elif not req.http11:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return parts

    def _send(self, req: Request, reply: Reply, keep: bool) -> None:
        assert self.transport is not None
        body = reply.body
        if keep and req.http11 and not reply.headers:  # most answers: nothing but the usual head
            self.transport.write(b"%bcontent-type: %b\r\n%bcontent-length: %d\r\n\r\n%b" % (
                STATUS_LINES[reply.status], reply.content_type, self._state.date_header(), len(body), body))
            return
        parts = self._head(req, reply.status, reply.content_type, len(body), reply.headers, keep)
        parts.append(body)
        self.transport.write(b"".join(parts))

    async def _send_stream(self, req: Request, reply: StreamReply, keep: bool) -> bool:
        """Send a body block by block: chunked on HTTP/1.1, until close on HTTP/1.0."""
        chunked = req.http11
        keep = keep and chunked
        assert self.transport is not None
        write = self.transport.write
        write(b"".join(self._head(req, reply.status, reply.content_type, None, reply.headers, keep)))
        blocks: Any = reply.blocks
        try:
            async for block in blocks:
                if self.closed:
                    return False
                if block:
                    write(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
                await self._drain()
        except Exception:
            # The status line is out: all that is left to say "failed" is to cut the body short.
            log.exception("a streamed response failed; closing the connection")
            return False
        finally:
            aclose = getattr(blocks, "aclose", None)
            if aclose is not None:
                await aclose()
        if chunked and not self.closed:
            write(b"0\r\n\r\n")
        return keep
