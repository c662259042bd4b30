"""Cursor paging of the admin lists: items are ordered by id, and the cursor of a
page is the id of its last item, so a page is the ids after the cursor. Nothing is
kept between pages: an item added or removed meanwhile moves no other item."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

__all__ = ["window"]


def window(ids: Iterable[str], after: str | None = None, limit: int | None = None) -> list[str]:
    """*ids* sorted, those after *after* only, at most *limit* of them."""
    ordered = sorted(ids)
    start = bisect_right(ordered, after) if after is not None else 0
    return ordered[start:] if limit is None else ordered[start:start + limit]
