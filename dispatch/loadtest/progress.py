"""Live progress in the terminal: elapsed, scheduled and achieved rate, in flight,
ok and errors, p50/p99 of the last second."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

__all__ = ["live"]


def _view(d: Any) -> Table:
    st = d.stats
    import time
    el = time.perf_counter() - st.start
    i = max(0, int(el) - 1)  # the last whole second
    ok = st.sec_ok[i] if i < len(st.sec_ok) else 0
    err = st.sec_err[i] if i < len(st.sec_err) else 0
    h = st.sec_hist[i] if i < len(st.sec_hist) else None
    p50 = p99 = "-"
    if h is not None and h.get_total_count():
        p50 = f"{h.get_value_at_percentile(50) / 1000:.1f}"
        p99 = f"{h.get_value_at_percentile(99) / 1000:.1f}"
    t = Table(title=f"dispatch loadtest: {d.s.name}", title_justify="left", box=None)
    for c in ("elapsed s", "scheduled/s", "done/s", "errors/s", "p50 ms", "p99 ms", "in flight", "ok", "errors",
              "top errors"):
        t.add_column(c, justify="right")
    top = ", ".join(f"{k} {v}" for k, v in st.errors.most_common(3))
    t.add_row(f"{el:.0f}/{d.s.duration_s:.0f}", f"{d.rate_now(time.perf_counter()):.0f}", str(ok + err), str(err),
              p50, p99, str(d.pool.in_flight), str(st.ok), str(st.failed), top)
    return t


@contextlib.contextmanager
def live(driver: Any, console: Console | None = None) -> Iterator[None]:
    console = console or Console(stderr=True)
    with Live(_view(driver), console=console, refresh_per_second=2, transient=False) as view:
        loop = asyncio.get_running_loop()
        handle: list[asyncio.TimerHandle] = []

        def refresh() -> None:
            view.update(_view(driver))
            handle[:] = [loop.call_later(0.5, refresh)]

        refresh()
        try:
            yield
        finally:
            for h in handle:
                h.cancel()
            view.update(_view(driver))
