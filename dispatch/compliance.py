"""Compliance: a distributor's transaction limits and its real-name verification.

Both are enforced by the purchase scripts themselves (``_limits.lua``), atomically with
the purchase: per-order quantity and amount, spend per day and per calendar month
(UTC), and, with ``Config.require_verification``, only verified distributors buy. This
module sets and reads them. The verification's data (legal name, ID type and number)
is stored encrypted (base64 in the account's hash, the distributor's id as associated
data); a read shows the ID number's last 4 characters only.
"""

from __future__ import annotations

import base64
import time
from datetime import datetime, timezone
from typing import Any

import msgspec

from .errors import NotFoundError, ValidationError
from .models import Limits, Verification
from .records import check, ms_to_dt
from .store import Store
from .vault import Vault

__all__ = ["Compliance"]

_ID_TYPES = ("national_id", "passport", "business_license", "other")


class _Identity(msgspec.Struct, array_like=True):
    legal_name: str
    id_type: str
    id_number: str


def _day_and_month(now: datetime) -> tuple[int, int]:
    """Days since 1970-01-01 and months since 1970-01 of *now*, as _limits.lua counts them."""
    return int(now.timestamp() // 86400), (now.year - 1970) * 12 + now.month - 1


def _text(value: Any, what: str, longest: int) -> str:
    if not isinstance(value, str) or not 1 <= len(value.strip()) <= longest or not value.isprintable():
        raise ValidationError(f"{what} must be 1-{longest} printable characters")
    return value.strip()


class Compliance:
    """Transaction limits and real-name verification of distributors."""

    def __init__(self, store: Store, vault: Vault) -> None:
        self._store = store
        self._vault = vault

    async def _fields(self, distributor: str, *names: str) -> list[bytes | None]:
        got = await self._store.accounts.fields(distributor, ["status", *names])
        if got[0] is None:
            raise NotFoundError(f"unknown distributor {distributor}")
        return got[1:]

    async def limits(self, distributor: str) -> Limits:
        """*distributor*'s limits and what its current day and month have spent."""
        q, a, d, m, sd, sdv, sm, smv = (int(v) if v else 0 for v in await self._fields(
            distributor, "lim_q", "lim_a", "lim_d", "lim_m", "sd", "sdv", "sm", "smv"))
        day, month = _day_and_month(datetime.now(timezone.utc))
        return Limits(max_order_qty=q, max_order_amount=a, daily=d, monthly=m,
                      spent_today=sdv if sd == day else 0, spent_this_month=smv if sm == month else 0)

    async def set_limits(self, distributor: str, *, max_order_qty: int = 0, max_order_amount: int = 0,
                         daily: int = 0, monthly: int = 0) -> Limits:
        """Set every limit of *distributor* at once (0: none); orders from now on are held to them."""
        lim = check(dict(max_order_qty=max_order_qty, max_order_amount=max_order_amount, daily=daily,
                         monthly=monthly), Limits, "limits")
        fields = {"lim_q": lim.max_order_qty, "lim_a": lim.max_order_amount, "lim_d": lim.daily,
                  "lim_m": lim.monthly}
        if not await self._store.accounts.update(distributor, fields):
            raise NotFoundError(f"unknown distributor {distributor}")
        return await self.limits(distributor)

    async def verification(self, distributor: str) -> Verification:
        verified, sealed, at, by = await self._fields(distributor, "verified", "kyc", "kyc_at", "kyc_by")
        if verified != b"1" or not sealed:
            return Verification(status="unverified")
        who = msgspec.msgpack.decode(self._vault.decrypt(base64.b64decode(sealed), b"kyc:" + distributor.encode()),
                                     type=_Identity)
        return Verification(status="verified", legal_name=who.legal_name, id_type=who.id_type,
                            id_number_last4=who.id_number[-4:], verified_at=ms_to_dt(int(at or 0)),
                            verified_by=(by or b"").decode() or None)

    async def verify(self, distributor: str, legal_name: str, id_type: str, id_number: str,
                     verified_by: str) -> Verification:
        """Record *distributor*'s real name as verified by *verified_by*; the identity is
        stored encrypted."""
        who = _Identity(_text(legal_name, "legal_name", 200), id_type, _text(id_number, "id_number", 64))
        if id_type not in _ID_TYPES:
            raise ValidationError(f"id_type must be one of {', '.join(_ID_TYPES)}")
        by = _text(verified_by, "verified_by", 64)
        sealed = base64.b64encode(self._vault.encrypt(msgspec.msgpack.encode(who), b"kyc:" + distributor.encode()))
        fields = {"verified": "1", "kyc": sealed, "kyc_at": time.time_ns() // 1_000_000, "kyc_by": by}
        if not await self._store.accounts.update(distributor, fields):
            raise NotFoundError(f"unknown distributor {distributor}")
        return await self.verification(distributor)

    async def unverify(self, distributor: str) -> Verification:
        """Withdraw *distributor*'s verification (its identity is forgotten)."""
        if not await self._store.accounts.update(distributor, {"verified": "0", "kyc": "", "kyc_at": 0,
                                                               "kyc_by": ""}):
            raise NotFoundError(f"unknown distributor {distributor}")
        return Verification(status="unverified")
