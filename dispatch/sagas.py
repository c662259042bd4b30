"""The steps of orders, each coalesced per shard, and the tasks that carry sagas to their end.

A purchase in deliver mode is one step on one Redis; a reservation (on a Redis
Cluster, a purchase in deliver mode too, and a ticket's approval) is a short saga of
idempotent steps, each one Lua script on one shard (store/orders.py lists them). :class:`Sagas` gives each step its own coalescer, and runs each saga as
a task of its own, so that a caller that goes away (a client hanging up) does not
leave it half done; ``close()`` waits for them and drains the coalescers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from .coalescer import Coalescer, Direct
from .errors import DispatchError
from .store.orders import STEPS, OrderStore

__all__ = ["Sagas"]

log = logging.getLogger("dispatch.engine")
T = TypeVar("T")


class Sagas:
    """Step coalescers (``sagas.take.submit(sku, item)``...) and saga tasks."""

    def __init__(self, store: OrderStore, *, coalesce: bool = True, cap: int = 256, depth: int = 2) -> None:
        def batcher(step: str) -> Coalescer | Direct:
            if coalesce:  # the node's one shard gets *depth* calls in flight; SKUs and accounts one
                node = STEPS[step][0] == "node" or (step == "settle" and not store.cluster)
                return Coalescer(lambda batches: store.steps(step, batches), cap, depth if node else 1)
            return Direct(lambda shard, items: store.step(step, shard, items))

        self.steps = {name: batcher(name) for name in STEPS}
        s = self.steps
        self.deliver, self.begin, self.take = s["deliver"], s["begin"], s["take"]
        self.commit, self.settle, self.sku_settle, self.unpend = s["commit"], s["settle"], s["sku_settle"], s["unpend"]
        self._tasks: set[asyncio.Future[Any]] = set()

    def run(self, steps: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """Run a saga's steps as a task of their own; the caller gets a future the task's
        outcome is copied to. Cancelling that future leaves the task alone, as
        asyncio.shield would, at half its cost (one callback, not three)."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(steps)
        answer: asyncio.Future[T] = loop.create_future()
        self._tasks.add(task)

        def relay(t: asyncio.Task[T]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                answer.cancel()
                return
            error = t.exception()  # retrieved even when nobody waits any more
            if answer.done():
                if error is not None and not isinstance(error, DispatchError):
                    log.warning("a saga whose caller went away failed: %r", error)
            elif error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(t.result())

        task.add_done_callback(relay)
        return answer

    def later(self, step: Awaitable[Any]) -> None:
        """A step's call nobody waits for (close() does); one that fails is redone by the sweep."""
        fut = asyncio.ensure_future(step)
        self._tasks.add(fut)
        fut.add_done_callback(self._forget)

    def _forget(self, fut: asyncio.Future[Any]) -> None:
        self._tasks.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("a background step failed (the sweep will redo it): %r", fut.exception())

    async def close(self) -> None:
        """Wait for every saga and step in flight, then for the coalescers to drain."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for c in self.steps.values():
            await c.drain()

    def stats(self) -> dict[str, tuple[int, int]]:
        """(script calls sent, items in them) per step: items / calls is the mean batch."""
        return {name: (c.batches, c.items) for name, c in self.steps.items()}
