"""Admins in Redis: named admin tokens (``{g}``) and the audit trail (``{t}``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from . import keys
from .replies import translated

if TYPE_CHECKING:
    from .store import Store

__all__ = ["AdminStore", "AdminRec"]


class AdminRec(msgspec.Struct, array_like=True):
    """A named admin token as stored (admin_token.lua reads ``token_hash``, the 2nd field)."""

    role: str
    token_hash: str
    created: int
    created_by: str


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(AdminRec)
#: One audit entry as stored: field -> value (bytes).
Fields = dict[bytes, bytes]


class AdminStore:
    def __init__(self, db: Store) -> None:
        self._db = db

    # ---- named tokens ---------------------------------------------------------------
    async def create(self, name: str, rec: AdminRec) -> bool:
        """False if a token of that name exists."""
        reply = await self._db.run("admin_token", [keys.ADMINS, keys.ADMINKEYS],
                                   ["create", name, rec.token_hash, _enc.encode(rec)])
        return reply == b"ok"

    async def revoke(self, name: str) -> bool:
        """False if there is no token of that name."""
        return await self._db.run("admin_token", [keys.ADMINS, keys.ADMINKEYS], ["revoke", name]) == b"ok"

    async def by_hash(self, token_hash: str) -> tuple[str, AdminRec] | None:
        c = self._db.client
        with translated():
            name = await c.hget(keys.ADMINKEYS, token_hash)
            raw = None if name is None else await c.hget(keys.ADMINS, name)
        return None if raw is None else (name.decode(), _dec.decode(raw))

    async def get(self, name: str) -> AdminRec | None:
        with translated():
            raw = await self._db.client.hget(keys.ADMINS, name)
        return None if raw is None else _dec.decode(raw)

    async def all(self) -> dict[str, AdminRec]:
        with translated():
            raw = await self._db.client.hgetall(keys.ADMINS)
        return {k.decode(): _dec.decode(v) for k, v in raw.items()}

    # ---- the audit trail --------------------------------------------------------------
    async def append(self, fields: dict[str, str | bytes]) -> str:
        """A new entry at the trail's end; its id."""
        with translated():
            return (await self._db.client.xadd(keys.TRAIL, fields)).decode()

    async def entries(self, newest: str, oldest: str, count: int) -> list[tuple[str, Fields]]:
        """Up to *count* entries from *newest* down to *oldest* (XREVRANGE bounds: an id,
        ``(id`` for exclusive, ``+`` / ``-``), newest first."""
        with translated():
            rows = await self._db.client.xrevrange(keys.TRAIL, newest, oldest, count)
        return [(i.decode(), f) for i, f in rows]
