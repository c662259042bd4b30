"""Scenarios: what traffic to drive, from a TOML file or a built-in preset.

A scenario is a list of phases (the request rate over time, linear within a
phase), a catalog (explicit SKUs, or ``sku_count`` generated ones with Zipf
popularity), a qty mix, distributors, and the shares of reservations, retries
and confirms. Phases may aim traffic at a subset of SKUs (``skus``), which is how
``flash-sale`` spikes on a few thin-stock SKUs.

    name = "my-peak"
    distributors = 8
    qty_mix = {1 = 0.8, 2 = 0.15, 5 = 0.05}
    reserve_share = 0.1     # orders placed as reservations
    confirm_share = 0.7     # of those, confirmed; the rest cancelled
    retry_share = 0.05      # orders sent again with the same external_ref
    timeout_s = 5.0

    [catalog]
    sku_count = 50
    zipf_s = 1.1
    stock = 20000

    [[phase]]
    duration_s = 30
    rate = 200
    rate_end = 1000          # linear ramp within the phase

    [[phase]]
    duration_s = 10
    rate = 3000
    skus = ["lt-sku-000", "lt-sku-001"]   # only these SKUs in this phase
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import msgspec

__all__ = ["Phase", "SkuSpec", "Catalog", "Scenario", "PRESETS", "preset", "load", "scaled"]

Share = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Positive = Annotated[float, msgspec.Meta(gt=0.0)]


class _Spec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class Phase(_Spec):
    duration_s: Positive
    #: Requests a second (new orders) at the start of the phase.
    rate: Annotated[float, msgspec.Meta(ge=0.0)]
    #: Rate at the end of the phase (linear in between); default: ``rate``.
    rate_end: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    #: Only these SKUs (by id) in this phase, with their catalog weights; default: all.
    skus: list[str] | None = None
    label: str = ""

    def rate_at(self, t: float) -> float:
        end = self.rate if self.rate_end is None else self.rate_end
        return self.rate + (end - self.rate) * min(max(t / self.duration_s, 0.0), 1.0)


class SkuSpec(_Spec):
    sku: str
    #: Codes seeded before the run.
    stock: Annotated[int, msgspec.Meta(ge=0)]
    #: Relative popularity.
    weight: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0
    price: Annotated[int, msgspec.Meta(ge=0)] = 1000


class Catalog(_Spec):
    """Generated SKUs ``<prefix>000 ..``: Zipf popularity (weight of rank r: 1 / r**zipf_s)."""

    sku_count: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10
    zipf_s: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    stock: Annotated[int, msgspec.Meta(ge=0)] = 10_000
    price: Annotated[int, msgspec.Meta(ge=0)] = 1000
    prefix: str = "sku-"
    #: True: a SKU's stock is ``stock`` times its weight relative to the top SKU (at least 10).
    stock_follows_weight: bool = False


class Scenario(_Spec):
    name: str
    phase: list[Phase]
    catalog: Catalog | None = None
    sku: list[SkuSpec] = []
    distributors: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 4
    #: Starting balance of each distributor (minor units).
    balance: Annotated[int, msgspec.Meta(ge=0)] = 10**12
    #: qty -> share (normalised).
    qty_mix: dict[int, float] = msgspec.field(default_factory=lambda: {1: 1.0})
    reserve_share: Share = 0.0
    confirm_share: Share = 1.0
    retry_share: Share = 0.0
    #: A retry goes out up to this long after the original (so some overlap it in flight).
    retry_delay_s: Annotated[float, msgspec.Meta(ge=0.0)] = 0.05
    reserve_ttl_s: Annotated[int, msgspec.Meta(ge=1)] = 300
    timeout_s: Positive = 5.0
    connections: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 64
    #: "uniform" (evenly spaced) or "poisson" arrivals.
    arrivals: str = "poisson"
    seed: int = 1

    def __post_init__(self) -> None:
        if not self.phase:
            raise msgspec.ValidationError("a scenario needs at least one [[phase]]")
        if self.arrivals not in ("uniform", "poisson"):
            raise msgspec.ValidationError('arrivals must be "uniform" or "poisson"')
        if not self.qty_mix or any(q < 1 or w < 0 for q, w in self.qty_mix.items()) or sum(self.qty_mix.values()) <= 0:
            raise msgspec.ValidationError("qty_mix maps qty >= 1 to non-negative shares")
        known = {s.sku for s in self.skus()}
        for p in self.phase:
            for s in p.skus or ():
                if s not in known:
                    raise msgspec.ValidationError(f"phase names unknown SKU {s!r}")

    @property
    def duration_s(self) -> float:
        return sum(p.duration_s for p in self.phase)

    def skus(self) -> list[SkuSpec]:
        """Every SKU of the scenario: the explicit ones, then the generated catalog."""
        out = list(self.sku)
        c = self.catalog
        if c is not None:
            width = max(3, len(str(c.sku_count - 1)))
            for i in range(c.sku_count):
                w = 1.0 / (i + 1) ** c.zipf_s
                n = max(10, math.ceil(c.stock * w)) if c.stock_follows_weight else c.stock
                out.append(SkuSpec(sku=f"{c.prefix}{i:0{width}d}", stock=n, price=c.price, weight=w))
        if not out:
            raise msgspec.ValidationError("a scenario needs SKUs: [[sku]] entries or a [catalog]")
        return out

    def expected_requests(self) -> float:
        return sum(p.duration_s * (p.rate + (p.rate if p.rate_end is None else p.rate_end)) / 2 for p in self.phase)


def load(path: str | Path) -> Scenario:
    """A scenario from a TOML file (unknown keys are errors)."""
    with open(path, "rb") as f:
        return msgspec.toml.decode(f.read(), type=Scenario)


def scaled(s: Scenario, *, duration_s: float | None = None, rate_scale: float = 1.0) -> Scenario:
    """*s* with its phases stretched to *duration_s* and its rates multiplied by
    *rate_scale*; stock scales with the demand so thin stays thin and ample stays ample."""
    time_scale = 1.0 if duration_s is None else duration_s / s.duration_s
    demand = time_scale * rate_scale

    def stock(n: int) -> int:
        return n if demand == 1.0 else max(10, math.ceil(n * demand))

    phases = [msgspec.structs.replace(p, duration_s=p.duration_s * time_scale, rate=p.rate * rate_scale,
                                      rate_end=None if p.rate_end is None else p.rate_end * rate_scale)
              for p in s.phase]
    catalog = None if s.catalog is None else msgspec.structs.replace(s.catalog, stock=stock(s.catalog.stock))
    skus = [msgspec.structs.replace(k, stock=stock(k.stock)) for k in s.sku]
    return msgspec.structs.replace(s, phase=phases, catalog=catalog, sku=skus)


# ---- presets ----------------------------------------------------------------------------
# Sized for one daemon worker on a small machine (see bench/README.md): the generator
# shares the cores with the daemon and Redis.

_MIX = {1: 0.80, 2: 0.12, 5: 0.06, 10: 0.02}

PRESETS: dict[str, Scenario] = {
    "steady": Scenario(
        name="steady", phase=[Phase(duration_s=60, rate=800, label="steady")],
        catalog=Catalog(sku_count=20, zipf_s=0.5, stock=20_000, price=1000),
        distributors=8, qty_mix=_MIX, reserve_share=0.10, confirm_share=0.7, retry_share=0.05),
    "ramp": Scenario(
        name="ramp", phase=[Phase(duration_s=60, rate=100, rate_end=2500, label="ramp"),
                            Phase(duration_s=15, rate=2500, label="hold")],
        catalog=Catalog(sku_count=20, zipf_s=0.8, stock=50_000, price=1000, stock_follows_weight=True),
        distributors=8, qty_mix=_MIX, reserve_share=0.10, confirm_share=0.7, retry_share=0.05),
    "flash-sale": Scenario(
        name="flash-sale",
        sku=[SkuSpec(sku="flash-a", stock=4000, weight=3, price=4900),
             SkuSpec(sku="flash-b", stock=3000, weight=2, price=9900),
             SkuSpec(sku="flash-c", stock=2000, weight=1, price=19900)],
        catalog=Catalog(sku_count=20, zipf_s=0.8, stock=8_000, price=1000, stock_follows_weight=True),
        phase=[Phase(duration_s=15, rate=250, label="before"),
               Phase(duration_s=2, rate=250, rate_end=2500, skus=["flash-a", "flash-b", "flash-c"], label="spike"),
               Phase(duration_s=10, rate=2500, skus=["flash-a", "flash-b", "flash-c"], label="sale"),
               Phase(duration_s=15, rate=250, label="after")],
        distributors=16, qty_mix={1: 0.7, 2: 0.2, 5: 0.1}, reserve_share=0.05, confirm_share=0.8,
        retry_share=0.10, retry_delay_s=0.02, timeout_s=3.0, connections=128),
    # A day of recharges compressed to three minutes: night, morning, lunch, evening peak, late.
    "holiday-recharge": Scenario(
        name="holiday-recharge",
        catalog=Catalog(sku_count=300, zipf_s=1.1, stock=100_000, price=2000, prefix="rc-",
                        stock_follows_weight=True),
        phase=[Phase(duration_s=20, rate=150, rate_end=400, label="night"),
               Phase(duration_s=30, rate=400, rate_end=1200, label="morning"),
               Phase(duration_s=30, rate=1200, rate_end=900, label="midday"),
               Phase(duration_s=40, rate=900, rate_end=2000, label="evening"),
               Phase(duration_s=40, rate=2000, label="peak"),
               Phase(duration_s=20, rate=2000, rate_end=300, label="late")],
        distributors=32, qty_mix={1: 0.6, 2: 0.2, 3: 0.1, 5: 0.07, 10: 0.03}, reserve_share=0.15,
        confirm_share=0.75, retry_share=0.05, connections=96),
}


def preset(name: str) -> Scenario:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r} (one of {', '.join(PRESETS)})") from None
