"""Volume tiers in Redis: the tier rules ({g}), each account's spend by day and the
script that decides its tier (tier_apply.lua, on the account's shard)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from ..models import TierRules
from . import keys
from .replies import refusal, translated

if TYPE_CHECKING:
    from .store import Store

__all__ = ["TierStore", "Decided"]

_decode_rules = msgspec.msgpack.Decoder(TierRules).decode


class Decided(NamedTuple):
    """What tier_apply.lua answered."""

    status: str  # changed | same | stale (for read: what apply would answer)
    before: str | None
    after: str | None
    spend: int
    this_month: int
    day: int
    pinned: bool


class TierStore:
    def __init__(self, db: Store) -> None:
        self._db = db

    async def rules(self) -> TierRules:
        """The tier rules with their version (none set: no rules, version 0)."""
        with translated():
            version, raw = await self._db.client.hmget(keys.TIER_RULES, ["v", "rules"])
        rules = _decode_rules(raw) if raw else TierRules()
        rules.version = int(version or 0)
        return rules

    async def set_rules(self, rules: TierRules) -> int:
        """Store *rules* under the next version; that version."""
        return int(await self._db.run("tier_rules", [keys.TIER_RULES], [msgspec.msgpack.encode(rules)]))

    async def decide(self, dist: str, action: str, rules: TierRules, pin: str | None = None) -> Decided:
        """Run tier_apply.lua for *dist* (read, apply, pin, unpin) under *rules*."""
        args: list[Any] = [dist, action, pin or "", rules.version, rules.window, len(rules.rules)]
        for r in rules.rules:
            args += [r.min_spend, r.tier]
        reply = await self._db.run("tier_apply", [keys.AcctKeys(dist).acct, keys.spend_days(dist),
                                                  keys.AcctKeys(dist).events], args)
        if len(reply) == 1:
            raise refusal("tier_apply", reply[0], dist=dist)
        status, before, after, spend, this_month, day, pinned = reply
        return Decided(status.decode(), before.decode() or None, after.decode() or None, int(spend),
                       int(this_month), int(day), pinned == b"1")

    async def due(self, dists: Sequence[str]) -> list[tuple[bool, int, int]]:
        """Per distributor: (flagged by a purchase, day last decided (-1: never), rules
        version last decided by), in one pipelined round."""
        with translated():
            async with self._db.client.pipeline(transaction=False) as p:
                for d in dists:
                    p.hmget(keys.AcctKeys(d).acct, ["tdue", "tday", "trv"])
                rows = await p.execute()
        return [(flag == b"1", int(day) if day is not None else -1, int(rv or 0)) for flag, day, rv in rows]

    async def spend_days(self, dist: str) -> dict[int, int]:
        """The account's spend by day (days since 1970-01-01, UTC)."""
        with translated():
            raw = await self._db.client.hgetall(keys.spend_days(dist))
        return {int(d): int(v) for d, v in raw.items()}
