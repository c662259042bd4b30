"""Group commit of saga steps, across shards.

One coalescer serves one script (a saga step). While one round of it is in flight,
new calls queue up per shard; when the round returns, every queued shard goes out
in the next round, as one script call per shard (at most ``cap`` items each),
pipelined in one write. No timers: when idle, a call goes out on the next turn of
the event loop, together with whatever else arrived in the same turn.

``send`` answers each item with its result, or with the exception its caller gets
(one item's refusal is not the round's failure).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Coalescer", "Direct"]

#: send(round) -> replies: a round is {shard: [item, ...]}, replies {shard: [reply, ...]}.
SendRound = Callable[[dict[str, list[Any]]], Awaitable[dict[str, list[Any]]]]
#: send(shard, [item]) -> [reply]
SendOne = Callable[[str, list[Any]], Awaitable[list[Any]]]


class Coalescer:
    """Batches ``submit(shard, item)`` calls into rounds of ``send``.

    Each shard has at most *depth* calls in flight. Shards that have room and calls
    waiting are flushed together, as one round, on the next turn of the event loop.
    A depth of 2 lets the next call of a shard reach Redis while the process is still
    busy with the replies of the last one; but a call beside one in flight goes only
    with at least cap / 8 items, fewer wait for the first to return: a script call has
    a fixed cost (its reads and writes per account and SKU, the AOF's fsync) that a
    few items do not carry. Callers that arrive one by one (HTTP requests) otherwise
    split into many small calls.
    """

    __slots__ = ("_send", "_cap", "_depth", "_fill", "_queues", "_busy", "_flush_soon", "_tasks", "_loop", "rounds",
                 "batches", "items")

    def __init__(self, send: SendRound, cap: int = 256, depth: int = 1) -> None:
        self._send = send
        self._cap = cap
        self._depth = depth
        self._fill = max(1, cap // 8)
        self._queues: dict[str, list[tuple[Any, asyncio.Future[Any]]]] = {}
        self._busy: dict[str, int] = {}    # shard -> its calls in flight
        self._flush_soon = False
        self._tasks: set[asyncio.Task[None]] = set()
        # asyncio.get_running_loop() asks the OS for the process id on every call
        self._loop: asyncio.AbstractEventLoop | None = None
        self.rounds = 0   # rounds sent,
        self.batches = 0  # script calls in them (one per shard and round),
        self.items = 0    # and items: the mean batch is items / batches

    def submit(self, shard: str, item: Any) -> asyncio.Future[Any]:
        """Queue *item* for *shard*; the future gets its own reply."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut = loop.create_future()
        queue = self._queues.get(shard)
        if queue is None:
            self._queues[shard] = queue = []
        queue.append((item, fut))
        if self._busy.get(shard, 0) < self._depth:
            self._schedule(loop)
        return fut

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        batches: dict[str, list[tuple[Any, asyncio.Future[Any]]]] = {}
        for shard, queue in list(self._queues.items()):
            busy = self._busy.get(shard, 0)
            if busy >= self._depth or (busy and len(queue) < self._fill):
                continue
            batches[shard] = queue[: self._cap]
            del queue[: self._cap]
            if not queue:
                del self._queues[shard]
            self._busy[shard] = busy + 1
        if batches:
            task = self._loop.create_task(self._round(batches))  # type: ignore[union-attr]
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _round(self, batches: dict[str, list[tuple[Any, asyncio.Future[Any]]]]) -> None:
        self.rounds += 1
        self.batches += len(batches)
        self.items += sum(len(b) for b in batches.values())
        try:
            replies = await self._send({s: [item for item, _ in b] for s, b in batches.items()})
        except BaseException as e:  # every waiter of the round hears of it
            for b in batches.values():
                for _, fut in b:
                    if not fut.done():
                        if isinstance(e, asyncio.CancelledError):
                            fut.cancel()
                        else:
                            fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
            replies = {}
        else:
            for shard, b in batches.items():
                got = replies.get(shard, ())
                for k, (_, fut) in enumerate(b):
                    if fut.done():
                        continue
                    if len(got) == len(b):
                        if isinstance(got[k], Exception):
                            fut.set_exception(got[k])
                        else:
                            fut.set_result(got[k])
                    else:  # a script answered the wrong number of items: a bug, not a hang
                        fut.set_exception(RuntimeError(f"{len(got)} replies for {len(b)} items"))
        finally:
            for shard in batches:
                left = self._busy[shard] - 1
                if left:
                    self._busy[shard] = left
                else:
                    del self._busy[shard]
            if any(s in self._queues for s in batches):
                self._schedule(self._loop)  # type: ignore[arg-type]

    async def drain(self) -> None:
        """Wait until every queued call has been sent and answered."""
        while self._tasks or self._queues:
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            else:
                await asyncio.sleep(0)


class Direct:
    """The straightforward way, for comparison: one script call per item, at once."""

    __slots__ = ("_send", "rounds", "batches", "items")

    def __init__(self, send: SendOne) -> None:
        self._send = send
        self.rounds = self.batches = self.items = 0

    def submit(self, shard: str, item: Any) -> Awaitable[Any]:
        self.rounds += 1
        self.batches += 1
        self.items += 1
        return self._one(shard, item)

    async def _one(self, shard: str, item: Any) -> Any:
        reply = (await self._send(shard, [item]))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def drain(self) -> None:
        pass
