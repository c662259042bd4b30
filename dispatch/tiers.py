"""Volume tiers: rules from spend to price tier, applied to distributors automatically.

What an account pays for purchases, net of refunds, is counted by UTC day by the
scripts that move its money (``count_spend``, ``lua/_limits.lua``): one HINCRBY per
script call. A distributor's tier is decided by one script on its shard
(``lua/tier_apply.lua``), which reads those counts, sets the tier and tells the change
(``distributor.tier_changed``) at once, comparing the tier it finds with the one it
decides, so however many workers and daemons decide at once a change is told once.

Decisions are made off the purchase path, by the sweep (:meth:`Tiers.sweep`) for the
accounts a purchase flagged (its day's count passed a mark the last decision left),
the ones not decided yet today (days leave the window at midnight) and the ones
decided under older rules; and at once when the rules change or a tier is pinned or
unpinned. A pinned distributor keeps the tier it was pinned to. Workers learn of a
new tier as they learn of any: their price cache lapses within ``catalog_ttl_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

import msgspec

from .catalog import Catalog
from .errors import ValidationError
from .models import TierRule, TierRules, TierStatus
from .records import check
from .store import Store
from .store.tiers import Decided

__all__ = ["Tiers"]

_EPOCH = date(1970, 1, 1)
#: Accounts decided at once by a sweep or a change of rules.
_CONCURRENCY = 64


def _today() -> int:
    return time.time_ns() // 86_400_000_000_000


def _window(window: str | None, day: int) -> tuple[date, date]:
    """The UTC days (inclusive) of the spend that sets a tier on *day*."""
    d = _EPOCH + timedelta(days=day)
    if window != "calendar_month":
        return d - timedelta(days=29), d
    end = d.replace(day=1) - timedelta(days=1)
    return end.replace(day=1), end


class Tiers:
    """Tier rules and the volume tier of each distributor."""

    def __init__(self, store: Store, catalog: Catalog) -> None:
        self._store = store
        self._catalog = catalog

    async def tier_rules(self) -> TierRules:
        """The tier rules (no rules: tiers are set by hand only)."""
        return await self._store.tiers.rules()

    async def set_tier_rules(self, window: str = "rolling_30d", rules: Sequence[Any] = ()) -> TierRules:
        """Replace the tier rules (*rules*: TierRule, or dicts of ``min_spend`` and
        ``tier``, ascending by ``min_spend``) and decide every distributor's tier under
        them at once. No rules: automatic tiers stop, tiers stay as they are."""
        given = [msgspec.to_builtins(r) if isinstance(r, msgspec.Struct) else r for r in rules]
        new = check(dict(window=window, rules=given), TierRules, "tier rules")
        known = {t.tier for t in await self._store.catalog.tiers()}
        seen: dict[str, int] = {}
        for i, r in enumerate(new.rules):
            if r.tier not in known:
                raise ValidationError(f"rules[{i}].tier: unknown tier {r.tier}")
            if r.tier in seen:
                raise ValidationError(f"rules[{i}].tier: {r.tier} is rules[{seen[r.tier]}]'s tier already")
            seen[r.tier] = i
            if i and r.min_spend <= new.rules[i - 1].min_spend:
                raise ValidationError(f"rules[{i}].min_spend {r.min_spend} must be above rules[{i - 1}].min_spend "
                                      f"{new.rules[i - 1].min_spend}: rules ascend")
        new.version = await self._store.tiers.set_rules(new)
        await self._decide_all(await self._store.accounts.ids(), "apply", new)
        return new

    async def tier_status(self, distributor: str) -> TierStatus:
        """*distributor*'s tier, whether it is pinned, its spend in the window and the
        next rule above it."""
        rules = await self._store.tiers.rules()
        got = await self._store.tiers.decide(distributor, "read", rules)
        return self._status(distributor, rules, got.before, got)

    async def pin_tier(self, distributor: str, tier: str | None) -> TierStatus:
        """Set *distributor*'s tier by hand (None: no tier, the base price) and keep the
        rules from changing it."""
        if tier is not None and await self._store.catalog.tier(tier) is None:
            raise ValidationError(f"tier: unknown tier {tier}")
        return await self._change(distributor, "pin", tier)

    async def unpin_tier(self, distributor: str) -> TierStatus:
        """Let the rules decide *distributor*'s tier again (at once)."""
        return await self._change(distributor, "unpin")

    async def apply_tiers(self, distributor: str | None = None) -> int:
        """Decide the tier of *distributor* (None: of every distributor) now; returns how
        many changed. The sweep does this for the accounts that need it."""
        rules = await self._store.tiers.rules()
        dists = [distributor] if distributor is not None else await self._store.accounts.ids()
        return await self._decide_all(dists, "apply", rules)

    async def sweep(self, dists: Sequence[str]) -> int:
        """Decide the tiers of those of *dists* that are due: flagged by a purchase, not
        decided yet today, or decided under older rules. Returns how many changed."""
        rules = await self._store.tiers.rules()
        today = _today()
        due = [d for d, (flagged, day, version) in zip(dists, await self._store.tiers.due(dists))
               if flagged or day < today or version < rules.version]
        return await self._decide_all(due, "apply", rules)

    # ---- helpers ---------------------------------------------------------------------
    async def _change(self, distributor: str, action: str, tier: str | None = None) -> TierStatus:
        rules = await self._store.tiers.rules()
        got = await self._store.tiers.decide(distributor, action, rules, tier)
        self._catalog.forget_distributor(distributor)
        return self._status(distributor, rules, got.after, got)

    async def _decide_all(self, dists: Sequence[str], action: str, rules: TierRules) -> int:
        changed = 0
        for i in range(0, len(dists), _CONCURRENCY):
            part = dists[i:i + _CONCURRENCY]
            for dist, got in zip(part, await asyncio.gather(
                    *(self._store.tiers.decide(d, action, rules) for d in part))):
                if got.status == "changed":
                    self._catalog.forget_distributor(dist)
                    changed += 1
        return changed

    @staticmethod
    def _status(distributor: str, rules: TierRules, tier: str | None, got: Decided) -> TierStatus:
        window = rules.window if rules.rules else None
        start, end = _window(window, got.day)
        accruing = got.this_month if window == "calendar_month" else got.spend
        ahead: TierRule | None = next((r for r in rules.rules if r.min_spend > accruing), None)
        return TierStatus(distributor=distributor, tier=tier, pinned=got.pinned,
                          window=window, window_from=start, window_to=end, spend=got.spend, accruing=accruing,
                          next_tier=ahead.tier if ahead else None, next_min_spend=ahead.min_spend if ahead else None)
