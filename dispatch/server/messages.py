"""The HTTP API's own messages: request bodies, query strings, and the responses the
engine's models do not cover. Decoding is strict: an unknown field, a wrong type or
an out-of-range value is a 422 naming the field. The OpenAPI document is generated
from these types and the engine's models (see openapi.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import UNSET, UnsetType

from ..imports import MAX_FIELD_LENGTH
from ..models import (CURRENCIES, AccountId, AdminToken, Amount, BatchSummary, Buckets, CodeRule, Distributor, Id,
                      OrderStatus, RateLimit, Role, SkuDetail, SubDistributor, Supplier, SupplierStats, Ticket,
                      TicketStatus, Tier, TierRuleList, TierWindow)
from ..records import MAX_REF, MAX_TEXT, REF_PATTERN, TEXT_PATTERN
from ..webhooks import MAX_URL, URL_PATTERN, FailedDelivery

__all__ = [
    "Empty", "OrderRequest", "OrderQuery", "SkuCreate", "SkuPatch", "SupplierCreate", "TierCreate",
    "DistributorCreate", "DistributorPatch", "TopupRequest", "SubCreate", "SubPatch", "SubList", "SubOrderQuery", "BatchQuery", "ExportQuery",
    "ErrorBody", "ErrorDetail", "Status", "NewKey", "AdminDistributor", "CreatedDistributor", "VoidReport",
    # after-sales
    "TicketCreate", "TicketQuery", "AdminTicketQuery", "TicketResolve", "TicketList", "SupplierPatch",
    "DepositRequest", "SupplierList", "OrderExportQuery", "EventQuery", "StatementQuery",
    "LimitsSet", "VerificationSet", "TierRulesSet", "TierPin", "WebhookSet", "WebhookSecret",
    "FailedQuery", "FailedList", "Replayed",
    # admins
    "TokenCreate", "TokenList", "AuditQuery",
    # admin reads
    "PageQuery", "SkuList", "BatchList", "DistributorList", "TierList", "Live", "StoreHealth", "Overview",
]

Ref = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REF, pattern=REF_PATTERN)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
#: ISO 4217 (models.CURRENCIES).
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$", extra_json_schema={"enum": sorted(CURRENCIES)})]
Seconds = Annotated[int, msgspec.Meta(ge=1)]
Aware = Annotated[datetime, msgspec.Meta(tz=True)]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT, pattern=TEXT_PATTERN)]
#: Which batch sells first: the oldest, or the one whose supplier is rated best.
SaleOrder = Literal["oldest_first", "best_rated", "first_expiring"]
#: What an approved ticket gives by default: the money back, or another code.
AfterSalesDefault = Literal["refund", "replace"]
OrderId = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-HJKMNP-TV-Z]{26}$")]
TicketId = Annotated[str, msgspec.Meta(pattern=r"^tk_[0-9A-HJKMNP-TV-Z]{26}$")]
PageSize = Annotated[int, msgspec.Meta(ge=1, le=500)]


class _In(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


# ---- requests ------------------------------------------------------------------------

class Empty(_In):
    """The body of an endpoint that takes none: absent, or ``{}``."""


class OrderRequest(_In):
    #: reserve_ttl_s only with mode reserve (the OpenAPI document says so: openapi.py).
    __schema_extra__: ClassVar[dict[str, Any]] = {
        "anyOf": [{"properties": {"mode": {"const": "reserve"}}, "required": ["mode"]},
                  {"properties": {"reserve_ttl_s": {"type": "null"}}}]}

    sku: Id
    qty: Annotated[int, msgspec.Meta(ge=1)]
    #: Your own id for the order: the idempotency key.
    external_ref: Ref
    mode: Literal["deliver", "reserve"] = "deliver"
    #: Lease of a reservation (reserve mode only); the server's default when absent.
    reserve_ttl_s: Seconds | None = None
    #: Refuse the order (409 price_changed) if the unit price is above this.
    max_unit_price: Amount | None = None
    #: Deliver what is in stock (at least one) rather than refuse.
    allow_partial: bool = False


class OrderQuery(_In):
    """``external_ref`` alone asks for one order; otherwise a page of orders."""

    external_ref: Ref | None = None
    status: OrderStatus | None = None
    since: Aware | None = None
    cursor: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


#: A price of 0 only with free: true (the OpenAPI document says so: openapi.py).
_FREE_OR_PRICED: dict[str, Any] = {"anyOf": [{"properties": {"price": {"minimum": 1}}},
                                             {"properties": {"free": {"const": True}}, "required": ["free"]}]}


class SkuCreate(_In):
    __schema_extra__: ClassVar[dict[str, Any]] = _FREE_OR_PRICED
    sku: Id
    name: Name
    face_value: Amount
    currency: Currency
    price: Amount
    low_stock_threshold: Amount = 0
    sale_order: SaleOrder = "oldest_first"
    after_sales: AfterSalesDefault = "refund"
    buckets: Buckets = 1
    code_rule: CodeRule | None = None
    pin_rule: CodeRule | None = None
    #: Given away: only a free SKU may have a price of 0.
    free: bool = False
    #: Seconds a code must have left before its expires_at to be imported or sold.
    min_shelf_life_s: Amount = 0


class SkuPatch(_In):
    """A change that would leave a SKU not free with a price of 0 is a conflict (409)."""
    name: Name | UnsetType = UNSET
    price: Amount | UnsetType = UNSET
    low_stock_threshold: Amount | UnsetType = UNSET
    status: Literal["active", "paused"] | UnsetType = UNSET
    sale_order: SaleOrder | UnsetType = UNSET
    after_sales: AfterSalesDefault | UnsetType = UNSET
    buckets: Buckets | UnsetType = UNSET
    #: null: any code (or PIN) is taken from then on.
    code_rule: CodeRule | None | UnsetType = UNSET
    pin_rule: CodeRule | None | UnsetType = UNSET
    free: bool | UnsetType = UNSET
    min_shelf_life_s: Amount | UnsetType = UNSET


class SupplierCreate(_In):
    supplier: Id
    name: Name
    deposit: Amount = 0


class TierCreate(_In):
    tier: Id
    discount_bps: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    #: Explicit unit prices by SKU, over the discount.
    prices: dict[Id, Amount] = {}


class DistributorCreate(_In):
    distributor: Id
    name: Name
    tier: Id | None = None
    credit_limit: Amount = 0
    #: Absent or null: every SKU.
    allowed_skus: list[Id] | None = None
    #: Requests a second through the daemon; absent: the server's default_rate_limit.
    rate_limit: RateLimit | None = None


class DistributorPatch(_In):
    name: Name | UnsetType = UNSET
    tier: Id | None | UnsetType = UNSET
    credit_limit: Amount | UnsetType = UNSET
    allowed_skus: list[Id] | None | UnsetType = UNSET
    status: Literal["active", "suspended"] | UnsetType = UNSET
    rate_limit: RateLimit | UnsetType = UNSET


MarkupBps = Annotated[int, msgspec.Meta(ge=0, le=100_000)]


class SubCreate(_In):
    #: Its own name: its id is yours, "~" and this (returned as ``subdistributor``).
    subdistributor: Id
    name: Name
    #: Its markup over your price: per SKU (minor units) where given, else in basis points.
    markup_bps: MarkupBps = 0
    markups: dict[Id, Amount] = {}
    #: Absent or null: every SKU you may buy.
    allowed_skus: list[Id] | None = None


class SubPatch(_In):
    name: Name | UnsetType = UNSET
    status: Literal["active", "suspended"] | UnsetType = UNSET
    allowed_skus: list[Id] | None | UnsetType = UNSET
    markup_bps: MarkupBps | UnsetType = UNSET
    markups: dict[Id, Amount] | UnsetType = UNSET


class SubOrderQuery(_In):
    #: The next_cursor of the previous page; absent: the first page.
    cursor: OrderId | None = None
    limit: PageSize = 50


class TopupRequest(_In):
    amount: Annotated[int, msgspec.Meta(ge=1, le=10**15)]
    #: Your id for the payment: a repeat with the same reference credits once.
    reference: Ref


class BatchQuery(_In):
    sku: Id
    supplier: Id
    unit_cost: Amount
    #: Resend with the same batch_id to resume an interrupted upload.
    batch_id: Id | None = None


class ExportQuery(_In):
    from_: Aware | None = msgspec.field(default=None, name="from")
    to: Aware | None = None


class OrderExportQuery(ExportQuery):
    #: ``plain`` shows the codes in clear (an explicit admin request); masked by default.
    codes: Literal["masked", "plain"] = "masked"


# ---- after-sales -----------------------------------------------------------------------

class TicketCreate(_In):
    order_id: OrderId
    #: The code that does not work, as it was delivered.
    code: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_FIELD_LENGTH)]
    reason: Text


class TicketQuery(_In):
    status: TicketStatus | None = None


class AdminTicketQuery(TicketQuery):
    distributor: AccountId | None = None
    #: The next_cursor of the previous page; absent: the first page.
    cursor: TicketId | None = None
    limit: PageSize = 100


class PageQuery(_In):
    """A page of a list ordered by id."""

    #: The next_cursor of the previous page; absent: the first page.
    cursor: AccountId | None = None
    limit: PageSize = 100


class TicketResolve(_In):
    decision: Literal["approve", "reject"]
    #: Deliver another code instead of refunding; absent: the SKU's after_sales.
    replace: bool | None = None
    note: Text | None = None


class SupplierPatch(_In):
    name: Name | UnsetType = UNSET
    #: blacklisted: its unsold codes leave sale (parked or voided); active: parked ones return.
    status: Literal["active", "blacklisted"] | UnsetType = UNSET
    #: Why (kept with a blacklisting).
    reason: Text = "manual"


class DepositRequest(_In):
    amount: Annotated[int, msgspec.Meta(ge=1, le=10**15)]
    #: Your id for the payment: a repeat with the same reference credits once.
    reference: Ref


class EventQuery(_In):
    #: Whose events: ``dist:<id>``, ``sku:<id>`` or ``supplier:<id>``.
    stream: Annotated[str, msgspec.Meta(pattern=r"^(dist|sku|supplier):[A-Za-z0-9._-]{1,64}$")]
    #: The last event id you have; absent: from the oldest kept.
    after: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,20}-[0-9]{1,20}(\.[0-9]{1,6})?$")] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100

    def __post_init__(self) -> None:
        if self.after is not None and any(int(p) >= 1 << 64 for p in self.after.split(".")[0].split("-")):
            raise ValueError(f"after {self.after!r}: each part of a stream id is below 2^64")


class WebhookSet(_In):
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_URL, pattern=URL_PATTERN)]


class TierRulesSet(_In):
    """The volume tier rules, replacing the ones set before (no rules: tiers by hand only)."""

    window: TierWindow = "rolling_30d"
    rules: TierRuleList = []


class TierPin(_In):
    """Pin a distributor to a tier (null: no tier, the base price); the rules leave it alone."""

    tier: Id | None


class LimitsSet(_In):
    """Every limit at once; an absent one (or 0) is no limit."""

    max_order_qty: Annotated[int, msgspec.Meta(ge=0, le=10**6)] = 0
    max_order_amount: Amount = 0
    daily: Amount = 0
    monthly: Amount = 0


class VerificationSet(_In):
    legal_name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    id_type: Literal["national_id", "passport", "business_license", "other"]
    id_number: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    #: Who checked the documents.
    verified_by: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class StatementQuery(_In):
    #: ``json`` (the default) or ``csv``: its opening, a line per kind, its closing.
    format: Literal["json", "csv"] = "json"


class FailedQuery(_In):
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


# ---- responses -------------------------------------------------------------------------

class _Out(msgspec.Struct, omit_defaults=False):
    """A reply: every field is sent, zeros and nulls included."""


class ErrorDetail(msgspec.Struct):
    code: str
    message: str
    #: True when the same request may succeed if sent again (later).
    retryable: bool


class ErrorBody(_Out):
    error: ErrorDetail


class Status(_Out):
    status: str


class NewKey(_Out):
    distributor: str
    #: Shown once: only its hash is stored. The previous key stops working.
    api_key: str


class AdminDistributor(Distributor):
    #: Requests a second through the daemon (0: unlimited).
    rate_limit: int = 0


class CreatedDistributor(_Out):
    distributor: AdminDistributor
    #: Shown once: only its hash is stored.
    api_key: str


class VoidReport(_Out):
    batch_id: str
    #: Unsold codes withdrawn from the pool now.
    voided: int


class TicketList(_Out):
    tickets: list[Ticket]
    #: Pass back as ``cursor`` for the next page (null: this is the last).
    next_cursor: str | None = None


class SupplierList(_Out):
    suppliers: list[SupplierStats]
    #: Pass back as ``cursor`` for the next page (null: this is the last).
    next_cursor: str | None = None


class SkuList(_Out):
    #: Each SKU with its stock and restock forecast.
    skus: list[SkuDetail]
    #: Pass back as ``cursor`` for the next page (null: this is the last).
    next_cursor: str | None = None


class DistributorList(_Out):
    distributors: list[AdminDistributor]
    #: Pass back as ``cursor`` for the next page (null: this is the last).
    next_cursor: str | None = None


class SubList(_Out):
    subdistributors: list[SubDistributor]


class TierList(_Out):
    tiers: list[Tier]
    #: Pass back as ``cursor`` for the next page (null: this is the last).
    next_cursor: str | None = None


class BatchList(_Out):
    #: Oldest first.
    batches: list[BatchSummary]


class Live(_Out):
    """What this daemon process served lately (each worker counts its own)."""

    #: The figures below are over this many seconds (or since the process started).
    window_s: int
    #: POST /v1/orders answered a second, refusals and replays included.
    orders_per_s: float
    #: Codes handed to buyers a second (deliveries and confirmed reservations).
    codes_per_s: float
    #: Median and 99th percentile time to answer POST /v1/orders (null: no order in the window).
    p50_ms: float | None
    p99_ms: float | None
    #: Orders answered and codes delivered since the process started.
    orders: int
    codes: int
    #: Orders refused since the process started, by error code.
    refusals: dict[str, int]


class StoreHealth(_Out):
    #: ready: Redis answers and the scripts are loaded.
    status: Literal["ready", "unavailable"]
    #: How long that check took.
    latency_ms: float
    #: Webhook deliveries waiting for a try, and failed for good (null: the store did not answer).
    webhooks_due: int | None
    webhooks_failed: int | None


class Overview(_Out):
    live: Live
    store: StoreHealth


class WebhookSecret(_Out):
    url: str
    #: Shown once: signs every delivery (X-Dispatch-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of "t.body">).
    secret: str


class FailedList(_Out):
    #: Most recent first.
    deliveries: list[FailedDelivery]


class Replayed(_Out):
    #: Deliveries put back to be tried again now.
    replayed: int


# ---- admins ------------------------------------------------------------------------------

class TokenCreate(_In):
    #: The token's name: who its writes are recorded as (``owner`` is the configured token's).
    name: Id
    role: Role


class TokenList(msgspec.Struct):
    tokens: list[AdminToken]


class AuditQuery(_In):
    #: Entries of this actor only (a token's name, ``owner``, ``cli:<user>``...).
    actor: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    #: Entries on this target only: ``kind:id`` (``distributor:acme``), or an id (every kind).
    target: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    #: Made at or after this time, and before ``to``.
    from_: Aware | None = msgspec.field(default=None, name="from")
    to: Aware | None = None
    #: The next_cursor of the previous page; absent: the most recent entries.
    cursor: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,15}-[0-9]{1,19}$")] | None = None
    limit: PageSize = 100
