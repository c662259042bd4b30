"""Admins: named admin tokens, their roles, and what each role may do.

The configured ``admin_token`` is the owner (actor ``owner``). The owner creates named
tokens with a role; only the token's sha256 is kept, the token itself is shown once.
A token is looked up in Redis on every request, never cached, so a revoked token is
refused by every worker and host from the next request on.

What each role may do (the routes name their roles in dispatch/server/routes.py):

============  ==============================================================================
``viewer``    every admin read (the audit trail included), nothing else
``operator``  reads; the catalog (SKUs, tiers, tier rules), stock (imports, batches),
              suppliers (but their money), tickets (rejecting), distributors (opening,
              status, allowed SKUs, tier and its pin, rate limit, API keys, verification),
              distributors' webhooks, replays
``finance``   reads; money: top-ups, credit limits, transaction limits, supplier deposits,
              approving tickets (refunds, supplier charges)
``owner``     everything: admin tokens, the admin webhook, orders exported with codes in clear
============  ==============================================================================
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import NamedTuple

from .errors import ConflictError, ForbiddenError, NotFoundError, UnauthorizedError, ValidationError
from .models import ROLES, AdminToken, Id, NewAdminToken
from .records import check, ms_to_dt
from .store import Store
from .store.admins import AdminRec
from .trail import actor

__all__ = ["Admins", "Admin", "OWNER", "permits", "require"]

#: The actor of the configured admin token; no named token may take it.
OWNER = "owner"


class Admin(NamedTuple):
    """Who is asking: a token's name and role."""

    name: str
    role: str


def permits(role: str, roles: frozenset[str]) -> bool:
    """True when *role* may do what *roles* may: owner does everything, and what a viewer
    may do (reads) every role may."""
    return role == "owner" or role in roles or "viewer" in roles


def require(admin: Admin, roles: frozenset[str], what: str) -> None:
    """ForbiddenError naming the roles *what* needs unless *admin*'s role permits it."""
    if not permits(admin.role, roles):
        needed = " or ".join(sorted(roles - {"owner"}) or ["owner"])
        raise ForbiddenError(f"{what} needs the {needed} role (or owner); token {admin.name!r} is {admin.role}",
                             needed=sorted(roles))


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _public(name: str, rec: AdminRec) -> AdminToken:
    return AdminToken(name=name, role=rec.role, created_at=ms_to_dt(rec.created),  # type: ignore[arg-type]
                      created_by=rec.created_by)


class Admins:
    """Named admin tokens: create, list, revoke, and who a token is."""

    def __init__(self, store: Store) -> None:
        self._store = store.admins

    async def create_admin_token(self, name: str, role: str) -> NewAdminToken:
        """A new admin token *name* with *role*; its secret is in this answer only."""
        name = check(name, Id, "name")
        if name == OWNER:
            raise ValidationError(f"{OWNER!r} is the configured admin token's name; choose another")
        if role not in ROLES:
            raise ValidationError(f"role must be one of {', '.join(ROLES)}")
        secret = "adm_" + secrets.token_urlsafe(32)
        rec = AdminRec(role, _hash(secret), time.time_ns() // 1_000_000, actor()[0])
        if not await self._store.create(name, rec):
            raise ConflictError(f"admin token {name} exists already")
        return NewAdminToken(token=_public(name, rec), secret=secret)

    async def admin_token(self, name: str) -> AdminToken:
        rec = await self._store.get(name)
        if rec is None:
            raise NotFoundError(f"no admin token {name}")
        return _public(name, rec)

    async def list_admin_tokens(self) -> list[AdminToken]:
        """Every named admin token, by name."""
        return [_public(n, r) for n, r in sorted((await self._store.all()).items())]

    async def revoke_admin_token(self, name: str) -> AdminToken:
        """Revoke token *name* (refused from the next request on); the token it was."""
        token = await self.admin_token(name)
        if not await self._store.revoke(name):
            raise NotFoundError(f"no admin token {name}")
        return token

    async def admin_by_token(self, token: str) -> Admin:
        """Who *token* is; UnauthorizedError if it is no named admin token."""
        found = await self._store.by_hash(_hash(token))
        if found is None:
            raise UnauthorizedError("missing or invalid admin token")
        return Admin(found[0], found[1].role)
