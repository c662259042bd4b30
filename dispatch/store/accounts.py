"""Distributor accounts in Redis: their record, API keys, top-ups, ledger, rate limits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from . import keys
from .replies import refusal, translated

if TYPE_CHECKING:
    from .store import Store

__all__ = ["AccountStore", "AccountRow", "LedgerRow"]

#: A ledger entry as stored (see _account.lua): kind, ref, amount, held delta, [balance, held,] ms.
LedgerRow = list[str]


class AccountRow(msgspec.Struct):
    """An account as its hash holds it; ``allowed`` is ``*`` or SKU ids joined by commas."""

    name: str
    tier: str
    credit_limit: int
    allowed: str
    status: str
    balance: int
    held: int
    rate_limit: int | None = None
    #: a sub-distributor's markup over its parent's price: per SKU (JSON: SKU -> minor
    #: units) where set, else in basis points
    markup_bps: int = 0
    markups: str = ""
    created: int = 0


class AccountStore:
    def __init__(self, db: Store) -> None:
        self._db = db

    async def create(self, dist: str, fields: dict[str, Any]) -> bool:
        """A new account with *fields*; False if it exists."""
        with translated():
            await self._db.client.sadd(keys.DISTS, dist)
        made = await self._db.put(keys.AcctKeys(dist).acct, "create", {**fields, keys.PIN: keys.PIN_VALUE}) == "ok"
        if made:
            await self._pin(dist)
        return made

    async def _pin(self, dist: str) -> None:
        """The account's codes and external_refs kept hash tables (keys.PIN), as its record is."""
        k = keys.AcctKeys(dist)
        with translated():
            async with self._db.client.pipeline(transaction=False) as p:
                p.hset(k.codes, keys.PIN, keys.PIN_VALUE)
                p.hset(k.refs, keys.REFS_PIN, keys.PIN_VALUE)
                await p.execute()

    async def add_child(self, parent: str, child: str) -> None:
        with translated():
            await self._db.client.sadd(keys.children(parent), child)

    async def children(self, parent: str) -> list[str]:
        """The ids of *parent*'s own sub-distributors, sorted."""
        return await self._db.members(keys.children(parent))

    async def transfer(self, parent: str, child: str, reference: str, amount: int) -> int:
        """Move *amount* of *parent*'s balance to *child*'s once per *reference*; the
        child's balance. NotFoundError, DistributorSuspendedError, InsufficientBalanceError,
        IdempotencyConflictError (the reference was used with another amount)."""
        reply = await self._db.run("transfer", [keys.AcctKeys(parent).acct, keys.AcctKeys(child).acct,
                                                keys.transfers(child)], [reference, amount, f"{child}/{reference}"])
        if reply[0] not in (b"ok", b"again"):
            raise refusal("transfer", reply[0], dist=parent, ref=reference, cost=amount,
                          available=int(reply[1]) if len(reply) > 1 else 0)
        return int(reply[1])

    async def update(self, dist: str, fields: dict[str, Any]) -> bool:
        """False if there is no such account. (An account made before keys.PIN gets it here.)"""
        found = await self._db.put(keys.AcctKeys(dist).acct, "update", {**fields, keys.PIN: keys.PIN_VALUE}) == "ok"
        if found:
            await self._pin(dist)
        return found

    async def fields(self, dist: str, names: list[str]) -> list[bytes | None]:
        """Fields *names* of the account's hash, as stored (None where absent)."""
        with translated():
            return await self._db.client.hmget(keys.AcctKeys(dist).acct, names)

    async def ids(self) -> list[str]:
        return await self._db.members(keys.DISTS)

    async def exists(self, dist: str) -> bool:
        with translated():
            return bool(await self._db.client.exists(keys.AcctKeys(dist).acct))

    async def get(self, dist: str) -> AccountRow | None:
        with translated():
            raw = await self._db.client.hgetall(keys.AcctKeys(dist).acct)
        if not raw:
            return None
        return msgspec.convert({k.decode(): v.decode() for k, v in raw.items() if k != keys.PIN_FIELD}, AccountRow,
                               strict=False)

    async def rate_limit(self, dist: str) -> int | None:
        """The account's own rate limit; None when it has none (or there is no account)."""
        with translated():
            value = await self._db.client.hget(keys.AcctKeys(dist).acct, "rate_limit")
        return None if value is None else int(value)

    async def set_api_key(self, dist: str, key_hash: str) -> None:
        """Make *key_hash* the distributor's only valid key (the old one stops working)."""
        await self._db.run("rotate_key", [keys.APIKEYS, keys.KEYOF], [dist, key_hash])

    async def by_key_hash(self, key_hash: str) -> str | None:
        with translated():
            d = await self._db.client.hget(keys.APIKEYS, key_hash)
        return d.decode() if d else None

    async def topup(self, dist: str, reference: str, amount: int) -> int:
        """Credit *amount* once per *reference*; the balance. NotFoundError,
        IdempotencyConflictError (the reference was used with another amount)."""
        reply = await self._db.run("topup", keys.AcctKeys(dist).all, [reference, amount])
        if reply[0] not in (b"ok", b"again"):
            raise refusal("topup", reply[0], dist=dist, ref=reference)
        return int(reply[1])

    async def ledger(self, dist: str, start: int = 0, stop: int = -1) -> list[LedgerRow]:
        """Entries *start*..*stop* (list indexes) of the account's ledger."""
        return await self._db.ledger(keys.AcctKeys(dist).ledger, start, stop)

    async def throttle(self, dist: str, rate: int, burst: int) -> tuple[bool, int]:
        """Take one request from the account's token bucket: (allowed, ms to wait if not)."""
        ok, wait_ms = await self._db.run("rate_limit", [keys.rate_bucket(dist)], [rate, burst])
        return bool(ok), int(wait_ms)

    async def remember_signature(self, dist: str, signature: str, ttl_s: int) -> bool:
        """True when *signature* was not seen within *ttl_s* (it is remembered now)."""
        with translated():
            return bool(await self._db.client.set(keys.seen_signature(dist, signature), b"1", nx=True, ex=ttl_s))
