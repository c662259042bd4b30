"""SharedLoads, the lookup cache of the purchase path (pure asyncio: no Redis involved)."""

from __future__ import annotations

import asyncio

import pytest

from dispatch.shared import SharedLoads


class Loader:
    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.fail = False

    async def __call__(self) -> int:
        self.calls += 1
        await self.release.wait()
        if self.fail:
            raise LookupError("no such key")
        return self.calls


async def test_callers_share_a_load_and_its_value_is_kept_its_ttl() -> None:
    cache: SharedLoads[str, int] = SharedLoads(ttl=0.05)
    load = Loader()
    waiting = [asyncio.ensure_future(cache.get("k", load)) for _ in range(20)]
    await asyncio.sleep(0)
    load.release.set()
    assert await asyncio.gather(*waiting) == [1] * 20 and load.calls == 1
    assert await cache.get("k", load) == 1 and load.calls == 1  # kept
    await asyncio.sleep(0.06)
    assert await cache.get("k", load) == 2  # expired: loaded again
    cache.forget("k")
    assert await cache.get("k", load) == 3


async def test_a_failed_load_is_not_kept() -> None:
    cache: SharedLoads[str, int] = SharedLoads(ttl=60)
    load = Loader()
    load.fail = True
    load.release.set()
    with pytest.raises(LookupError):
        await cache.get("k", load)
    load.fail = False
    assert await cache.get("k", load) == 2


async def test_a_cancelled_caller_does_not_cancel_the_others_load() -> None:
    cache: SharedLoads[str, int] = SharedLoads(ttl=60)
    load = Loader()
    gone, stays = asyncio.ensure_future(cache.get("k", load)), asyncio.ensure_future(cache.get("k", load))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    load.release.set()
    assert await stays == 1 and load.calls == 1
    assert gone.cancelled()


async def test_past_max_entries_every_entry_is_dropped() -> None:
    cache: SharedLoads[int, int] = SharedLoads(ttl=60, max_entries=3)
    load = Loader()
    load.release.set()
    for k in range(3):
        await cache.get(k, load)
    await cache.get(3, load)  # the fourth: the three before are dropped
    assert await cache.get(0, load) == 5
