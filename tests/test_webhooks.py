"""Webhooks against a real redis-server and real local HTTP receivers: retries with
backoff, signatures, isolation between distributors, no duplicate jobs, failed
deliveries and replay, timeouts; and the engine's own events end to end."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest
import pytest_asyncio

from dispatch import errors
from dispatch.engine import Engine
from dispatch.store import keys
from dispatch.store.keys import events_key
from dispatch.webhooks import Webhooks, verify_signature

from .conftest import codes_text, dump

FAST = dict(backoff_base_s=0.05, backoff_cap_s=0.2, poll_interval_s=0.01)


class Request:
    def __init__(self, headers: dict[str, str], body: bytes) -> None:
        self.headers, self.body, self.at = headers, body, time.monotonic()
        self.status = 0

    @property
    def json(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """A real HTTP/1.1 server on a free port; ``respond(request)`` gives each status."""

    def __init__(self, respond: Callable[[Request], Awaitable[int]]) -> None:
        self.respond = respond
        self.requests: list[Request] = []
        self.release = asyncio.Event()  # ends the handlers that hang
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.overlaps = 0
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> Receiver:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d/hook" % self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.release.set()
        self.server.close()
        await asyncio.gather(*self.handlers)
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
            req = Request(headers, await reader.readexactly(int(headers.get("content-length", "0"))))
            self.requests.append(req)
            jid = headers.get("x-dispatch-delivery", "")
            self.in_flight[jid] += 1
            self.overlaps += self.in_flight[jid] > 1
            try:
                req.status = await self.respond(req)
            finally:
                self.in_flight[jid] -= 1
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % req.status)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    def ok(self) -> list[Request]:
        return [r for r in self.requests if 200 <= r.status < 300]

    async def hang(self, _: Request) -> int:
        await self.release.wait()
        return 200


def status(*codes: int) -> Callable[[Request], Awaitable[int]]:
    """Answer the first requests with *codes*, then 200."""
    left = list(codes)

    async def respond(_: Request) -> int:
        return left.pop(0) if left else 200
    return respond


@pytest_asyncio.fixture
async def receivers() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    started: list[Receiver] = []

    async def start(respond: Callable[[Request], Awaitable[int]] = status()) -> Receiver:
        started.append(await Receiver(respond).start())
        return started[-1]
    yield start
    for r in started:
        await r.close()


@pytest_asyncio.fixture
async def hooks(engine: Engine) -> AsyncIterator[Callable[..., Webhooks]]:
    made: list[Webhooks] = []

    def make(**tunables: object) -> Webhooks:
        made.append(Webhooks(engine.store, engine.vault, **{**FAST, **tunables}))  # type: ignore[arg-type]
        return made[-1]
    await engine.store.client.sadd(keys.DISTS, "acme", "beta")
    await engine.store.client.sadd(keys.SKUS, "g100")
    await engine.store.client.sadd(keys.SUPPLIERS, "sup")
    yield make
    for w in made:
        await w.aclose()


async def emit(engine: Engine, kind: str, id_: str, type_: str, entity: str, v: int = 1, **data: object) -> str:
    fields = {"type": type_, "entity": entity, "v": str(v), "at": str(int(time.time() * 1000)),
              "data": msgspec.msgpack.encode(data)}
    return (await engine.store.client.xadd(events_key(kind, id_), fields)).decode()


async def until(cond: Callable[[], bool], *workers: Webhooks, deadline_s: float = 10.0) -> None:
    """Run delivery passes until *cond* holds (or fail after a generous deadline)."""
    end = time.monotonic() + deadline_s
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        for w in workers:
            await w.pump()
            await w.deliver_due()
        await asyncio.sleep(0.01)


async def settle(*workers: Webhooks, s: float = 0.3) -> None:
    end = time.monotonic() + s
    while time.monotonic() < end:
        for w in workers:
            await w.pump()
            await w.deliver_due()
        await asyncio.sleep(0.01)


# ---- 1. retries with backoff, then exactly one success ------------------------------------

async def test_retries_with_backoff_until_accepted(engine: Engine, hooks, receivers) -> None:
    rx = await receivers(status(500, 500))
    wh = hooks()
    secret = await wh.set_target("acme", rx.url)
    entry = await emit(engine, "dist", "acme", "order.delivered", "order:01J", v=3, order_id="01J", qty=2)
    stop = asyncio.Event()
    task = asyncio.create_task(wh.run(stop))
    try:
        await until(lambda: bool(rx.ok()))
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert [r.status for r in rx.requests] == [500, 500, 200]
    first, second, done = rx.requests
    assert len({r.headers["x-dispatch-delivery"] for r in rx.requests}) == 1
    assert first.body == second.body == done.body  # every attempt sends the same event
    assert second.at - first.at >= 0.035 and done.at - second.at >= 0.075  # 0.05 s, then 0.1 s, +-20%
    assert verify_signature(secret, done.headers["x-dispatch-signature"], done.body)
    assert not verify_signature(secret, done.headers["x-dispatch-signature"], done.body + b" ")
    assert not verify_signature(secret, done.headers["x-dispatch-signature"], done.body, now=time.time() + 301)
    assert done.headers["content-type"] == "application/json"
    assert done.headers["x-dispatch-event"] == "order.delivered"
    assert done.headers["x-dispatch-delivery"] == f"dist:acme:a:acme:{entry}"
    body = done.json
    assert body["id"] == f"a:acme:{entry}" and body["type"] == "order.delivered"
    assert (body["entity"], body["version"], body["data"]) == ("order:01J", 3, {"order_id": "01J", "qty": 2})
    assert body["at"].endswith("Z")
    await settle(wh)
    assert len(rx.requests) == 3
    c = engine.store.client
    assert await c.hlen(keys.WEBHOOK_JOBS) == 0 and await c.zcard(keys.WEBHOOK_DUE) == 0 and await c.zcard(keys.WEBHOOK_FAILED) == 0


# ---- 2. each distributor sees only its own events; the admin sees all -----------------------

async def test_distributor_isolation_and_admin_sees_everything(engine: Engine, hooks, receivers) -> None:
    wh = hooks()
    early = await emit(engine, "dist", "acme", "order.delivered", "order:early")
    assert await wh.pump() == 0  # nobody registered: skipped for good, without being read
    assert await engine.store.client.hget(keys.WEBHOOK_CURSOR, events_key("dist", "acme")) == early.encode()
    rx_a, rx_b, rx_admin = await receivers(), await receivers(), await receivers()
    sec_a = await wh.set_target("acme", rx_a.url)
    sec_b = await wh.set_target("beta", rx_b.url)
    sec_admin = await wh.set_target(None, rx_admin.url)
    sent = [await emit(engine, "dist", "acme", "order.delivered", "order:a1"),
            await emit(engine, "dist", "acme", "ticket.opened", "ticket:t1"),
            await emit(engine, "dist", "beta", "order.cancelled", "order:b1"),
            await emit(engine, "sku", "g100", "stock.low", "stock:g100", available=2),
            await emit(engine, "supplier", "sup", "supplier.blacklisted", "supplier:sup")]
    await until(lambda: len(rx_admin.ok()) == 5 and len(rx_a.ok()) == 2 and len(rx_b.ok()) == 1, wh)
    await settle(wh)
    ids = lambda rx: sorted(r.json["id"] for r in rx.requests)  # noqa: E731
    assert ids(rx_a) == sorted(f"a:acme:{e}" for e in sent[:2])
    assert ids(rx_b) == [f"a:beta:{sent[2]}"]
    assert ids(rx_admin) == sorted([f"a:acme:{sent[0]}", f"a:acme:{sent[1]}", f"a:beta:{sent[2]}",
                                    f"s:g100:{sent[3]}", f"p:sup:{sent[4]}"])
    assert "order:early" not in b"".join(r.body for r in rx_admin.requests + rx_a.requests).decode()
    for rx, own in ((rx_a, sec_a), (rx_b, sec_b), (rx_admin, sec_admin)):
        for r in rx.requests:
            sig = r.headers["x-dispatch-signature"]
            assert [verify_signature(s, sig, r.body) for s in (sec_a, sec_b, sec_admin)] == \
                [s == own for s in (sec_a, sec_b, sec_admin)]


# ---- 3. no duplicate jobs, no job sent twice at once --------------------------------------

async def test_repump_never_duplicates_and_workers_never_overlap(engine: Engine, hooks, receivers) -> None:
    async def slow(_: Request) -> int:
        await asyncio.sleep(0.05)
        return 200
    rx = await receivers(slow)
    w1, w2 = hooks(batch=4, concurrency=2), hooks(batch=4, concurrency=2)
    await w1.set_target(None, rx.url)
    entries = [await emit(engine, "sku", "g100", "stock.low", "stock:g100", v=i) for i in range(20)]
    c, stream = engine.store.client, events_key("sku", "g100")
    assert await w1.pump() == 20 and await w1.pump() == 0
    assert await c.hlen(keys.WEBHOOK_JOBS) == 20
    assert await c.hget(keys.WEBHOOK_CURSOR, stream) == entries[-1].encode()
    await c.hdel(keys.WEBHOOK_CURSOR, stream)  # as if the cursor were lost: every entry is read again
    assert 20 <= sum(await asyncio.gather(w1.pump(), w2.pump())) <= 40  # both may read them again
    assert await c.hlen(keys.WEBHOOK_JOBS) == 20 and await c.zcard(keys.WEBHOOK_DUE) == 20
    # the script run again with an entry already consumed (a redis-py retry) adds nothing
    enqueue = [stream, entries[0], 0, entries[0], f"admin:s:g100:{entries[0]}", b"x"]
    assert await engine.store.run("webhook_enqueue", [keys.WEBHOOK_CURSOR, keys.WEBHOOK_JOBS, keys.WEBHOOK_DUE], enqueue) == 0
    await c.hdel(keys.WEBHOOK_CURSOR, stream)
    assert await engine.store.run("webhook_enqueue", [keys.WEBHOOK_CURSOR, keys.WEBHOOK_JOBS, keys.WEBHOOK_DUE], enqueue) == 0  # HSETNX
    assert await c.hget(keys.WEBHOOK_CURSOR, stream) == entries[0].encode()
    assert await w1.pump() == 19  # the cursor only moves forward
    assert await c.hlen(keys.WEBHOOK_JOBS) == 20

    end = time.monotonic() + 10
    while len(rx.requests) < 20:  # two workers, several passes at once
        assert time.monotonic() < end
        await asyncio.gather(w1.deliver_due(), w2.deliver_due(), w1.deliver_due(), w2.deliver_due())
    await settle(w1, w2)
    got = collections.Counter(r.json["id"] for r in rx.requests)
    assert got == collections.Counter(f"s:g100:{e}" for e in entries)  # each exactly once
    assert rx.overlaps == 0
    assert await c.hlen(keys.WEBHOOK_JOBS) == 0

    # a worker whose lease ran out (the job was claimed again) has its outcome dropped
    await emit(engine, "sku", "g100", "stock.out", "stock:g100")
    await w1.pump()
    run = engine.store.run
    [jid, _] = await run("webhook_claim", [keys.WEBHOOK_DUE, keys.WEBHOOK_JOBS], [2**42, 2**42 + 10, 5])
    [jid2, _] = await run("webhook_claim", [keys.WEBHOOK_DUE, keys.WEBHOOK_JOBS], [2**42 + 10, 2**42 + 20, 5])
    assert jid2 == jid
    assert await run("webhook_settle", [keys.WEBHOOK_JOBS, keys.WEBHOOK_DUE, keys.WEBHOOK_FAILED], [jid, 2**42 + 10, "done", b"", 0]) == 0
    assert await c.hexists(keys.WEBHOOK_JOBS, jid)
    assert await run("webhook_settle", [keys.WEBHOOK_JOBS, keys.WEBHOOK_DUE, keys.WEBHOOK_FAILED], [jid, 2**42 + 20, "done", b"", 0]) == 1
    assert not await c.hexists(keys.WEBHOOK_JOBS, jid) and await c.zcard(keys.WEBHOOK_DUE) == 0


# ---- 4. failed for good, visible, replayable ---------------------------------------------

async def test_failed_deliveries_are_listed_and_replayed(engine: Engine, hooks, receivers) -> None:
    broken = True

    async def respond(_: Request) -> int:
        return 503 if broken else 204
    rx = await receivers(respond)
    wh = hooks(max_attempts=3, backoff_base_s=0.01)
    await wh.set_target("acme", rx.url)
    entry = await emit(engine, "dist", "acme", "ticket.rejected", "ticket:t9", v=4)
    failed = []

    async def check() -> None:
        failed[:] = await wh.failed()
    end = time.monotonic() + 10
    while not failed:
        assert time.monotonic() < end
        await wh.pump()
        await wh.deliver_due()
        await check()
    [f] = failed
    assert (f.job_id, f.target, f.type, f.entity, f.version) == \
        (f"dist:acme:a:acme:{entry}", "dist:acme", "ticket.rejected", "ticket:t9", 4)
    assert (f.attempts, f.last_error) == (3, "HTTP 503")
    assert abs(f.failed_at.timestamp() - time.time()) < 60
    await settle(wh)
    assert len(rx.requests) == 3 and await engine.store.client.zcard(keys.WEBHOOK_DUE) == 0

    broken = False
    assert await wh.replay(f.job_id) is True
    await until(lambda: bool(rx.ok()), wh)
    assert await wh.failed() == [] and await engine.store.client.hlen(keys.WEBHOOK_JOBS) == 0
    with pytest.raises(errors.NotFoundError):
        await wh.replay(f.job_id)  # delivered: gone
    with pytest.raises(errors.NotFoundError):
        await wh.replay("dist:acme:a:acme:0-1")

    # nobody listening (connection refused) and a removed target; then replay_all
    await rx.close()
    await emit(engine, "dist", "acme", "order.expired", "order:x1")
    await wh.set_target(None, rx.url)
    await emit(engine, "sku", "g100", "stock.out", "stock:g100")
    await wh.pump()
    assert await wh.remove_target(None) is True
    end = time.monotonic() + 10
    while len(await wh.failed()) < 3:
        assert time.monotonic() < end
        await wh.deliver_due()
        await asyncio.sleep(0.01)
    errs = sorted(f.last_error.split(":")[0] for f in await wh.failed())
    assert errs == ["ConnectError", "target removed", "target removed"]
    rx2 = await receivers()
    await wh.set_target("acme", rx2.url)
    await wh.set_target(None, rx2.url)
    assert await wh.replay_all() == 3
    await until(lambda: len(rx2.ok()) == 3, wh)
    assert await wh.failed() == []


# ---- 5. targets: validation, secrets ------------------------------------------------------

async def test_targets_validation_and_secrets(engine: Engine, hooks, receivers) -> None:
    wh = hooks()
    bad = {"ftp://example.com/x": "http:// or https://", "example.com/hook": "http:// or https://",
           "http://": "no host", "https:///path": "no host", "http://exa mple.com/": "spaces",
           "http://x.test:99999/": "port", "https://x.test/" + "a" * 2040: "2048", "": "empty"}
    for url, why in bad.items():
        with pytest.raises(errors.ValidationError, match=why):
            await wh.set_target(None, url)
    with pytest.raises(errors.ValidationError):
        await wh.set_target("bad id!", "https://x.test/")
    with pytest.raises(errors.NotFoundError):
        await wh.set_target("ghost", "https://x.test/")
    assert await wh.target(None) is None and await wh.remove_target(None) is False

    rx = await receivers()
    old = await wh.set_target(None, rx.url)
    new = await wh.set_target(None, rx.url)
    assert old != new and old.startswith("whsec_") and new.startswith("whsec_")
    t = await wh.target(None)
    assert t is not None and t.url == rx.url and t.distributor is None
    assert abs(t.created_at.timestamp() - time.time()) < 60
    assert new not in repr(t) and new not in repr(wh.__dict__)
    await emit(engine, "dist", "beta", "order.delivered", "order:b7")
    await until(lambda: bool(rx.ok()), wh)
    sig, body = rx.requests[0].headers["x-dispatch-signature"], rx.requests[0].body
    assert verify_signature(new, sig, body) and not verify_signature(old, sig, body)
    blob = dump(engine.config.redis_url)
    for s in (old, new):
        assert s.encode() not in blob and s[len("whsec_"):].encode() not in blob
    assert rx.url.encode() in blob  # the URL is stored plain
    assert await wh.remove_target(None) is True and await wh.target(None) is None


# ---- 6. a receiver that hangs ------------------------------------------------------------

async def test_timeout_counts_as_a_failed_attempt(engine: Engine, hooks, receivers) -> None:
    rx = await receivers()
    rx.respond = rx.hang
    wh = hooks(timeout_s=0.3, max_attempts=2, backoff_base_s=0.01)
    await wh.set_target("beta", rx.url)
    await emit(engine, "dist", "beta", "order.delivered", "order:slow")
    t0 = time.monotonic()
    end = t0 + 10
    while not await wh.failed():
        assert time.monotonic() < end
        await wh.pump()
        await wh.deliver_due()
    [f] = await wh.failed()
    assert f.attempts == 2 and f.last_error.startswith("TimeoutError")
    assert len(rx.requests) == 2 and time.monotonic() - t0 >= 0.55


# ---- 7. the engine's own events, end to end -------------------------------------------------

async def test_engine_events_end_to_end(shop: Engine, hooks, receivers) -> None:
    wh = hooks()
    rx_acme, rx_admin = await receivers(), await receivers()
    secret = await wh.set_target("acme", rx_acme.url)
    await wh.set_target(None, rx_admin.url)
    report = await shop.import_codes(codes_text("E2E", 5), sku="g100", supplier="sup", unit_cost=9000, batch_id="b1")
    assert report.accepted == 5
    mine = await shop.purchase("acme", "g100", 2, "e2e-1")  # 3 left: low stock (threshold 3)
    theirs = await shop.purchase("beta", "g100", 1, "e2e-2")
    await until(lambda: len(rx_acme.ok()) == 1 and len(rx_admin.ok()) == 4, wh)
    await settle(wh)
    [got] = rx_acme.requests
    assert verify_signature(secret, got.headers["x-dispatch-signature"], got.body)
    assert (got.json["type"], got.json["entity"]) == ("order.delivered", f"order:{mine.order_id}")
    assert got.json["data"]["order_id"] == mine.order_id and got.json["version"] >= 1
    assert sorted((r.json["type"], r.json["entity"]) for r in rx_admin.requests) == sorted([
        ("stock.restored", "stock:g100"), ("stock.low", "stock:g100"),
        ("order.delivered", f"order:{mine.order_id}"), ("order.delivered", f"order:{theirs.order_id}")])
    bodies = b"".join(r.body for r in rx_acme.requests + rx_admin.requests)
    assert not any(c.code.encode() in bodies for c in [*mine.codes, *theirs.codes])
