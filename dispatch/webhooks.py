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

import httpx
import msgspec

from .errors import NotFoundError, StoreUnavailableError, ValidationError
from .records import decode_events, ms_to_dt
from .store import Store
from .store.webhooks import Job, StreamNews, Target
from .vault import Vault

__all__ = ["Webhooks", "WebhookTarget", "FailedDelivery", "verify_signature"]

log = logging.getLogger("dispatch.webhooks")

MAX_URL = 2048
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
#: What a webhook URL may be (the OpenAPI document says the same): http or https, an
#: optional user, a host (no IPv6 literal), an optional port, then anything printable.
URL_PATTERN = (r"^[Hh][Tt][Tt][Pp][Ss]?://([^\x00-\x20\x7f/?#@\[\]]*@)?[^\x00-\x20\x7f/?#@:\[\]]+"
               r"(:" + _PORT + r")?([/?#][^\x00-\x20\x7f]*)?$(?!\n)")
_SCHEME = re.compile(r"[Hh][Tt][Tt][Pp][Ss]?://")
_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class _Model(msgspec.Struct, forbid_unknown_fields=True):
    """Encoded with every field, nulls included."""


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
    if not _SCHEME.match(url):
        raise ValidationError("webhook url must start with http:// or https://")
    if not re.search(URL_PATTERN, url):
        raise ValidationError("webhook url has no host or an invalid port: it must be http(s)://host[:port]"
                              "[/path...], a host name or IPv4 address, a port up to 65535")


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
        self._store = store.webhooks
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
        secret = "whsec_" + secrets.token_urlsafe(32)
        sealed = self._vault.encrypt(secret.encode(), aad=b"webhook:" + name.encode())
        if not await self._store.set_target(name, distributor, Target(url, sealed, _ms())):
            raise NotFoundError(f"no distributor {distributor!r}")
        return secret

    async def remove_target(self, distributor: str | None) -> bool:
        """Unregister; its undelivered jobs fail for good ("target removed"). False if none."""
        return await self._store.remove_target(_name(distributor))

    async def target(self, distributor: str | None) -> WebhookTarget | None:
        t = (await self._store.targets([_name(distributor)])).get(_name(distributor))
        return WebhookTarget(distributor, t.url, ms_to_dt(t.created)) if t else None

    # ---- streams -> jobs ------------------------------------------------------------
    async def pump(self) -> int:
        """One pass: read up to ``read_count`` new entries of every stream some registered
        target listens to and make them its jobs; the cursor of a stream nobody listens
        to just moves to its end. Returns the number of entries made into jobs."""
        now = _ms()
        moves: list[tuple[StreamNews, list[tuple[str, Job]]]] = []
        for news in await self._store.news(self.read_count):
            jobs = []
            for entry_id, fields in news.entries:
                for job in self._jobs(news.shard, entry_id, fields, now):
                    jobs += [(entry_id, msgspec.structs.replace(job, target=t)) for t in news.listeners]
            moves.append((news, jobs))
        await self._store.enqueue(moves, now)
        return sum(len(news.entries) for news, _ in moves)

    @staticmethod
    def _jobs(shard: str, entry_id: str, fields: dict[bytes, bytes], now: int) -> list[Job]:
        try:
            events = decode_events(entry_id, fields)
        except ValueError as exc:
            log.error("webhooks: event %s:%s is skipped: %s", shard, entry_id, exc)
            return []
        jobs = []
        for e in events:
            event = f"{shard}:{e.event_id}"
            at = e.at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            body = _json.encode({"id": event, "type": e.type, "entity": e.entity, "version": e.version, "at": at,
                                 "data": e.data})
            jobs.append(Job("", event, e.type, e.entity, e.version, body, now))
        return jobs

    # ---- jobs -> HTTP -----------------------------------------------------------------
    async def deliver_due(self) -> int:
        """One pass: claim up to ``batch`` due jobs and send them, ``concurrency`` at a time.
        Returns the number of jobs sent (whatever their outcome)."""
        now = _ms()
        lease = now + self.lease_ms
        jobs = await self._store.claim(now, lease, self.batch)
        if not jobs:
            return 0
        targets = {name: self._open(name, t)
                   for name, t in (await self._store.targets(sorted({j.target for _, j in jobs}))).items()}
        sends = [self._send(jid, job, targets.get(job.target), lease) for jid, job in jobs]
        for r in await asyncio.gather(*sends, return_exceptions=True):
            if isinstance(r, BaseException):
                raise r  # a store failure: those jobs are sent again when their lease ends
        return len(jobs)

    def _open(self, name: str, t: Target) -> tuple[str, bytes]:
        return t.url, self._vault.decrypt(t.secret, aad=b"webhook:" + name.encode())

    async def _send(self, jid: str, job: Job, target: tuple[str, bytes] | None, lease: int) -> None:
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
            await self._store.settle(jid, lease, "done")
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
        await self._store.settle(jid, lease, outcome, job)

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
                    async with asyncio.timeout(self.poll_interval_s):
                        await stop.wait()

    async def backlog(self) -> tuple[int, int]:
        """(deliveries waiting for a try, deliveries failed for good)."""
        return await self._store.backlog()

    # ---- failed deliveries --------------------------------------------------------------
    async def failed(self, limit: int = 100) -> list[FailedDelivery]:
        """Deliveries that failed for good, the most recent first."""
        return [FailedDelivery(jid, j.target, j.type, j.entity, j.version, j.attempts, j.last_error, ms_to_dt(at))
                for jid, j, at in await self._store.failed(limit)]

    async def replay(self, job_id: str) -> bool:
        """Send a job (usually a failed one) again now, its attempts reset.
        NotFoundError if there is no such job (or it was delivered meanwhile)."""
        if not await self._store.replay([job_id], _ms()):
            raise NotFoundError(f"no webhook delivery {job_id!r}")
        return True

    async def replay_all(self) -> int:
        """:meth:`replay` every failed delivery; returns how many were put back."""
        ids = await self._store.failed_ids()
        return sum([await self._store.replay(ids[k:k + 500], _ms()) for k in range(0, len(ids), 500)])
