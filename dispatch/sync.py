"""A blocking facade over the engine, for callers without an event loop (Django views, scripts)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from .config import Config
from .engine import Engine

__all__ = ["SyncEngine"]

T = TypeVar("T")


class SyncEngine:
    """Runs an :class:`Engine` on a private event-loop thread; every coroutine method
    of the engine is available here as a plain blocking method, thread-safe.

        with SyncEngine(config) as engine:
            order = engine.purchase("acme", "steam-100", 1, "po-1")
    """

    def __init__(self, config: Config | None = None, *, sweep: bool = True) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dispatch-engine", daemon=True)
        self._thread.start()
        self.engine = Engine(config, sweep=sweep)
        try:
            self._call(self.engine.start())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.engine, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        def blocking(*args: Any, **kwargs: Any) -> Any:
            return self._call(attr(*args, **kwargs))

        return blocking

    def close(self) -> None:
        """Close the engine (stopping the embedded Redis, if any) and its thread."""
        if self._loop.is_closed():
            return
        try:
            self._call(self.engine.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
