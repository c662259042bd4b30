"""Webhooks: the event streams delivered over HTTP, at least once, signed.

Two kinds of target: one per distributor (the events of its own account stream) and
one admin target (every event of every stream). Delivery runs in two passes, each
safe to run in several workers at once:

- :meth:`Webhooks.pump` reads every stream after its cursor and turns each entry into
  one job per registered target; the jobs and the new cursor are written by one script
  (``webhook_enqueue``), and a job id is made from the target and the entry, so reading
  an entry twice never makes a second job.
- :meth:`Webhooks.deliver_due` claims due jobs under a lease (``webhook_claim``), POSTs
  them, and records each outcome only while its claim holds (``webhook_settle``): done,
  retry after an exponential backoff with jitter, or failed for good after
  ``max_attempts``, to be looked at with :meth:`Webhooks.failed` and replayed.

A delivery is signed like Stripe's: ``X-Dispatch-Signature: t=<unix s>,v1=<hex
HMAC-SHA256(secret, "<t>." + body)>``; receivers check it with :func:`verify_signature`
and drop an event whose ``version`` is not newer than the one they hold. Secrets are
stored encrypted by the vault and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import re
import secrets
import time
from datetime import datetime
from urllib.parse import urlsplit

import httpx
import msgspec

from .errors import NotFoundError, StoreUnavailableError, ValidationError
from .records import decode_event, ms_to_dt
from .store import keys
from .store.store import Store, translated
from .vault import Vault

__all__ = ["Webhooks", "WebhookTarget", "FailedDelivery", "verify_signature"]

log = logging.getLogger("dispatch.webhooks")

MAX_URL = 2048
_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class _Model(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    pass


class WebhookTarget(_Model):
    """A registered webhook (its secret is shown once, by :meth:`Webhooks.set_target`)."""

    distributor: str | None
    url: str
    created_at: datetime


class FailedDelivery(_Model):
    job_id: str
    target: str
    type: str
    entity: str
    version: int
    attempts: int
    last_error: str
    failed_at: datetime


class _Target(msgspec.Struct, array_like=True):
    url: str
    secret: bytes               # vault ciphertext, AAD b"webhook:" + target name
    created: int


class _Job(msgspec.Struct, array_like=True):
    target: str
    event: str                  # the event id: "<shard>:<entry id>"
    type: str
    entity: str
    version: int
    body: bytes                 # made once, so every attempt sends the same bytes
    created: int
    attempts: int = 0
    last_error: str = ""
    next_at: int = 0


_enc = msgspec.msgpack.Encoder()
_dec_job = msgspec.msgpack.Decoder(_Job)
_dec_target = msgspec.msgpack.Decoder(_Target)
_json = msgspec.json.Encoder()


def _ms() -> int:
    return time.time_ns() // 1_000_000


def _name(distributor: str | None) -> str:
    if distributor is None:
        return "admin"
    if not _ID.match(distributor):
        raise ValidationError("distributor must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return "dist:" + distributor


def _check_url(url: str) -> None:
    if not url:
        raise ValidationError("webhook url is empty")
    if len(url) > MAX_URL:
        raise ValidationError(f"webhook url is {len(url)} characters long, over the limit of {MAX_URL}")
    if any(c <= " " or c == "\x7f" for c in url):
        raise ValidationError("webhook url must not contain spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValidationError(f"webhook url must start with http:// or https://, not {parts.scheme or 'no scheme'!r}")
    if not parts.hostname:
        raise ValidationError("webhook url has no host")
    try:
        parts.port
    except ValueError:
        raise ValidationError("webhook url has an invalid port") from None


def _sign(secret: bytes, t: int, body: bytes) -> str:
    return hmac.new(secret, b"%d." % t + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, header: str, body: bytes, *, tolerance_s: float = 300,
                     now: float | None = None) -> bool:
    """True when *header* (``X-Dispatch-Signature``) signs *body* with *secret* and its
    timestamp is within *tolerance_s* of *now* (default: the clock), which stops replays."""
    t, sigs = None, []
    for part in header.split(","):
        k, _, v = part.strip().partition("=")
        if k == "t" and v.isdigit():
            t = int(v)
        elif k == "v1":
            sigs.append(v)
    if t is None or abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = _sign(secret.encode(), t, body)
    return any(hmac.compare_digest(expected, s) for s in sigs)


class Webhooks:
    """Registration and at-least-once delivery of webhooks; see the module docstring."""

    def __init__(self, store: Store, vault: Vault, *, timeout_s: float = 5.0, max_attempts: int = 8,
                 backoff_base_s: float = 5.0, backoff_cap_s: float = 3600.0, concurrency: int = 16,
                 batch: int = 64, read_count: int = 500, poll_interval_s: float = 0.2) -> None:
        self._store = store
        self._vault = vault
        self.timeout_s, self.max_attempts = timeout_s, max_attempts
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self.batch, self.read_count, self.poll_interval_s = batch, read_count, poll_interval_s
        # A claim outlives every send of its pass: batch / concurrency rounds of timeout_s.
        self.lease_ms = int(((batch + concurrency - 1) // concurrency + 1) * timeout_s * 1000) + 10_000
        self._slots = asyncio.Semaphore(concurrency)
        self._http = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency), timeout=timeout_s,
                                       headers={"User-Agent": "card-dispatch-webhooks"})

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- targets -----------------------------------------------------------------
    async def set_target(self, distributor: str | None, url: str) -> str:
        """Register (or replace) the webhook of *distributor* (None: the admin webhook).
        Returns its new signing secret, shown only now; the old one stops working."""
        name = _name(distributor)
        _check_url(url)
        c = self._store.client
        secret = "whsec_" + secrets.token_urlsafe(32)
        sealed = self._vault.encrypt(secret.encode(), aad=b"webhook:" + name.encode())
        with translated():
            if distributor is not None and not await c.sismember(keys.DISTS, distributor):
                raise NotFoundError(f"no distributor {distributor!r}")
            await c.hset(keys.WEBHOOK_TARGETS, name, _enc.encode(_Target(url, sealed, _ms())))
        return secret

    async def remove_target(self, distributor: str | None) -> bool:
        """Unregister; its undelivered jobs fail for good ("target removed"). False if none."""
        with translated():
            return bool(await self._store.client.hdel(keys.WEBHOOK_TARGETS, _name(distributor)))

    async def target(self, distributor: str | None) -> WebhookTarget | None:
        with translated():
            raw = await self._store.client.hget(keys.WEBHOOK_TARGETS, _name(distributor))
        t = _dec_target.decode(raw) if raw is not None else None
        return WebhookTarget(distributor, t.url, ms_to_dt(t.created)) if t else None

    # ---- streams -> jobs ------------------------------------------------------------
    async def pump(self) -> int:
        """One pass: read up to ``read_count`` new entries of every stream some registered
        target listens to and make them its jobs; the cursor of a stream nobody listens
        to just moves to its end. Returns the number of entries made into jobs."""
        c = self._store.client
        with translated():
            async with c.pipeline(transaction=False) as p:
                p.smembers(keys.DISTS)
                p.smembers(keys.SKUS)
                p.smembers(keys.SUPPLIERS)
                p.hgetall(keys.WEBHOOK_CURSOR)
                p.hkeys(keys.WEBHOOK_TARGETS)
                dists, skus, sups, cursors, names = await p.execute()
            targets = {n.decode() for n in names}
            streams = [(kind, i.decode()) for kind, ids in (("dist", dists), ("sku", skus), ("supplier", sups))
                       for i in sorted(ids)]
            wanted = {(kind, i): (["admin"] if "admin" in targets else [])
                      + (["dist:" + i] if kind == "dist" and "dist:" + i in targets else [])
                      for kind, i in streams}
            async with c.pipeline(transaction=False) as p:
                for kind, i in streams:
                    key = keys.events_key(kind, i)
                    if wanted[kind, i]:
                        p.xread({key: cursors.get(key.encode(), b"0-0")}, count=self.read_count)
                    else:  # nobody listens: only move the cursor to the end, reading nothing
                        p.xrevrange(key, count=1)
                replies = await p.execute()
        now, calls, consumed = _ms(), [], 0
        for (kind, i), reply in zip(streams, replies):
            key = keys.events_key(kind, i).encode()
            if not wanted[kind, i]:
                if reply and reply[0][0] != cursors.get(key):
                    calls.append(([keys.WEBHOOK_CURSOR, keys.WEBHOOK_JOBS, keys.WEBHOOK_DUE], [key, reply[0][0], now], ()))
                continue
            if not reply:
                continue
            _, entries = reply[0]
            shard = key.decode()[len(keys.PREFIX) + 1:-len("}:events")]  # "a:acme"
            args: list[bytes | str | int] = [key, entries[-1][0], now]
            for entry_id, fields in entries:
                job = self._job(shard, entry_id.decode(), fields, now)
                for t in wanted[kind, i] if job else ():
                    jid = f"{t}:{job.event}"
                    args += [entry_id, jid, _enc.encode(msgspec.structs.replace(job, target=t))]
            calls.append(([keys.WEBHOOK_CURSOR, keys.WEBHOOK_JOBS, keys.WEBHOOK_DUE], args, ()))
            consumed += len(entries)
        if calls:
            await self._store._run_many("webhook_enqueue", calls)
        return consumed

    @staticmethod
    def _job(shard: str, entry_id: str, fields: dict[bytes, bytes], now: int) -> _Job | None:
        event = f"{shard}:{entry_id}"
        try:
            e = decode_event(entry_id, fields)
        except ValueError as exc:
            log.error("webhooks: event %s is skipped: %s", event, exc)
            return None
        body = _json.encode({"id": event, "type": e.type, "entity": e.entity, "version": e.version,
                             "at": e.at.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "data": e.data})
        return _Job("", event, e.type, e.entity, e.version, body, now)

    # ---- jobs -> HTTP -----------------------------------------------------------------
    async def deliver_due(self) -> int:
        """One pass: claim up to ``batch`` due jobs and send them, ``concurrency`` at a time.
        Returns the number of jobs sent (whatever their outcome)."""
        now = _ms()
        lease = now + self.lease_ms
        flat = await self._store._run("webhook_claim", [keys.WEBHOOK_DUE, keys.WEBHOOK_JOBS], [now, lease, self.batch])
        if not flat:
            return 0
        jobs = [(flat[k].decode(), _dec_job.decode(flat[k + 1])) for k in range(0, len(flat), 2)]
        names = sorted({j.target for _, j in jobs})
        with translated():
            raw = await self._store.client.hmget(keys.WEBHOOK_TARGETS, names)
        targets = {name: self._open(name, r) for name, r in zip(names, raw) if r is not None}
        sends = [self._send(jid, job, targets.get(job.target), lease) for jid, job in jobs]
        for r in await asyncio.gather(*sends, return_exceptions=True):
            if isinstance(r, BaseException):
                raise r  # a store failure: those jobs are sent again when their lease ends
        return len(jobs)

    def _open(self, name: str, raw: bytes) -> tuple[str, bytes]:
        t = _dec_target.decode(raw)
        return t.url, self._vault.decrypt(t.secret, aad=b"webhook:" + name.encode())

    async def _send(self, jid: str, job: _Job, target: tuple[str, bytes] | None, lease: int) -> None:
        error = "target removed"
        if target is not None:
            url, secret = target
            async with self._slots:
                t = int(time.time())  # signed when sent, not when queued
                headers = {"Content-Type": "application/json", "X-Dispatch-Event": job.type, "X-Dispatch-Delivery": jid,
                           "X-Dispatch-Signature": f"t={t},v1={_sign(secret, t, job.body)}"}
                try:
                    async with asyncio.timeout(self.timeout_s):  # the whole exchange, not each read
                        async with self._http.stream("POST", url, content=job.body, headers=headers) as r:
                            status = r.status_code
                    error = "" if 200 <= status < 300 else f"HTTP {status}"
                except (TimeoutError, httpx.TimeoutException):
                    error = f"TimeoutError: no answer within {self.timeout_s:g} s"
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"[:500]
        if not error:
            await self._store._run("webhook_settle", [keys.WEBHOOK_JOBS, keys.WEBHOOK_DUE, keys.WEBHOOK_FAILED], [jid, lease, "done", b"", 0])
            return
        now = _ms()
        job.attempts += 1
        job.last_error = error
        if target is None or job.attempts >= self.max_attempts:
            outcome, job.next_at = "failed", now
            log.warning("webhooks: delivery %s failed for good after %d attempts: %s", jid, job.attempts, error)
        else:
            delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (job.attempts - 1))
            outcome, job.next_at = "retry", now + int(delay * random.uniform(0.8, 1.2) * 1000)
            log.info("webhooks: delivery %s attempt %d failed (%s), retry in %.1f s",
                     jid, job.attempts, error, (job.next_at - now) / 1000)
        await self._store._run("webhook_settle", [keys.WEBHOOK_JOBS, keys.WEBHOOK_DUE, keys.WEBHOOK_FAILED], [jid, lease, outcome, _enc.encode(job),
                                                                       job.next_at])

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Pump and deliver until *stop* is set (or the task is cancelled), resting
        ``poll_interval_s`` whenever a round found nothing to do."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                busy = await self.pump() + await self.deliver_due()
            except Exception as e:  # Redis down, most likely: try again soon
                log.warning("webhooks: a round failed: %s", e, exc_info=not isinstance(e, StoreUnavailableError))
                busy = 0
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_interval_s)

    async def backlog(self) -> tuple[int, int]:
        """(deliveries waiting for a try, deliveries failed for good)."""
        with translated():
            async with self._store.client.pipeline(transaction=False) as p:
                p.zcard(keys.WEBHOOK_DUE)
                p.zcard(keys.WEBHOOK_FAILED)
                due, failed = await p.execute()
        return due, failed

    # ---- failed deliveries --------------------------------------------------------------
    async def failed(self, limit: int = 100) -> list[FailedDelivery]:
        """Deliveries that failed for good, the most recent first."""
        c = self._store.client
        with translated():
            pairs = await c.zrevrange(keys.WEBHOOK_FAILED, 0, limit - 1, withscores=True) if limit > 0 else []
            raw = await c.hmget(keys.WEBHOOK_JOBS, [jid for jid, _ in pairs]) if pairs else []
        out = []
        for (jid, at), r in zip(pairs, raw):
            if r is not None:
                j = _dec_job.decode(r)
                out.append(FailedDelivery(jid.decode(), j.target, j.type, j.entity, j.version, j.attempts,
                                          j.last_error, ms_to_dt(at)))
        return out

    async def replay(self, job_id: str) -> bool:
        """Send a job (usually a failed one) again now, its attempts reset.
        NotFoundError if there is no such job (or it was delivered meanwhile)."""
        if not await self._replay([job_id]):
            raise NotFoundError(f"no webhook delivery {job_id!r}")
        return True

    async def replay_all(self) -> int:
        """:meth:`replay` every failed delivery; returns how many were put back."""
        with translated():
            ids = [i.decode() for i in await self._store.client.zrange(keys.WEBHOOK_FAILED, 0, -1)]
        return sum([await self._replay(ids[k:k + 500]) for k in range(0, len(ids), 500)])

    async def _replay(self, ids: list[str]) -> int:
        if not ids:
            return 0
        with translated():
            raw = await self._store.client.hmget(keys.WEBHOOK_JOBS, ids)
        now, calls = _ms(), []
        for jid, r in zip(ids, raw):
            if r is not None:
                job = msgspec.structs.replace(_dec_job.decode(r), attempts=0, next_at=now)
                calls.append(([keys.WEBHOOK_JOBS, keys.WEBHOOK_DUE, keys.WEBHOOK_FAILED], [jid, _enc.encode(job), now], ()))
        return sum(await self._store._run_many("webhook_replay", calls)) if calls else 0
