"""Where the load goes: a running daemon, or one started here (``--spawn``) on a
fresh embedded Redis in a temporary directory, and the seeding of a run's own
catalog, distributors and stock through the admin API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import msgspec

from .client import Pool
from .scenario import Scenario

__all__ = ["Spawned", "Seeded", "seed", "LoadtestError"]


class LoadtestError(Exception):
    """The load test could not run (not: the verification failed)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Spawned:
    """``python -m dispatch serve`` on a free port over a new embedded Redis in a temp dir."""

    def __init__(self, *, keep: bool = False, extra_env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dispatch-loadtest-"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = secrets.token_urlsafe(24)
        self.keep = keep
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
        env.update(DISPATCH_DATA_DIR=str(self.dir / "data"), DISPATCH_ADMIN_TOKEN=self.admin_token,
                   DISPATCH_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
                   DISPATCH_HOST="127.0.0.1", DISPATCH_PORT=str(self.port))
        env.update(extra_env or {})
        self.log = self.dir / "serve.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "dispatch", "serve"], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir,
                                         start_new_session=True)

    @property
    def redis_url(self) -> str:
        """The embedded Redis (for tests that reach under the API)."""
        return f"unix://{self.dir / 'data' / 'redis.sock'}"

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    async def ready(self, timeout: float = 60.0) -> None:
        pool = Pool(self.url, max_connections=1, timeout_s=2.0)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise LoadtestError(f"the daemon exited with {self.proc.returncode}:\n{self.logs()}")
                try:
                    if (await pool.request("GET", "/readyz"))[0] == 200:
                        return
                except ConnectionError:
                    pass
                await asyncio.sleep(0.1)
            raise LoadtestError(f"the daemon was not ready after {timeout:.0f} s:\n{self.logs()}")
        finally:
            await pool.close()

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # A daemon killed mid-shutdown may leave its embedded Redis running: stop it too
        # (SHUTDOWN NOSAVE in Redis's own protocol; the load tester imports no client).
        sock = self.dir / "data" / "redis.sock"
        if sock.exists():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(sock))
                s.sendall(b"*2\r\n$8\r\nSHUTDOWN\r\n$6\r\nNOSAVE\r\n")
                s.recv(64)
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class SeededSku:
    name: str          # the scenario's name for it
    sku: str           # its id in the store: the run's prefix + name
    index: int
    stock: int
    price: int
    weight: float


@dataclass
class Seeded:
    """What a run created: its SKUs (and every code it loaded), distributors and their keys."""

    run_id: str
    skus: list[SeededSku]
    distributors: list[str]
    keys: list[str]
    balance: int
    by_id: dict[str, SeededSku] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id = {s.sku: s for s in self.skus}

    def code(self, sku_index: int, i: int) -> str:
        return f"LT{self.run_id}-{sku_index}-{i}"

    def owns(self, sku: SeededSku, code: str) -> bool:
        """True if *code* is one this run loaded into *sku*."""
        head = f"LT{self.run_id}-{sku.index}-"
        if not code.startswith(head):
            return False
        tail = code[len(head):]
        return tail.isdigit() and int(tail) < sku.stock


class _Admin:
    def __init__(self, pool: Pool, token: str) -> None:
        self.pool, self.auth = pool, {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, target: str, body: object = None, *, raw: bytes | None = None,
                   ctype: str | None = None, ok: tuple[int, ...] = (200, 201)) -> dict:
        headers = dict(self.auth)
        data = raw
        if body is not None:
            data = msgspec.json.encode(body)
        status, reply = await self.pool.request(method, target, data, headers if ctype is None
                                                else {**headers, "Content-Type": ctype})
        if status not in ok:
            raise LoadtestError(f"{method} {target}: {status} {reply[:300].decode(errors='replace')}")
        return msgspec.json.decode(reply) if reply else {}


_BATCH = 100_000


async def seed(pool: Pool, admin_token: str, scenario: Scenario, *, run_id: str | None = None,
               parallel: int = 4) -> Seeded:
    """Create the scenario's SKUs (ids prefixed by the run id), load their codes, open and fund
    its distributors. Everything is new, so a run on a shared daemon sees only its own data."""
    run_id = run_id or secrets.token_hex(3)
    prefix = f"lt{run_id}-"
    admin = _Admin(pool, admin_token)
    supplier = f"{prefix}supplier"
    await admin.call("POST", "/admin/suppliers", {"supplier": supplier, "name": "loadtest"})
    specs = scenario.skus()
    skus = [SeededSku(s.sku, prefix + s.sku, i, s.stock, s.price, s.weight) for i, s in enumerate(specs)]
    for s in skus:
        if len(s.sku) > 64:
            raise LoadtestError(f"SKU id too long with the run prefix: {s.sku}")
    seeded_codes = Seeded(run_id, skus, [], [], scenario.balance)
    sem = asyncio.Semaphore(parallel)

    async def one(s: SeededSku) -> None:
        async with sem:
            await admin.call("POST", "/admin/skus", {"sku": s.sku, "name": s.name, "face_value": s.price,
                                                     "currency": "CNY", "price": s.price})
            for start in range(0, s.stock, _BATCH):
                n = min(_BATCH, s.stock - start)
                body = "".join(seeded_codes.code(s.index, i) + "\n" for i in range(start, start + n)).encode()
                target = (f"/admin/batches?sku={quote(s.sku)}&supplier={quote(supplier)}&unit_cost={s.price // 2}"
                          f"&batch_id={quote(f'{s.sku}-{start}')}")
                rep = await admin.call("POST", target, raw=body, ctype="text/plain")
                if rep.get("accepted") != n:
                    raise LoadtestError(f"seeding {s.sku}: {rep}")

    await asyncio.gather(*(one(s) for s in skus))
    for i in range(scenario.distributors):
        d = f"{prefix}d{i:03d}"
        new = await admin.call("POST", "/admin/distributors", {"distributor": d, "name": f"loadtest {i}"})
        await admin.call("POST", f"/admin/distributors/{d}/topup", {"amount": scenario.balance,
                                                                    "reference": f"{prefix}seed-{i}"})
        seeded_codes.distributors.append(d)
        seeded_codes.keys.append(new["api_key"])
    return seeded_codes
