"""The group-commit coalescer with a fake round sender (no Redis: what is tested is the
scheduling): every caller gets its own reply, a shard never has more calls in flight
than its depth, and a failed round reaches every waiter of that round."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dispatch.coalescer import Coalescer


class Sender:
    """Answers each item with ``("re", item)`` after the test lets the round go."""

    def __init__(self) -> None:
        self.inflight: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.rounds: list[dict[str, list[Any]]] = []
        self.fail = False

    async def __call__(self, batches: dict[str, list[Any]]) -> dict[str, list[Any]]:
        self.rounds.append(batches)
        for s in batches:
            self.inflight[s] = self.inflight.get(s, 0) + 1
            self.most[s] = max(self.most.get(s, 0), self.inflight[s])
        await asyncio.sleep(0.002)
        for s in batches:
            self.inflight[s] -= 1
        if self.fail:
            raise ConnectionError("redis went away")
        return {s: [("re", item) for item in items] for s, items in batches.items()}


@pytest.mark.parametrize("depth", [1, 2, 3])
async def test_every_caller_gets_its_reply_and_depth_bounds_the_calls_in_flight(depth: int) -> None:
    send = Sender()
    c = Coalescer(send, cap=16, depth=depth)

    async def caller(shard: str, k: int) -> Any:
        await asyncio.sleep(0.0005 * (k % 7))
        return await c.submit(shard, k)

    replies = await asyncio.gather(*(caller(f"s{k % 3}", k) for k in range(600)))
    assert replies == [("re", k) for k in range(600)]
    assert max(send.most.values()) == depth  # reached, never passed
    assert all(len(items) <= 16 for r in send.rounds for items in r.values())
    assert c.items == 600 and c.batches < 600  # coalesced


async def test_a_failed_round_reaches_each_of_its_waiters() -> None:
    send = Sender()
    send.fail = True
    c = Coalescer(send, depth=2)
    results = await asyncio.gather(*(c.submit("s", k) for k in range(50)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    await c.drain()


async def test_a_second_call_in_flight_waits_for_an_eighth_of_a_cap() -> None:
    """A shard's call beside one in flight goes out only with cap / 8 items; fewer wait
    for the first to return (many small calls cost Redis more than a few large ones)."""
    release = asyncio.Event()
    sizes: list[int] = []

    async def send(batches: dict[str, list[Any]]) -> dict[str, list[Any]]:
        sizes.append(len(batches["s"]))
        await release.wait()
        return {s: list(items) for s, items in batches.items()}

    c = Coalescer(send, cap=64, depth=2)
    first = [c.submit("s", k) for k in range(3)]
    await asyncio.sleep(0.01)
    few = [c.submit("s", k) for k in range(3, 10)]  # 7 < 64 / 8
    await asyncio.sleep(0.01)
    assert sizes == [3], "a second call of 7 items went out beside the first"
    more = [c.submit("s", k) for k in range(10, 12)]  # 9 waiting: enough
    await asyncio.sleep(0.01)
    assert sizes == [3, 9]
    release.set()
    assert await asyncio.gather(*first, *few, *more) == list(range(12))
    assert c.batches == 2
