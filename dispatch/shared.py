"""Values loaded once per key and kept a while, for the lookups of the purchase path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["SharedLoads"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SharedLoads(Generic[K, V]):
    """Each key's value, loaded by ``load()`` and kept *ttl* seconds. Callers asking while
    a key loads share that load, so a busy entry that expires costs Redis one lookup, not
    one per waiting request; a load that fails is not kept; a caller cancelled while it
    waits (its client went away) does not cancel the others' load. Past *max_entries*
    keys, every entry is dropped."""

    __slots__ = ("_ttl", "_max", "_entries")

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self._ttl, self._max = ttl, max_entries
        self._entries: dict[K, tuple[float, asyncio.Future[V]]] = {}

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        hit = self._entries.get(key)
        now = time.monotonic()
        if hit is None or hit[0] <= now:
            if len(self._entries) >= self._max:
                self._entries.clear()
            task = asyncio.ensure_future(load())
            hit = self._entries[key] = (now + self._ttl, task)

            def forget_failure(t: asyncio.Future[Any], entry: Any = hit) -> None:
                if (t.cancelled() or t.exception() is not None) and self._entries.get(key) is entry:
                    del self._entries[key]

            task.add_done_callback(forget_failure)
        return await asyncio.shield(hit[1])

    def forget(self, key: K) -> None:
        """Load *key* afresh next time (its value changed)."""
        self._entries.pop(key, None)
