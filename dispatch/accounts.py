"""Distributor accounts: their records, API keys, top-ups, balances, ledger and rate limits."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import msgspec

from .catalog import Catalog
from .config import Config
from .errors import ConflictError, NotFoundError, UnauthorizedError, ValidationError
from .models import Access, Balance, CatalogItem, Distributor, Id, LedgerEntry, NewDistributor, RateLimit
from .paging import window
from .records import check, check_ref, ledger_entries
from .store import Store
from .store.keys import SUB

__all__ = ["Accounts"]

_UNSET: Any = msgspec.UNSET


def key_hash(api_key: str) -> str:
    # API keys are 256 random bits: a plain hash is as strong as a slow one here.
    return hashlib.sha256(api_key.encode()).hexdigest()


def allowed_field(skus: list[str] | None) -> str:
    if skus is None:
        return "*"
    for s in skus:
        check(s, Id, "allowed_skus entry")
    return ",".join(skus)


class Accounts:
    """Distributors: who they are, what they may buy, and their money."""

    def __init__(self, store: Store, config: Config, catalog: Catalog) -> None:
        self._store = store
        self._config = config
        self._catalog = catalog

    async def create_distributor(self, distributor: str, name: str, tier: str | None = None,
                                 credit_limit: int = 0, allowed_skus: list[str] | None = None) -> NewDistributor:
        """Open an account; the returned API key is shown this once (only its hash is kept)."""
        d = check(dict(distributor=distributor, name=name, tier=tier, credit_limit=credit_limit,
                       allowed_skus=allowed_skus), Distributor, "distributor")
        if SUB in d.distributor:
            raise ValidationError(f"a distributor's id has no {SUB!r}: sub-distributors are made by their parent")
        if d.tier is not None:
            await self._catalog.get_tier(d.tier)
        fields = {"name": d.name, "tier": d.tier or "", "credit_limit": d.credit_limit,
                  "allowed": allowed_field(d.allowed_skus), "status": "active", "balance": 0,
                  "held": 0, "created": time.time_ns() // 1_000_000}
        if not await self._store.accounts.create(d.distributor, fields):
            raise ConflictError(f"distributor {d.distributor} exists already")
        return NewDistributor(distributor=d, api_key=await self.rotate_api_key(d.distributor))

    async def update_distributor(self, distributor: str, *, name: str = _UNSET, tier: str | None = _UNSET,
                                 credit_limit: int = _UNSET, allowed_skus: list[str] | None = _UNSET,
                                 status: str = _UNSET) -> Distributor:
        """Change an account; ``status="suspended"`` stops its orders at once."""
        current = await self.get_distributor(distributor)
        changes = {k: v for k, v in dict(name=name, tier=tier, credit_limit=credit_limit,
                                         allowed_skus=allowed_skus, status=status).items() if v is not _UNSET}
        d = check(msgspec.structs.asdict(current) | changes, Distributor, "distributor")
        if "tier" in changes and d.tier is not None:
            await self._catalog.get_tier(d.tier)
        fields: dict[str, Any] = {}
        for k in changes:
            if k == "allowed_skus":
                fields["allowed"] = allowed_field(d.allowed_skus)
            elif k == "tier":
                fields["tier"] = d.tier or ""
            else:
                fields[k] = getattr(d, k)
        if not await self._store.accounts.update(distributor, fields):
            raise NotFoundError(f"unknown distributor {distributor}")
        self._catalog.forget_distributor(distributor)
        return d

    async def get_distributor(self, distributor: str) -> Distributor:
        a = await self._store.accounts.get(distributor)
        if a is None:
            raise NotFoundError(f"unknown distributor {distributor}")
        return Distributor(distributor=distributor, name=a.name, tier=a.tier or None, credit_limit=a.credit_limit,
                           allowed_skus=None if a.allowed == "*" else [s for s in a.allowed.split(",") if s],
                           status=a.status, balance=a.balance, held=a.held)  # type: ignore[arg-type]

    async def list_distributors(self, *, after: str | None = None, limit: int | None = None) -> list[Distributor]:
        """Distributors by id: those after *after*, at most *limit*."""
        return [await self.get_distributor(d) for d in window(await self._store.accounts.ids(), after, limit)]

    async def catalog(self, distributor: str) -> list[CatalogItem]:
        """The active SKUs *distributor* may buy, at its tier's price, with their stock status."""
        d = await self.get_distributor(distributor)
        return await self._catalog.offer(d.tier, d.allowed_skus)

    # ---- keys ------------------------------------------------------------------------
    async def rotate_api_key(self, distributor: str) -> str:
        """A new API key for the distributor; the previous one stops working at once."""
        if not await self._store.accounts.exists(distributor):
            raise NotFoundError(f"unknown distributor {distributor}")
        api_key = "dk_" + secrets.token_urlsafe(32)
        await self._store.accounts.set_api_key(distributor, key_hash(api_key))
        return api_key

    async def authenticate(self, api_key: str) -> str:
        """The distributor id an API key belongs to, or UnauthorizedError."""
        dist = await self._store.accounts.by_key_hash(key_hash(api_key)) if api_key else None
        if dist is None:
            raise UnauthorizedError("invalid API key")
        return dist

    async def access(self, api_key: str) -> Access:
        """Who *api_key* belongs to and its rate limit, or UnauthorizedError: what the
        daemon asks once per key and then trusts for ``auth_cache_ttl_s``."""
        dist = await self.authenticate(api_key)
        return Access(distributor=dist, rate_limit=await self.rate_limit(dist))

    # ---- money -----------------------------------------------------------------------
    async def topup(self, distributor: str, amount: int, reference: str) -> Balance:
        """Credit a balance; idempotent by *reference* (the same reference credits once)."""
        amount = check(amount, int, "amount")
        if amount <= 0:
            raise ValidationError("amount must be a positive integer (minor units)")
        await self._store.accounts.topup(distributor, check_ref(reference, "reference"), amount)
        return await self.balance(distributor)

    async def balance(self, distributor: str) -> Balance:
        d = await self.get_distributor(distributor)
        return Balance(balance=d.balance, held=d.held, credit_limit=d.credit_limit,
                       available=d.balance - d.held + d.credit_limit)

    async def ledger(self, distributor: str) -> list[LedgerEntry]:
        """The distributor's ledger, oldest first: its balance is the sum of the amounts."""
        return ledger_entries(await self._store.accounts.ledger(distributor))

    # ---- rate limits and replays ---------------------------------------------------------
    async def rate_limit(self, distributor: str) -> int:
        """Requests a second the daemon allows *distributor* (0: unlimited)."""
        rate = await self._store.accounts.rate_limit(distributor)
        return self._config.default_rate_limit if rate is None else rate

    async def set_rate_limit(self, distributor: str, rate_limit: int) -> int:
        """Set the requests a second the daemon allows *distributor* (0: unlimited)."""
        rate = check(rate_limit, RateLimit, "rate_limit")
        if not await self._store.accounts.update(distributor, {"rate_limit": rate}):
            raise NotFoundError(f"unknown distributor {distributor}")
        return rate

    async def throttle(self, distributor: str, rate_limit: int) -> float:
        """Count one request against *distributor*'s token bucket (``rate_limit`` a second,
        bursts of as many); 0.0 when it may go ahead, else the seconds until it may."""
        if rate_limit <= 0:
            return 0.0
        ok, wait_ms = await self._store.accounts.throttle(distributor, rate_limit, rate_limit)
        return 0.0 if ok else max(wait_ms, 1) / 1000

    async def remember_signature(self, distributor: str, signature: str, ttl_s: int = 120) -> bool:
        """True the first time a request signature is seen within *ttl_s*; False for a replay."""
        return await self._store.accounts.remember_signature(distributor, signature, ttl_s)
