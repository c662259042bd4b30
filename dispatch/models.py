"""The public data types: what the engine returns and the HTTP API encodes.

Amounts are integers in minor units (cents); times are UTC datetimes.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "Id", "Amount", "Buckets", "Code", "CodeRule", "Order", "OrderPage", "Sku", "Supplier", "Tier", "Distributor",
    "NewDistributor", "Balance", "Stock", "BatchReport", "MalformedLine", "DuplicateLine", "LedgerEntry", "Statement",
    "StatementLine", "Limits", "Verification", "TierWindow", "TierRule", "TierRuleList", "TierRules", "TierStatus",
    # sub-distributors
    "AccountId", "SubDistributor", "NewSubDistributor", "SubOrder", "SubOrderPage", "MAX_SUB_DEPTH",
    "OrderStatus", "StockStatus",
    # after-sales
    "Ticket", "TicketStatus", "SupplierStats", "SupplierReport", "BatchSummary", "Forecast", "Event", "EventPage",
    "SkuDetail",
    # daemon
    "Access", "CatalogItem", "KeyRotation", "RateLimit",
    # admins
    "Role", "ROLES", "AdminToken", "NewAdminToken", "AuditEntry", "AuditPage",
]

#: Ids chosen by the admin: SKUs, suppliers, tiers, distributors, batches.
Id = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
#: A distributor's id, or a sub-distributor's: its parent's id, "~" and its own name (an Id),
#: at most MAX_SUB_DEPTH levels below a distributor (store/keys.py, acct_tag).
MAX_SUB_DEPTH = 3
ACCOUNT_PATTERN = r"[A-Za-z0-9._-]{1,64}(~[A-Za-z0-9._-]{1,64}){0,%d}" % MAX_SUB_DEPTH
AccountId = Annotated[str, msgspec.Meta(pattern="^" + ACCOUNT_PATTERN + "$")]
Buckets = Annotated[int, msgspec.Meta(ge=1, le=16, description="buckets: an integer from 1 to 16")]
Amount = Annotated[int, msgspec.Meta(ge=0, le=10**15)]

OrderStatus = Literal["pending", "reserved", "delivered", "cancelled", "expired", "refunded",
                      "partially_refunded"]
StockStatus = Literal["in_stock", "low_stock", "out_of_stock"]


class _Model(msgspec.Struct, omit_defaults=False, forbid_unknown_fields=True):
    """Encoded with every field, nulls and zeros included: a reply always has the same keys."""


class Code(_Model, frozen=True):
    """One delivered card code, decrypted for its buyer."""

    code: str
    pin: str | None = None
    serial: str | None = None
    expires_at: str | None = None

    def __repr__(self) -> str:  # never print a secret by accident
        return "Code(<redacted>)"


class Order(_Model):
    order_id: str
    external_ref: str
    sku: str
    qty: int
    unit_price: int
    total: int
    currency: str
    status: OrderStatus
    codes: list[Code]
    created_at: datetime
    updated_at: datetime
    mode: Literal["deliver", "reserve"] = "deliver"
    #: When a reservation lapses (reserve mode only).
    reserve_expires_at: datetime | None = None
    #: True when this answer replays an order made earlier with the same external_ref.
    replayed: bool = False
    #: Refunded by approved tickets (never more than total).
    refunded: int = 0


class OrderPage(_Model):
    orders: list[Order]
    next_cursor: str | None = None


#: The ISO 4217 codes of the currencies in use (funds and metals aside, a few fund
#: codes kept since prices are sometimes quoted in them).
CURRENCIES = frozenset("""
AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN BZD
CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS
GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT
LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD
OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP
SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XCD XCG XOF
XPF YER ZAR ZMW ZWG
""".split())


#: The character classes a CodeRule may ask for.
CHARSETS = {"digits": "0-9", "alphanumeric": "A-Za-z0-9", "upper_alphanumeric": "A-Z0-9", "hex": "0-9A-Fa-f"}


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


class CodeRule(_Model, frozen=True):
    """What a SKU's codes (or PINs) must look like: an imported line that does not
    conform is malformed. Every part is optional."""

    min_length: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 1
    max_length: Annotated[int, msgspec.Meta(ge=1, le=4096)] | None = None
    charset: Literal["digits", "alphanumeric", "upper_alphanumeric", "hex"] | None = None
    #: A regular expression (Python syntax) the whole value must match.
    pattern: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < self.min_length:
            raise ValueError(f"max_length {self.max_length} is below min_length {self.min_length}")
        if self.pattern is not None:
            try:
                _regex(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern is not a regular expression: {e}") from None

    def violation(self, value: str, what: str = "code") -> str | None:
        """Why *value* does not conform (naming it *what*), or None."""
        if len(value) < self.min_length:
            return f"{what} shorter than {self.min_length} characters"
        if self.max_length is not None and len(value) > self.max_length:
            return f"{what} longer than {self.max_length} characters"
        if self.charset is not None and not _regex(f"[{CHARSETS[self.charset]}]*").fullmatch(value):
            return f"{what} has characters outside {self.charset}"
        if self.pattern is not None and not _regex(self.pattern).fullmatch(value):
            return f"{what} does not match the SKU's pattern"
        return None


class Sku(_Model):
    sku: Id
    name: str
    face_value: Amount
    currency: str
    price: Amount
    low_stock_threshold: Amount = 0
    status: Literal["active", "paused"] = "active"
    #: Which batch sells first: the oldest, or the one whose supplier is rated best.
    sale_order: Literal["oldest_first", "best_rated", "first_expiring"] = "oldest_first"
    #: What an approved ticket gives the buyer by default: its money back, or another code.
    after_sales: Literal["refund", "replace"] = "refund"
    #: Shards the SKU's stock is spread over (on a Redis Cluster, over several masters):
    #: new imports are split between them; an order takes from one, another if it is empty.
    buckets: Buckets = 1
    #: What its codes and PINs must look like (imports): None takes any.
    code_rule: CodeRule | None = None
    pin_rule: CodeRule | None = None
    #: Given away: only a free SKU may have a price of 0.
    free: bool = False
    #: A code is sold only while it has more than this left before its expires_at, and
    #: refused at import if it has no more.
    min_shelf_life_s: Amount = 0

    def __post_init__(self) -> None:
        if self.currency not in CURRENCIES:
            raise ValueError(f"currency {self.currency!r} is not an ISO 4217 code (three capitals, such as USD)")
        if self.price == 0 and not self.free:
            raise ValueError("price 0 is only for a SKU marked free (free: true)")


class Supplier(_Model):
    supplier: Id
    name: str
    #: What after-sales refunds are charged to; negative when the supplier owes.
    deposit: int = 0
    status: Literal["active", "blacklisted"] = "active"


class Tier(_Model):
    tier: Id
    discount_bps: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    prices: dict[str, Amount] = {}

    def price_of(self, sku: Sku) -> int:
        explicit = self.prices.get(sku.sku)
        if explicit is not None:
            return explicit
        # round half up, in integer arithmetic
        return (sku.price * (10_000 - self.discount_bps) + 5_000) // 10_000


class Distributor(_Model):
    distributor: AccountId
    name: str
    tier: str | None = None
    credit_limit: Amount = 0
    #: None: every SKU.
    allowed_skus: list[str] | None = None
    status: Literal["active", "suspended"] = "active"
    balance: int = 0
    held: int = 0


class SubDistributor(_Model):
    """A sub-distributor as its parent manages it: its price is the parent's plus its
    markup (per SKU in ``markups`` where set, else ``markup_bps`` of the parent's price,
    rounded half up); it buys from its own prepaid balance."""

    subdistributor: AccountId
    parent: AccountId
    name: str
    status: Literal["active", "suspended"] = "active"
    #: None: every SKU its parent may buy.
    allowed_skus: list[str] | None = None
    markup_bps: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    markups: dict[str, Amount] = {}
    #: Levels below its root distributor (1 to MAX_SUB_DEPTH).
    depth: int = 1
    balance: int = 0
    held: int = 0


class NewSubDistributor(_Model):
    subdistributor: SubDistributor
    #: Shown once: only its hash is stored.
    api_key: str

    def __repr__(self) -> str:
        return f"NewSubDistributor({self.subdistributor.subdistributor!r}, api_key=<redacted>)"


class SubOrder(_Model):
    """A sub-distributor's order as its parent sees it: never its codes."""

    order_id: str
    external_ref: str
    sku: str
    qty: int
    delivered: int
    unit_price: int
    total: int
    currency: str
    status: OrderStatus
    refunded: int
    created_at: datetime
    updated_at: datetime
    #: What the parent earns on it: its margin per code times the codes paid and kept.
    margin: int


class SubOrderPage(_Model):
    orders: list[SubOrder]
    next_cursor: str | None = None


class NewDistributor(_Model):
    distributor: Distributor
    #: Shown once: only its hash is stored.
    api_key: str

    def __repr__(self) -> str:
        return f"NewDistributor({self.distributor.distributor!r}, api_key=<redacted>)"


class Balance(_Model):
    balance: int
    held: int
    credit_limit: int
    #: What can still be spent: balance - held + credit_limit.
    available: int


class Stock(_Model):
    sku: str
    accepted: int
    available: int
    reserved: int
    sold: int
    voided: int
    invalidated: int
    stock_status: StockStatus
    #: Codes of blacklisted suppliers, kept off sale.
    parked: int = 0
    #: Codes that reached their sell-by (expires_at - min_shelf_life_s) unsold.
    expired: int = 0
    #: Codes on sale that reach their sell-by within expiring_window_s (as of the last sweep).
    expiring: int = 0
    forecast: Forecast | None = None


class SkuDetail(Sku, kw_only=True):
    """A SKU with its stock and restock forecast."""

    stock: Stock


class MalformedLine(_Model, frozen=True):
    line: int
    reason: str


class DuplicateLine(_Model, frozen=True):
    """A line whose code was not taken because the code was there already: earlier in this file
    (``this_file``), in an earlier batch of this SKU (``this_sku``) or of another SKU
    (``other_sku``). ``batch_id`` names that batch when it is the same supplier's; another
    supplier's batch is not named."""

    line: int
    of: Literal["this_file", "this_sku", "other_sku"]
    batch_id: str | None = None


class BatchReport(_Model):
    batch_id: str
    sku: str
    supplier: str
    accepted: int
    duplicate: int
    malformed: int
    malformed_lines: list[MalformedLine]
    #: True when malformed_lines was cut to its first entries.
    malformed_truncated: bool = False
    #: True when this answers a batch sent before with the same id and content: nothing was added.
    replayed: bool = False
    duplicate_lines: list[DuplicateLine] = []
    #: True when duplicate_lines was cut to its first entries.
    duplicate_truncated: bool = False


class LedgerEntry(_Model):
    entry_id: str
    #: Distributors: topup, hold, release, purchase, expire, refund. Suppliers: deposit, charge.
    kind: Literal["topup", "hold", "release", "purchase", "expire", "refund", "deposit", "charge"]
    ref: str
    #: Change of the balance (negative for a purchase).
    amount: int
    #: Change of the held amount.
    held_delta: int
    balance: int
    held: int
    at: datetime


class Limits(_Model, omit_defaults=False):
    """A distributor's transaction limits, in codes or minor units; 0 is no limit. They
    are checked atomically with each purchase: concurrent orders cannot overshoot one."""

    max_order_qty: Annotated[int, msgspec.Meta(ge=0, le=10**6)] = 0
    max_order_amount: Amount = 0
    #: Spend (paid or held) in a day and in a calendar month, UTC.
    daily: Amount = 0
    monthly: Amount = 0
    #: What the current day and month have spent (reads only; counted while a daily or
    #: monthly limit is set; a reservation that ends unpaid gives its spend back).
    spent_today: int = 0
    spent_this_month: int = 0


#: The spend volume tiers follow: the last 30 UTC days (today included), or the last
#: whole calendar month (UTC), which sets the tier for the month that follows it.
TierWindow = Literal["rolling_30d", "calendar_month"]


class TierRule(_Model):
    """Spend of at least ``min_spend`` (minor units) in the window earns ``tier``."""

    min_spend: Amount
    tier: Id


#: Tier rules: ascending by ``min_spend``, each tier at most once.
TierRuleList = Annotated[list[TierRule], msgspec.Meta(max_length=32)]


class TierRules(_Model):
    """Volume tiers: a distributor that is not pinned gets the tier of the highest rule
    its spend reaches (none reached: no tier, the base price). No rules: tiers are
    set by hand only."""

    window: TierWindow = "rolling_30d"
    rules: TierRuleList = []
    #: Grows with every change of the rules (reads only).
    version: int = 0


class TierStatus(_Model, omit_defaults=False):
    """A distributor's tier, the spend it follows and what the next rule needs."""

    distributor: str
    tier: str | None
    #: Pinned: set by hand, the rules leave it alone.
    pinned: bool
    #: None: there are no tier rules.
    window: TierWindow | None
    #: The UTC days (inclusive) of the spend that sets the tier.
    window_from: date
    window_to: date
    #: What was paid for purchases in the window, net of refunds.
    spend: int
    #: calendar_month: this month's spend so far (it sets next month's tier); else as ``spend``.
    accruing: int
    #: The next rule above ``accruing`` (None: none above).
    next_tier: str | None = None
    next_min_spend: int | None = None


class Verification(_Model, omit_defaults=False):
    """A distributor's real-name verification (the ID number is stored encrypted and
    shown only by its last 4 characters)."""

    status: Literal["verified", "unverified"]
    legal_name: str | None = None
    id_type: str | None = None
    id_number_last4: str | None = None
    verified_at: datetime | None = None
    verified_by: str | None = None


class StatementLine(_Model, omit_defaults=False):
    """The entries of one kind in a statement's month."""

    kind: str
    count: int
    #: Their changes of the balance, and of the held amount, summed.
    amount: int
    held_delta: int


class Statement(_Model, omit_defaults=False):
    """A distributor's month (UTC), from its ledger: opening + lines = closing."""

    distributor: str
    #: ``YYYY-MM``
    month: str
    #: Balance and held amount before the month's first entry (0 before any).
    opening_balance: int
    opening_held: int
    #: One line per kind of entry the month holds, by kind.
    lines: list[StatementLine]
    closing_balance: int
    closing_held: int
    #: Every entry up to the closing that carries its running balance and held amount
    #: (the last of each script call's) agrees with the sums of the entries up to it;
    #: false means a ledger off its own sums (``audit()`` says where).
    reconciled: bool


# ---- after-sales ---------------------------------------------------------------------

TicketStatus = Literal["open", "approving", "approved", "rejected"]


class Ticket(_Model):
    """An after-sales claim on one delivered code."""

    ticket_id: str
    order_id: str
    sku: str
    #: Which of the order's codes (0-based, in the order's `codes`).
    code_index: int
    reason: str
    status: TicketStatus
    created_at: datetime
    updated_at: datetime
    #: Once approved: "refund" (the unit price came back) or "replaced" (see replacement).
    outcome: Literal["refund", "replaced"] | None = None
    refund: int = 0
    #: The code given instead of the invalid one (shown to its buyer and admins).
    replacement: Code | None = None
    #: The admin's note with the decision.
    note: str | None = None
    distributor: str | None = None


class Forecast(_Model):
    """Restock forecast of a SKU from its recent sales."""

    #: Codes sold a day, weighted toward recent days.
    daily_velocity: float
    daily_stddev: float
    #: Days the available codes last at that pace (None: nothing sold lately).
    days_of_cover: float | None
    #: Codes to order now to cover the lead time and review period with safety stock.
    reorder_qty: int
    #: Days of history the figures rest on.
    history_days: int


class BatchSummary(_Model):
    batch_id: str
    sku: str
    supplier: str
    unit_cost: int
    status: Literal["importing", "imported", "voided", "parked"]
    accepted: int
    duplicate: int
    malformed: int
    voided: int
    delivered: int
    invalidated: int
    created_at: datetime
    expired: int = 0


class SupplierStats(_Model):
    """A supplier with the quality of what it delivered."""

    supplier: str
    name: str
    status: Literal["active", "blacklisted"]
    deposit: int
    #: Codes of this supplier delivered to buyers (invalidated ones included).
    delivered: int
    invalidated: int
    #: invalidated / delivered (0 before anything was delivered).
    invalid_rate: float
    #: 0-100: the share of good codes, smoothed toward 100 for small samples.
    rating: float
    blacklist_reason: str | None


class SupplierReport(SupplierStats):
    """A supplier's stats and each of its batches."""

    batches: list[BatchSummary]


class Event(_Model):
    """Something that happened, as its shard's event stream keeps it (never a code)."""

    #: The stream entry id: increases within one stream.
    event_id: str
    #: order.delivered, order.cancelled, order.expired, order.refunded, ticket.opened,
    #: ticket.approved, ticket.rejected, stock.low, stock.out, stock.restored,
    #: supplier.blacklisted, supplier.reinstated, distributor.tier_changed
    type: str
    #: "order:<id>", "ticket:<id>", "stock:<sku>", "supplier:<id>", "distributor:<id>"
    entity: str
    #: The entity's version: anything older than what a receiver holds is stale.
    version: int
    at: datetime
    data: dict[str, Any]


class EventPage(_Model):
    events: list[Event]
    #: Pass back as ``after`` for the next page (None: nothing more yet).
    next_after: str | None = None


# ---- daemon ------------------------------------------------------------------------

#: Requests a second allowed to one distributor through the daemon; 0: unlimited.
RateLimit = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]


class Access(_Model):
    """Who an API key belongs to, and the request rate the daemon allows it."""

    distributor: str
    rate_limit: int = 0


class CatalogItem(_Model):
    """A SKU as one distributor sees it: its tier price and how much is left."""

    sku: str
    name: str
    face_value: int
    currency: str
    #: This distributor's unit price (its tier's).
    price: int
    stock_status: StockStatus


class KeyRotation(_Model):
    """A new master key and the keys to keep for decryption (all base64), shown once."""

    master_key: str
    old_master_keys: list[str]

    def __repr__(self) -> str:
        return "KeyRotation(<redacted>)"


# ---- admins --------------------------------------------------------------------------

#: What an admin token may do (dispatch/admins.py): viewer reads; operator runs the
#: catalog, stock and distributors' accounts; finance moves money; owner does everything.
Role = Literal["viewer", "operator", "finance", "owner"]
ROLES: tuple[str, ...] = ("viewer", "operator", "finance", "owner")


class AdminToken(_Model):
    """A named admin token (never the token: only its hash is kept)."""

    name: Id
    role: Role
    created_at: datetime
    #: The admin who created it.
    created_by: str


class NewAdminToken(_Model):
    token: AdminToken
    #: Shown once: only its hash is stored.
    secret: str

    def __repr__(self) -> str:
        return f"NewAdminToken({self.token!r}, <redacted>)"


class AuditEntry(_Model):
    """One admin write, as the audit trail keeps it (never a secret: no key, token,
    code or ID number)."""

    #: The trail's entry id: increases with time.
    entry_id: str
    at: datetime
    #: Who: an admin token's name, ``owner`` (the configured token), ``cli:<user>``, or
    #: ``engine:<user>`` for an application embedding the engine.
    actor: str
    #: Through what: ``POST /admin/...`` (the route), ``cli`` or ``engine``.
    via: str
    #: The engine action (``topup``, ``update_sku``...); for a refusal, the route's.
    action: str
    #: ``kind:id`` of what it changes (``distributor:acme``, ``sku:g100``...).
    target: str
    #: ``ok``, or the error code it failed with (``forbidden``: refused for the token's role,
    #: before anything was read or changed).
    outcome: str
    #: The target's state just before and just after (null: it did not exist, or nothing
    #: is read for this kind of target).
    before: Any = None
    after: Any = None


class AuditPage(_Model):
    """Audit entries, the most recent first."""

    entries: list[AuditEntry]
    #: Pass back as ``cursor`` for the next (older) page; null on the last.
    next_cursor: str | None = None
