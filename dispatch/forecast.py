"""Restock forecast for one SKU from its hourly sales buckets.

Method, in days of 24 hours counted back from ``now_hour`` (day 0 holds hours
``now_hour - 23 .. now_hour``):

1. Daily totals over the last ``window_days`` days, each bucket added to the day
   of its age. Buckets after ``now_hour`` or older than the window are ignored.
2. If the first recorded sale is younger than the window, only the days since it
   count (``history_days``, at least 1), so a new SKU is not diluted by days it
   did not exist.
3. ``daily_velocity`` is the mean of those days weighted by
   ``0.5 ** (age_days / half_life_days)``; ``daily_stddev`` is the weighted
   standard deviation around it.
4. Over the horizon ``H = lead_time_days + review_days`` the demand is
   ``velocity * H`` and the safety stock ``service_z * stddev * sqrt(H)``;
   ``reorder_qty = max(0, ceil(velocity * H + safety - available))``, computed
   from the rounded figures the result shows, so they satisfy it exactly.
   ``days_of_cover = available / velocity``, None when nothing sold in the window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .errors import ValidationError
from .models import Forecast

__all__ = ["forecast"]

# Float noise must not order one more code (2.2 * 5.0 == 11.000000000000002).
_EPS = 1e-9


def forecast(hourly: Mapping[int, int], now_hour: int, available: int, *, window_days: int = 28,
             lead_time_days: float = 7.0, review_days: float = 7.0, service_z: float = 1.65,
             half_life_days: float = 7.0) -> Forecast:
    """Forecast one SKU from ``{hour_index: codes_sold}`` (``hour_index = unix_ms // 3_600_000``;
    missing hours sold nothing) at hour ``now_hour`` with ``available`` codes in stock.

    Raises ValidationError (a ValueError) for a negative ``available``, ``lead_time_days``,
    ``review_days`` or hourly count, ``window_days < 1`` or ``half_life_days <= 0``.
    """
    _require(available >= 0, "available", ">= 0", available)
    _require(window_days >= 1, "window_days", ">= 1", window_days)
    _require(lead_time_days >= 0, "lead_time_days", ">= 0", lead_time_days)
    _require(review_days >= 0, "review_days", ">= 0", review_days)
    _require(half_life_days > 0, "half_life_days", "> 0", half_life_days)
    least = min(hourly.values(), default=0)
    _require(least >= 0, "codes sold per hour", ">= 0", least)

    sales = [(now_hour - hour, n) for hour, n in hourly.items() if n and hour <= now_hour]  # (age in hours, sold)
    if not sales:
        return Forecast(0.0, 0.0, None, 0, 0)
    history_days = min(window_days, max(age for age, _ in sales) // 24 + 1)
    daily = [0] * history_days
    for age, n in sales:
        if age < history_days * 24:
            daily[age // 24] += n
    weights = [0.5 ** (day / half_life_days) for day in range(history_days)]
    total = sum(weights)
    velocity = sum(w * n for w, n in zip(weights, daily)) / total
    stddev = math.sqrt(sum(w * (n - velocity) ** 2 for w, n in zip(weights, daily)) / total)

    shown_velocity, shown_stddev = round(velocity, 2), round(stddev, 2)
    horizon = lead_time_days + review_days
    need = shown_velocity * horizon + service_z * shown_stddev * math.sqrt(horizon)
    return Forecast(
        daily_velocity=shown_velocity,
        daily_stddev=shown_stddev,
        days_of_cover=round(available / velocity, 2) if velocity > 0 else None,
        reorder_qty=max(0, math.ceil(need - available - _EPS)),
        history_days=history_days,
    )


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValidationError(f"{name} must be {rule}, got {value!r}")
