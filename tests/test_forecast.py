"""Restock forecast: daily totals from hourly buckets, EW velocity, cover and reorder."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.errors import ValidationError
from dispatch.forecast import forecast
from dispatch.models import Forecast

NOW = 480_000  # an hour index: unix_ms // 3_600_000
H = 14.0  # default lead_time_days + review_days


def daily(per_day: list[int], hour_of_day: int = 5) -> dict[int, int]:
    """One bucket per day, ``per_day[0]`` sold today (the last 24 hours), ``per_day[1]`` the day before..."""
    return {NOW - 24 * age - hour_of_day: n for age, n in enumerate(per_day) if n}


def ew_mean(per_day: list[int], half_life: float = 7.0) -> float:
    weights = [0.5 ** (age / half_life) for age in range(len(per_day))]
    return sum(w * n for w, n in zip(weights, per_day)) / sum(weights)


def test_constant_demand() -> None:
    hourly = {NOW - h: 1 for h in range(28 * 24)}  # one code every hour: 24 a day
    f = forecast(hourly, NOW, 100)
    assert f == Forecast(daily_velocity=24.0, daily_stddev=0.0, days_of_cover=round(100 / 24, 2),
                         reorder_qty=24 * 14 - 100, history_days=28)
    assert forecast(hourly, NOW, 24 * 14).reorder_qty == 0
    assert forecast(hourly, NOW, 24 * 14 - 1).reorder_qty == 1
    assert forecast(hourly, NOW, 0).days_of_cover == 0.0


def test_no_sales() -> None:
    assert forecast({}, NOW, 50) == Forecast(0.0, 0.0, None, 0, 0)
    assert forecast({NOW - 3: 0}, NOW, 0) == Forecast(0.0, 0.0, None, 0, 0)
    # Sold long ago, nothing in the window: the history is the whole (empty) window.
    assert forecast({NOW - 40 * 24: 9}, NOW, 0) == Forecast(0.0, 0.0, None, 0, 28)


def test_recent_surge_weighs_more() -> None:
    surge_now = [20] * 7 + [5] * 21
    surge_then = [5] * 21 + [20] * 7
    plain_mean = sum(surge_now) / 28
    recent, old = forecast(daily(surge_now), NOW, 0), forecast(daily(surge_then), NOW, 0)
    assert recent.daily_velocity == round(ew_mean(surge_now), 2) > plain_mean
    assert old.daily_velocity == round(ew_mean(surge_then), 2) < plain_mean
    assert recent.reorder_qty > old.reorder_qty
    assert forecast(daily(surge_now), NOW, 0, half_life_days=1.0).daily_velocity > recent.daily_velocity


def test_weighted_stddev() -> None:
    per_day = [0, 10] * 14  # sells on day 27, so the whole window is history
    mean = ew_mean(per_day)
    weights = [0.5 ** (age / 7.0) for age in range(28)]
    var = sum(w * (n - mean) ** 2 for w, n in zip(weights, per_day)) / sum(weights)
    f = forecast(daily(per_day), NOW, 30)
    assert (f.daily_velocity, f.daily_stddev) == (round(mean, 2), round(math.sqrt(var), 2))
    need = f.daily_velocity * H + 1.65 * f.daily_stddev * math.sqrt(H)
    assert f.reorder_qty == math.ceil(need - 30)


def test_short_history_uses_days_since_first_sale() -> None:
    f = forecast(daily([10, 10, 10]), NOW, 15)  # a new SKU: 3 days of 10, not 30 over 28 days
    assert f == Forecast(10.0, 0.0, 1.5, 10 * 14 - 15, 3)
    # The first sale 49 hours ago falls in day 2 (hours 48..71 back): three days.
    assert forecast({NOW - 49: 3}, NOW, 0).history_days == 3
    assert forecast({NOW: 3}, NOW, 0).history_days == 1
    assert forecast(daily([1] * 60), NOW, 0, window_days=28).history_days == 28


def test_future_and_too_old_buckets_are_ignored() -> None:
    hourly = {NOW - h: 1 for h in range(28 * 24)}
    noisy = hourly | {NOW + 1: 1000, NOW + 500: 7, NOW - 28 * 24: 1000, NOW - 90 * 24: 5}
    assert forecast(noisy, NOW, 100) == forecast(hourly, NOW, 100)
    # The current hour and the oldest hour of the window both count.
    assert forecast({NOW: 28}, NOW, 0).daily_velocity == 28.0
    edge = forecast({NOW - (28 * 24 - 1): 28}, NOW, 0)
    assert edge.history_days == 28 and edge.daily_velocity > 0
    # Only future sales: nothing sold yet.
    assert forecast({NOW + 1: 5}, NOW, 3) == Forecast(0.0, 0.0, None, 0, 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"available": -1}, r"available must be >= 0, got -1"),
    ({"window_days": 0}, r"window_days must be >= 1, got 0"),
    ({"lead_time_days": -1.0}, r"lead_time_days must be >= 0, got -1.0"),
    ({"review_days": float("nan")}, r"review_days must be >= 0, got nan"),
    ({"half_life_days": 0.0}, r"half_life_days must be > 0, got 0.0"),
    ({"hourly": {NOW: -2}}, r"codes sold per hour must be >= 0, got -2"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    args = {"hourly": {NOW: 1}, "now_hour": NOW, "available": 0} | kwargs
    with pytest.raises(ValidationError, match=message) as e:
        forecast(**args)
    assert isinstance(e.value, ValueError)


@given(
    hourly=st.dictionaries(st.integers(NOW - 40 * 24, NOW + 48), st.integers(0, 500), max_size=200),
    available=st.integers(0, 100_000),
    window_days=st.integers(1, 40),
    lead=st.floats(0, 60), review=st.floats(0, 60), z=st.floats(0, 4), half_life=st.floats(0.1, 60),
)
def test_reorder_is_the_least_that_covers_the_horizon(hourly: dict[int, int], available: int, window_days: int,
                                                      lead: float, review: float, z: float,
                                                      half_life: float) -> None:
    f = forecast(hourly, NOW, available, window_days=window_days, lead_time_days=lead, review_days=review,
                 service_z=z, half_life_days=half_life)
    horizon = lead + review
    need = f.daily_velocity * horizon + z * f.daily_stddev * math.sqrt(horizon)
    assert f.reorder_qty >= 0
    assert 0 <= f.history_days <= window_days
    if available >= need:
        assert f.reorder_qty == 0
    else:  # enough, and not one code more
        assert available + f.reorder_qty >= need - 1e-6
        assert available + f.reorder_qty - 1 < need
    sold_in_window = any(n and 0 <= NOW - h < window_days * 24 for h, n in hourly.items())
    assert (f.days_of_cover is None) == (not sold_in_window)
