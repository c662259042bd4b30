"""HTTP side by side, in one run on the embedded Redis (appendfsync always, unix socket):
``dispatch serve`` (one worker) against a straightforward FastAPI + uvicorn app
(``bench/http/fastapi_app.py``: one worker, one script call per saga step), both
driven by the same wrk command:

    wrk -t2 -c64 -d10s --latency -s bench/http/orders.lua http://127.0.0.1:PORT -- API_KEY SKU 1

    .venv/bin/pip install -e '.[bench]'          # fastapi, uvicorn[standard]
    .venv/bin/python bench/http/compare_http.py  # about 1.5 minutes

For each server: FLUSHALL, seed through the engine on the same Redis (a SKU with
--codes codes, a supplier, a distributor with a huge balance), start the server
as a subprocess in its own process group, a short wrk warm-up, the measured wrk
run, stop the server. wrk, the server and Redis share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import redis

from dispatch import Config, Engine
from dispatch.store.embedded import EmbeddedRedis

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LUA = os.path.join(HERE, "orders.lua")
SKU = "bench-1"
MASTER_KEY = base64.b64encode(secrets.token_bytes(32)).decode()
ADMIN_TOKEN = secrets.token_urlsafe(32)


@dataclass
class Figures:
    requests_s: float
    delivered_s: float
    delivered: int
    statuses: dict[int, int]
    p50_ms: float
    p99_ms: float
    seconds: float
    errors: str
    server_cpu_s: float
    redis_cpu_s: float
    wrk_cpu_s: float
    other_cpu_s: float
    script_calls: int  # EVAL and EVALSHA during the run: Redis's cost per order falls with orders per call

    @property
    def server_us(self) -> float:
        """CPU us of the server's process group per delivered order."""
        return 1e6 * self.server_cpu_s / max(self.delivered, 1)

    @property
    def redis_us(self) -> float:
        """CPU us of the Redis process per delivered order."""
        return 1e6 * self.redis_cpu_s / max(self.delivered, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int | None, children: bool = True) -> float:
    """user + system CPU time of *pid* (every thread) and, with *children*, of its
    reaped children (0 if unknown)."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15 if children else 13]) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle by the whole machine since boot (all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def group_cpu_seconds(pgid: int) -> float:
    """CPU time of every live process in process group *pgid*."""
    total = 0.0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                total += cpu_seconds(int(name))
    return total


async def seed(url: str, data_dir: str, codes: int) -> str:
    """A SKU with *codes* codes, a supplier, a funded distributor; its API key."""
    cfg = Config(redis_url=url, data_dir=data_dir, master_key=MASTER_KEY)
    async with Engine(cfg, sweep=False) as e:
        await e.create_supplier("sup", "Supplier")
        await e.create_sku(SKU, "Bench SKU", 100, "CNY", 100)
        blob = b"".join(b"BENCH%011d\n" % i for i in range(codes))
        rep = await e.import_codes(blob, sku=SKU, supplier="sup", unit_cost=50)
        assert rep.accepted == codes, rep
        new = await e.create_distributor("bench", "Bench")
        await e.topup("bench", 10**15, "seed")
        return new.api_key


def start(cmd: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process group, SIGKILL it after 15 s."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # anything left in the group (a worker whose parent died first)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_ready(proc: subprocess.Popen[bytes], port: int, path: str, log_path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            status = c.getresponse().status
            c.close()
            if status < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{open(log_path).read()[-3000:]}")


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert m, text
    return float(m[1]) * _UNIT[m[2]]


def wrk(wrk_bin: str, port: int, api_key: str, seconds: int, connections: int, threads: int) -> tuple[str, list[str]]:
    cmd = [wrk_bin, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", LUA,
           f"http://127.0.0.1:{port}", "--", api_key, SKU, "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if res.returncode != 0:
        raise RuntimeError(f"wrk failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout, cmd


def parse(out: str) -> tuple[float, dict[int, int], float, float, float, str]:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", out)
    seconds = _ms(m[2] + m[3]) / 1000
    statuses = {int(s): int(c) for s, c in re.findall(r"\s(\d{3}): (\d+)", out.split("answers by status:", 1)[1]
                                                                   .split("\n", 1)[0])}
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M)[1])
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M)[1])
    errors = re.search(r"Socket errors:.*|Non-2xx or 3xx responses:.*", out)
    return rps, statuses, p50, p99, seconds, errors[0] if errors else ""


def script_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("eval", "evalsha"))


def server_env(redis_url: str, data_dir: str, port: int, **settings: str) -> dict[str, str]:
    """The environment a server runs in: this one, with the seeded Redis, keys and port (and
    DISPATCH_ *settings*), no config file."""
    env = dict(os.environ, DISPATCH_REDIS_URL=redis_url, DISPATCH_DATA_DIR=data_dir, DISPATCH_MASTER_KEY=MASTER_KEY,
               DISPATCH_ADMIN_TOKEN=ADMIN_TOKEN, DISPATCH_ACCESS_LOG="false", DISPATCH_HOST="127.0.0.1",
               DISPATCH_PORT=str(port), DISPATCH_WORKERS="1", **{f"DISPATCH_{k.upper()}": v for k, v in settings.items()})
    env.pop("DISPATCH_CONFIG", None)
    return env


def serve_cmd(port: int) -> list[str]:
    """``dispatch serve``, one worker, on *port*."""
    return [sys.executable, "-m", "dispatch", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


def run_one(name: str, server: EmbeddedRedis, tmp: str, args: argparse.Namespace) -> Figures:
    r = redis.Redis.from_url(server.url)
    r.flushall()
    t = time.perf_counter()
    api_key = asyncio.run(seed(server.url, tmp, args.codes))
    print(f"  [{name}] seeded {args.codes:,} codes in {time.perf_counter() - t:.1f} s", flush=True)
    port = free_port()
    env = server_env(server.url, tmp, port)
    if name == "dispatch serve":
        cmd = serve_cmd(port)
        ready = "/readyz"
    else:
        loop = "uvloop" if _has("uvloop") else "asyncio"
        http_impl = "httptools" if _has("httptools") else "h11"
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", HERE, "fastapi_app:app", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--loop", loop, "--http", http_impl,
               "--no-access-log", "--log-level", "warning"]
        ready = "/openapi.json"
    log_path = os.path.join(tmp, f"{name.split()[0]}.log")
    proc = None
    try:
        proc = start(cmd, env, log_path)
        wait_ready(proc, port, ready, log_path)
        if args.warmup:
            wrk(args.wrk, port, api_key, args.warmup, args.connections, args.threads)
        cpu0, rcpu0 = group_cpu_seconds(proc.pid), cpu_seconds(server.pid, children=False)
        wcpu0, busy0, calls0 = children_cpu_seconds(), machine_busy_seconds(), script_calls(r)
        out, cmd_run = wrk(args.wrk, port, api_key, args.duration, args.connections, args.threads)
        wcpu1, busy1, calls1 = children_cpu_seconds(), machine_busy_seconds(), script_calls(r)
        cpu1, rcpu1 = group_cpu_seconds(proc.pid), cpu_seconds(server.pid, children=False)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} died during the run:\n{open(log_path).read()[-3000:]}")
    finally:
        stop(proc)
    if args.verbose:
        print(out)
    rps, statuses, p50, p99, seconds, errors = parse(out)
    delivered = statuses.get(201, 0)
    print(f"  [{name}] {' '.join(os.path.relpath(c, ROOT) if c == LUA else c for c in cmd_run[:-4])} -- KEY {SKU} 1",
          flush=True)
    print(f"  [{name}] {rps:,.0f} requests/s, statuses {statuses}, p50 {p50:.2f} ms, p99 {p99:.2f} ms"
          f"{', ' + errors if errors else ''}", flush=True)
    return Figures(rps, delivered / seconds, delivered, statuses, p50, p99, seconds, errors,
                   cpu1 - cpu0, rcpu1 - rcpu0, wcpu1 - wcpu0,
                   max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - (rcpu1 - rcpu0) - (wcpu1 - wcpu0)), calls1 - calls0)


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=1_000_000, help="codes in stock for each server's run")
    ap.add_argument("--duration", type=int, default=10, help="seconds of the measured wrk run")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of wrk warm-up before it (0: none)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    ap.add_argument("--only", choices=["dispatch", "fastapi"], help="run one server")
    ap.add_argument("-v", "--verbose", action="store_true", help="print wrk's own output")
    args = ap.parse_args()
    if not _has("fastapi") and args.only != "dispatch":
        sys.exit("fastapi is not installed: .venv/bin/pip install -e '.[bench]'")

    results: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory(prefix="dispatch-http-bench-") as tmp, \
            EmbeddedRedis(os.path.join(tmp, "r"), appendfsync="always") as server:
        print(f"redis {server.version} embedded (malloc {server.allocator}, appendfsync always, unix socket); {os.cpu_count()} cores shared "
              f"by wrk, the server and Redis; wrk -t{args.threads} -c{args.connections} -d{args.duration}s "
              f"(after a {args.warmup} s warm-up), one server worker\n", flush=True)
        for name in ("dispatch serve", "fastapi + uvicorn"):
            if args.only and not name.startswith(args.only):
                continue
            results[name] = run_one(name, server, tmp, args)

    print()
    print(f"{'server':18} {'delivered/s':>11} {'requests/s':>10} {'p50 ms':>6} {'p99 ms':>6} "
          f"{'server us':>9} {'redis us':>8}  {'server%':>7} {'redis%':>6} {'wrk%':>5} {'other%':>6} "
          f"{'orders/call':>11}")
    for name, f in results.items():
        print(f"{name:18} {f.delivered_s:>11,.0f} {f.requests_s:>10,.0f} {f.p50_ms:>6.2f} {f.p99_ms:>6.2f} "
              f"{f.server_us:>9,.1f} {f.redis_us:>8,.1f}  "
              f"{f.server_cpu_s / f.seconds:>7.0%} {f.redis_cpu_s / f.seconds:>6.0%} "
              f"{f.wrk_cpu_s / f.seconds:>5.0%} {f.other_cpu_s / f.seconds:>6.0%} "
              f"{f.delivered / max(f.script_calls, 1):>11.2f}")
    if len(results) == 2:
        a, b = results["dispatch serve"], results["fastapi + uvicorn"]
        ratio = [getattr(a, c) / max(getattr(b, c), 1e-9)
                 for c in ("delivered_s", "requests_s", "p50_ms", "p99_ms", "server_us", "redis_us")]
        print(f"{'ratio':18} {ratio[0]:>10.2f}x {ratio[1]:>9.2f}x {ratio[2]:>5.2f}x {ratio[3]:>5.2f}x "
              f"{ratio[4]:>8.2f}x {ratio[5]:>7.2f}x")
    print("\nserver us, redis us: CPU (user + system, from /proc) per delivered order of the server's process\n"
          "group and of the Redis process; server% ... other%: their share of one core during the measured\n"
          f"run, of {os.cpu_count()} cores in all (other: the rest of the machine, kernel included);\n"
          "orders/call: delivered orders per script call (EVAL, EVALSHA) Redis ran during the run")
    if any(f.other_cpu_s / f.seconds > 0.25 for f in results.values()):
        print("other% is above 25%: the host was busy during the run; read the CPU per order and the ratios")


if __name__ == "__main__":
    main()
