"""The audit trail: every admin write, who made it, through what, on what, its outcome,
and the state of what it changes just before and just after.

Writes are recorded where every caller's write goes through: the engine's facade
(``_Write`` in engine.py), so the daemon's routes, the CLI and an embedding application
are recorded alike. Who is acting is the context's (:func:`acting`): the daemon sets the
admin token's name and the route for each request, the CLI ``cli:<user>``; otherwise
it is ``engine:<user>``. A refused write (its token's role lacks the route's) is
recorded by the daemon with the outcome ``forbidden``; a write that fails is recorded
with its error code, so no entry claims a success that did not happen.

The trail is one Redis stream (``keys.TRAIL``), appended to and never trimmed or
changed. The states are read around the write, not atomically with it: a concurrent
write to the same target may show in them. They never hold a secret: fields named in
:data:`SECRETS` are dropped at any depth (an admin read never shows them either).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from datetime import datetime
from typing import Any, TypeVar

import msgspec

from .errors import DispatchError, NotFoundError
from .models import AuditEntry, AuditPage
from .records import ms_to_dt
from .store import Store

__all__ = ["Trail", "acting", "actor", "SECRETS"]

log = logging.getLogger("dispatch.trail")
T = TypeVar("T")

#: Fields never recorded: keys, tokens and their hashes, codes and PINs, the identity a
#: verification keeps encrypted (legal name, ID number).
SECRETS = frozenset({"api_key", "secret", "token_hash", "code", "codes", "pin", "legal_name", "id_number"})
#: Entries read per round while a filtered page fills.
_SCAN = 500

_acting: ContextVar[tuple[str, str] | None] = ContextVar("dispatch_actor", default=None)


def actor() -> tuple[str, str]:
    """(who, through what) of the current context: see :func:`acting`."""
    return _acting.get() or (f"engine:{_user()}", "engine")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@contextlib.contextmanager
def acting(who: str, via: str) -> Iterator[None]:
    """Writes made in this context are recorded as *who*'s, made through *via*."""
    token = _acting.set((who, via))
    try:
        yield
    finally:
        _acting.reset(token)


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in SECRETS}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


class Trail:
    """Records admin writes and reads them back; *readers* read a target's state by kind."""

    def __init__(self, store: Store, readers: dict[str, Callable[[Any], Awaitable[Any]]]) -> None:
        self._store = store.admins
        self._readers = readers

    async def _state(self, kind: str, id_: Any) -> bytes:
        read = self._readers.get(kind)
        if read is None:
            return b"null"
        try:
            state = await read(id_)
        except NotFoundError:
            state = None
        return msgspec.json.encode(_scrub(msgspec.to_builtins(state)))

    async def record(self, action: str, kind: str, id_: Any, write: Callable[[], Awaitable[T]]) -> T:
        """Run *write* (action *action* on the *kind* target *id_*) and record it, with the
        target's state before and after and its outcome (``ok`` or the error's code)."""
        target = kind if id_ is None and kind != "webhook" else f"{kind}:{'admin' if id_ is None else id_}"
        before = await self._state(kind, id_)  # fails before the write, if it fails
        outcome = "internal_error"
        try:
            result = await write()
            outcome = "ok"
            return result
        except DispatchError as e:
            outcome = e.code
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            try:
                after = await self._state(kind, id_)
            except DispatchError:
                after = b"null"
            try:
                await self._append(action, target, outcome, before, after)
            except DispatchError:
                log.error("the audit entry of %s on %s (outcome %s) could not be written", action, target, outcome)
                raise

    async def refused(self, action: str, target: str, outcome: str) -> None:
        """Record an attempted write that was refused before it reached the engine."""
        await self._append(action, target, outcome, b"null", b"null")

    async def _append(self, action: str, target: str, outcome: str, before: bytes, after: bytes) -> None:
        who, via = actor()
        await self._store.append({"actor": who, "via": via, "action": action, "target": target,
                                  "outcome": outcome, "before": before, "after": after})

    async def audit_trail(self, *, actor: str | None = None, target: str | None = None,
                          since: datetime | None = None, until: datetime | None = None,
                          cursor: str | None = None, limit: int = 100) -> AuditPage:
        """Audit entries, the most recent first, at most *limit*: those of *actor*, on
        *target* (``kind:id``, or an id: every kind), made in [*since*, *until*), older
        than the entry *cursor* (the ``next_cursor`` of the page before)."""
        bounds = [_order(cursor)] if cursor else []
        if until is not None:
            bounds.append((_ms(until), 0))
        if bounds and min(bounds) == (0, 0):
            return AuditPage(entries=[])  # nothing is older than the first possible id
        newest = "(%d-%d" % min(bounds) if bounds else "+"
        oldest = f"{_ms(since)}-0" if since is not None else "-"
        out: list[AuditEntry] = []
        while len(out) <= limit:  # one more than the page: is there a next one?
            rows = await self._store.entries(newest, oldest, _SCAN)
            for entry_id, f in rows:
                t = f[b"target"].decode()
                if (actor is None or f[b"actor"].decode() == actor) and (
                        target is None or target in (t, t.partition(":")[2])):
                    out.append(_entry(entry_id, f))
                    if len(out) > limit:
                        break
            if len(rows) < _SCAN:
                break
            newest = f"({rows[-1][0]}"
        if len(out) > limit:
            del out[limit:]
            return AuditPage(entries=out, next_cursor=out[-1].entry_id)
        return AuditPage(entries=out)


def _ms(t: datetime) -> int:
    return max(0, int(t.timestamp() * 1000))


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entry(entry_id: str, f: dict[bytes, bytes]) -> AuditEntry:
    return AuditEntry(entry_id=entry_id, at=ms_to_dt(_order(entry_id)[0]), actor=f[b"actor"].decode(),
                      via=f[b"via"].decode(), action=f[b"action"].decode(), target=f[b"target"].decode(),
                      outcome=f[b"outcome"].decode(), before=msgspec.json.decode(f[b"before"]),
                      after=msgspec.json.decode(f[b"after"]))
