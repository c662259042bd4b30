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
