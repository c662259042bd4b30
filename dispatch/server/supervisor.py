"""Running the daemon: :func:`serve` runs one process, or a supervisor and N workers,
each serving with an :class:`~dispatch.server.app.App` until SIGTERM or SIGINT.

Workers (``--workers N``) are separate processes, each with its own event loop,
engine and listening socket on the same port (SO_REUSEPORT: the kernel spreads
connections). With the embedded store the supervisor starts the one redis-server
and every worker connects to its socket. Only worker 0 runs the sweep: it is
idempotent, but N sweepers would only race one another for the same orders; the
supervisor restarts a worker that dies, so the sweep comes back with worker 0.

On SIGTERM or SIGINT a process shuts its App down (see app.py): what was received
is answered, then the engine is closed. The supervisor passes SIGTERM on to every
worker and waits for them.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import resource
import signal
import socket
import sys
import time
from multiprocessing.connection import wait as wait_any
from typing import Any

import msgspec
import uvloop

from ..config import Config
from ..engine import Engine, tune_gc
from ..store.embedded import EmbeddedRedis
from ..vault import load_master_keys
from .app import App
from .auth import load_admin_token

__all__ = ["serve", "bind", "prepare", "setup_logging", "JsonLines"]

log = logging.getLogger("dispatch.server")
access_log = logging.getLogger("dispatch.access")


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to host:port, ready to listen."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


class JsonLines(logging.Formatter):
    """One JSON object a line: ts, level, logger, pid and msg; an access line has its
    fields (``extra={"access": {...}}``) in place of msg; exc holds a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                                 "logger": record.name, "pid": record.process}
        access = getattr(record, "access", None)
        if access is not None:
            entry.update(access)
        else:
            entry["msg"] = record.getMessage()
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def setup_logging(config: Config) -> None:
    """Every log line (the access log's, the daemon's and its libraries', httpx's
    included) as one JSON object a line on stdout."""
    root = logging.getLogger()
    if not any(getattr(h, "_dispatch", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonLines())
        handler._dispatch = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    access_log.disabled = not config.access_log


def prepare(config: Config) -> Config:
    """What must happen once, before any worker: the master key file, the admin token."""
    load_master_keys(config)  # generates data_dir/master.key once, if no key is configured
    config = msgspec.structs.replace(config, admin_token=load_admin_token(config))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = config.max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("open files are limited to %d: fewer than max_connections=%d can be served",
                        new, config.max_connections)
    return config


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit status."""
    setup_logging(config)
    config = prepare(config)
    if config.workers == 1:
        uvloop.run(_serve_process(config, 0, sweep=True, reuse_port=False))
        return 0
    return _supervise(config)


async def _serve_process(config: Config, worker: int, *, sweep: bool, reuse_port: bool,
                         signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    sock = bind(config.host, config.port, reuse_port=reuse_port)
    engine = Engine(config, sweep=sweep)
    try:
        await engine.start()
    except BaseException:
        sock.close()
        raise
    app = App(config, engine, worker=worker)
    try:
        await app.start(sock=sock)
        host, port = sock.getsockname()[:2]
        tune_gc()
        log.info("dispatch serving on http://%s:%d (worker %d, pid %d)", _show(host), port, worker, os.getpid())
        await stop.wait()
        log.info("shutting down: finishing requests in flight (up to %.0f s)", config.shutdown_timeout_s)
    finally:
        await app.shutdown()
    log.info("stopped")


def _show(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _worker_main(config: Config, worker: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor says when to stop (SIGTERM)
    setup_logging(config)
    try:
        uvloop.run(_serve_process(config, worker, sweep=worker == 0, reuse_port=True, signals=(signal.SIGTERM,)))
    except Exception as e:
        log.error("worker %d failed: %s", worker, getattr(e, "message", None) or e)
        sys.exit(1)


def _supervise(config: Config) -> int:
    """Start the embedded Redis (if any) and N workers; restart a worker that dies."""
    # Holding the port (bound, not listening) fixes it for every worker, also when it is 0.
    reservation = bind(config.host, config.port, reuse_port=True)
    config = msgspec.structs.replace(config, port=reservation.getsockname()[1])
    embedded = None
    if config.redis_url is None:
        embedded = EmbeddedRedis(config.data_dir, binary=config.redis_server, appendfsync=config.appendfsync,
                                  jemalloc=config.redis_jemalloc)
        embedded.start()
        config = msgspec.structs.replace(config, redis_url=embedded.url)
    ctx = multiprocessing.get_context("spawn")
    stopping = []

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def start(worker: int) -> Any:
        p = ctx.Process(target=_worker_main, args=(config, worker), name=f"dispatch-worker-{worker}")
        p.start()
        return p

    status = 0
    procs = {w: start(w) for w in range(config.workers)}
    log.info("dispatch serving on http://%s:%d with %d workers (supervisor pid %d)",
             _show(config.host), config.port, config.workers, os.getpid())
    restarts: list[float] = []
    try:
        while not stopping:
            wait_any([p.sentinel for p in procs.values()], timeout=0.5)
            for w, p in list(procs.items()):
                if p.is_alive() or stopping:
                    continue
                now = time.monotonic()
                restarts[:] = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 2 * config.workers:
                    log.error("workers keep dying (last: worker %d, exit code %s); stopping", w, p.exitcode)
                    stopping.append(0)
                    status = 1
                    break
                log.error("worker %d died (exit code %s); restarting it", w, p.exitcode)
                procs[w] = start(w)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()  # SIGTERM: graceful
        deadline = time.monotonic() + config.shutdown_timeout_s + 5
        for p in procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                p.join()
        if embedded is not None:
            embedded.stop()
        reservation.close()
    log.info("stopped")
    return status
