"""Group commit of script calls, per shard.

While one call for a shard is in flight, calls for the same shard queue up; when it
returns, everything queued goes out as the next call (at most ``cap`` items). No
timers: an idle shard sends at once, on the next turn of the event loop, together
with whatever else arrived in the same turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["Coalescer", "Direct"]

T = TypeVar("T")

Send = Callable[[str, list[Any]], Awaitable[Sequence[T]]]


class Coalescer(Generic[T]):
    """Batches ``submit(shard, item)`` calls into ``send(shard, items)`` calls."""

    __slots__ = ("_send", "_cap", "_queues", "_tasks", "batches", "items")

    def __init__(self, send: Send[T], cap: int = 256) -> None:
        self._send = send
        self._cap = cap
        self._queues: dict[str, list[tuple[Any, asyncio.Future[T]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # calls sent, and items in them: the mean batch size is items / batches
        self.items = 0

    def submit(self, shard: str, item: Any) -> asyncio.Future[T]:
        """Queue *item* for *shard*; the future gets its own reply from the batch."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(shard)
        if queue is None:
            self._queues[shard] = queue = []
            task = asyncio.get_running_loop().create_task(self._drain(shard, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        queue.append((item, fut))
        return fut

    async def _drain(self, shard: str, queue: list[tuple[Any, asyncio.Future[T]]]) -> None:
        try:
            while queue:
                batch = queue[: self._cap]
                del queue[: self._cap]
                self.batches += 1
                self.items += len(batch)
                try:
                    replies = await self._send(shard, [item for item, _ in batch])
                except asyncio.CancelledError:
                    for _, fut in batch:
                        fut.cancel()
                    raise
                except Exception as e:  # every waiter of the batch hears of it
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, fut), reply in zip(batch, replies, strict=True):
                    if not fut.done():
                        fut.set_result(reply)
        finally:
            del self._queues[shard]
            for _, fut in queue:  # only left when cancelled
                fut.cancel()

    async def drain(self) -> None:
        """Wait until every queued call has been sent and answered."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Direct(Generic[T]):
    """The straightforward way, for comparison: one ``send`` per item, at once."""

    __slots__ = ("_send", "batches", "items")

    def __init__(self, send: Send[T], cap: int = 1) -> None:
        self._send = send
        self.batches = self.items = 0

    def submit(self, shard: str, item: Any) -> Awaitable[T]:
        self.batches += 1
        self.items += 1
        return self._one(shard, item)

    async def _one(self, shard: str, item: Any) -> T:
        return (await self._send(shard, [item]))[0]

    async def drain(self) -> None:
        pass
