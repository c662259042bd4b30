"""The route table: every endpoint of HTTP API v1, one small handler each, and the
:class:`Router` that is the protocol's handler.

A route declares who may call it (``auth``; for an admin route, the ``role`` or roles
it needs: a read is open to every role, a write names its own, see admins.py), the
Struct its JSON body and query string decode into, and what it answers; the generic code in :meth:`Router.__call__`
does the checking and decoding, so a handler only calls the engine and returns a
Struct (sent with the route's status), ``(status, Struct)``, or a Reply. Errors are
raised, never built here (see responses.py).

Handlers get a :class:`Call`: the request, the engine, and the few things of the
server they need (its metrics, its shared state, the OpenAPI document), all given to
the Router when it is built.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import unquote

import msgspec

from ..admins import Admin, require
from ..errors import (ForbiddenError, MethodNotAllowedError, NotFoundError, RateLimitedError, StoreUnavailableError,
                      ValidationError)
from ..models import (ACCOUNT_PATTERN, AdminToken, AuditPage, Balance, BatchReport, CatalogItem, Distributor,
                      EventPage, Limits, NewAdminToken, NewSubDistributor, Order, OrderPage, Sku, SkuDetail, Statement,
                      Stock, SubDistributor, SubOrderPage, Supplier, SupplierReport, SupplierStats, Ticket, Tier,
                      TierRules, TierStatus, Verification)
from ..trail import acting
from ..webhooks import WebhookTarget
from . import console
from . import messages as m
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .responses import Reply, StreamReply, json_reply

if TYPE_CHECKING:
    from ..engine import Engine
    from .auth import Authenticator
    from .metrics import Metrics
    from .protocol import ServerState
    from .request import Request

__all__ = ["Route", "Router", "ROUTES", "Catalog"]

Auth = Literal["distributor", "admin", "none"]
#: The role an admin route needs, or the roles of which any will do (owner always will).
Roles = str | tuple[str, ...]
Handler = Callable[["Call"], Awaitable[Any]]
T = TypeVar("T")

# Path parameters: order ids are ULIDs; every other id is an admin-chosen Id.
_PARAM = {"order_id": r"[0-9A-HJKMNP-TV-Z]{26}", "ticket_id": r"tk_[0-9A-HJKMNP-TV-Z]{26}",
          "distributor": ACCOUNT_PATTERN, "subdistributor": ACCOUNT_PATTERN,
          "job_id": r"[A-Za-z0-9._:-]{1,300}", "asset": console.ASSET_PATTERN}
_ID = r"[A-Za-z0-9._-]{1,64}"


class Catalog(msgspec.Struct):
    skus: list[CatalogItem]


class Route:
    __slots__ = ("method", "template", "handler", "auth", "roles", "body", "query", "stream", "status", "out",
                 "summary", "_decode", "_segments", "_times")

    def __init__(self, method: str, template: str, handler: Handler, *, auth: Auth, roles: frozenset[str],
                 body: type | None, query: type | None, stream: bool, status: int, out: dict[int, Any]) -> None:
        self.method = method
        self.template = template
        self.handler = handler
        self.auth = auth
        self.roles = roles
        self.body = body
        self.query = query
        self.stream = stream
        self.status = status
        self.out = out
        self.summary = (handler.__doc__ or handler.__name__).strip().splitlines()[0]
        self._decode = msgspec.json.Decoder(body or m.Empty).decode
        self._times = {f.encode_name for f in msgspec.structs.fields(query) if "datetime" in repr(f.type)} \
            if query else set()
        self._segments = [(s[1:-1], re.compile(_PARAM.get(s[1:-1], _ID)))
                          if s.startswith("{") else s for s in template.split("/")]

    @property
    def params(self) -> list[tuple[str, str]]:
        """(name, pattern) of the path parameters, in order."""
        return [(s[0], s[1].pattern) for s in self._segments if isinstance(s, tuple)]

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self._segments):
            return None
        params = {}
        for seg, part in zip(self._segments, parts):
            if isinstance(seg, str):
                if seg != part:
                    return None
            else:
                value = unquote(part)
                if not seg[1].fullmatch(value):
                    return None
                params[seg[0]] = value
        return params

    def decode_body(self, body: bytes) -> Any:
        if not body.strip():
            if self.body is None:
                return None
            raise ValidationError("a JSON body is required")
        try:
            return self._decode(body)
        except msgspec.ValidationError as e:
            if b"." in body:  # maybe a whole number written as 652.0: JSON Schema's integer takes it
                try:
                    return msgspec.convert(_whole_numbers(msgspec.json.decode(body)), self.body)
                except msgspec.ValidationError as again:
                    e = again  # what is wrong once whole numbers are integers
            raise ValidationError(f"invalid body: {e}") from None
        except msgspec.DecodeError as e:
            raise ValidationError(f"the body is not valid JSON: {e}") from None

    def decode_query(self, raw: bytes) -> Any:
        values: dict[str, str] = {}
        for pair in raw.split(b"&") if raw else ():
            if not pair:
                continue
            name, _, value = pair.partition(b"=")
            key = unquote(name.decode("latin-1"))
            if key in values:
                raise ValidationError(f"query parameter {key!r} is given twice")
            values[key] = unquote(value.decode("latin-1"))
        if self.query is None:
            if values:
                raise ValidationError(f"unknown query parameter {next(iter(values))!r}")
            return None
        for name in self._times & values.keys():  # not a unix time: 0.5 is no moment of 1970
            if not _ISO_DATE.match(values[name]):
                raise ValidationError(f"query parameter {name!r} must be an ISO 8601 time with a zone")
        try:
            return msgspec.convert(values, self.query, strict=False)
        except msgspec.ValidationError as e:
            raise ValidationError(f"invalid query string: {e}".replace("`$.", "`")) from None


ROUTES: list[Route] = []
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _whole_numbers(value: Any) -> Any:
    """*value* (decoded JSON) with every float that is a whole number made an int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    return value


def route(method: str, template: str, *, auth: Auth, role: Roles | None = None, body: type | None = None,
          query: type | None = None, stream: bool = False, status: int = 200,
          out: Any = None) -> Callable[[Handler], Handler]:
    """Add the decorated handler to ROUTES. *out*: the response type (or {status: type});
    *role*: what an admin route needs (a read: viewer, unless given; a write must say)."""
    if auth == "admin" and role is None:
        if method != "GET":
            raise TypeError(f"admin write {method} {template} must name the role it needs")
        role = "viewer"
    roles = frozenset((role,) if isinstance(role, str) else role or ())

    def add(handler: Handler) -> Handler:
        outs = out if isinstance(out, dict) else {status: out}
        ROUTES.append(Route(method, template, handler, auth=auth, roles=roles, body=body, query=query, stream=stream,
                            status=status, out=outs))
        return handler
    return add


class Call:
    """What a handler gets: the engine, the decoded request, who is asking, and the
    server's metrics, shared state (``draining``) and OpenAPI document."""

    __slots__ = ("engine", "metrics", "state", "openapi", "request", "params", "body", "query", "distributor",
                 "admin")

    def __init__(self, router: Router, request: Request) -> None:
        self.engine = router.engine
        self.metrics = router.metrics
        self.state = router.state
        self.openapi = router.openapi
        self.request = request
        self.params = request.params
        self.body: Any = None
        self.query: Any = None
        self.distributor = ""
        self.admin: Admin | None = None

    def need(self, roles: Roles, what: str) -> None:
        """ForbiddenError unless the admin's role permits *what* (a part of the route that
        needs more than the route itself: money moved by an otherwise operator's write)."""
        assert self.admin is not None
        require(self.admin, frozenset((roles,) if isinstance(roles, str) else roles), what)


class Router:
    """The protocol's handler: :meth:`match` finds a request's route when its headers are
    in; calling the router with the request checks who is asking, decodes the query
    and body, and runs the route's handler."""

    def __init__(self, routes: list[Route], engine: Engine, auth: Authenticator, *, metrics: Metrics,
                 state: ServerState, openapi: bytes) -> None:
        self.routes = routes
        self.engine = engine
        self.auth = auth
        self.metrics = metrics
        self.state = state
        self.openapi = openapi
        self._static: dict[str, dict[str, Route]] = {}
        self._dynamic: list[Route] = []
        for r in routes:
            if "{" in r.template:
                self._dynamic.append(r)
            else:
                self._static.setdefault(r.template, {})[r.method] = r

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for *method* and *path*, or NotFoundError / MethodNotAllowedError."""
        by_method = self._static.get(path)
        params: dict[str, str] = {}
        if by_method is None:
            by_method = {}
            parts = path.split("/")
            for r in self._dynamic:
                got = r.match(parts)
                if got is not None:
                    by_method.setdefault(r.method, r)
                    params = got if r.method == method else params
        if not by_method:
            raise NotFoundError(f"no such endpoint: {method} {path[:200]}")
        r = by_method.get(method)
        if r is None:
            allow = sorted(by_method)
            raise MethodNotAllowedError(f"{method} is not allowed here; use {', '.join(allow)}", allow=allow)
        return r, params

    async def __call__(self, req: Request) -> Reply | StreamReply:
        """The reply to *req*, whose route :meth:`match` found; errors are raised."""
        route: Route = req.route
        c = Call(self, req)
        if route.auth == "admin":
            c.admin = await self.auth.admin(req)
            req.admin = c.admin.name
            with acting(c.admin.name, f"{route.method} {route.template}"):
                try:
                    require(c.admin, route.roles, f"{route.method} {route.template}")
                    return await self._run(route, c)
                except ForbiddenError:
                    if route.method != "GET":  # a refused write is in the trail too
                        target = ",".join(f"{k}:{v}" for k, v in c.params.items()) or "-"
                        await self.engine.refused(route.handler.__name__, target, "forbidden")
                    raise
        if route.auth == "distributor":
            access = await self.auth.distributor(req)
            req.distributor = c.distributor = access.distributor
            if access.rate_limit:
                wait = await self.engine.throttle(access.distributor, access.rate_limit)
                if wait:
                    raise RateLimitedError(f"over {access.rate_limit} requests a second", retry_after=wait)
        return await self._run(route, c)

    async def _run(self, route: Route, c: Call) -> Reply | StreamReply:
        """Decode the query and body, run the handler, make its reply."""
        req = c.request
        c.query = route.decode_query(req.query)
        if not route.stream and req.method in ("POST", "PATCH", "PUT"):
            c.body = route.decode_body(req.body)
        result = await route.handler(c)
        if isinstance(result, (Reply, StreamReply)):
            return result
        if isinstance(result, tuple):
            return json_reply(*result)
        return json_reply(route.status, result)


# ============================================================================================
# distributor endpoints
# ============================================================================================

@route("POST", "/v1/orders", auth="distributor", body=m.OrderRequest, status=201, out={201: Order, 200: Order})
async def create_order(c: Call) -> Any:
    """Buy codes: 201 with a new order, 200 with the same order again for a replay."""
    b: m.OrderRequest = c.body
    try:
        order = await c.engine.purchase(c.distributor, b.sku, b.qty, b.external_ref, mode=b.mode,
                                        reserve_ttl_s=b.reserve_ttl_s, max_unit_price=b.max_unit_price,
                                        allow_partial=b.allow_partial)
    except Exception as e:
        c.metrics.order(getattr(e, "code", "internal_error"))
        raise
    if order.replayed:
        c.metrics.order("replayed")
        return 200, order
    c.metrics.order(order.status, len(order.codes))
    return 201, order


@route("POST", "/v1/orders/{order_id}/confirm", auth="distributor", out=Order)
async def confirm_order(c: Call) -> Order:
    """Confirm a reservation: its codes are sold (and shown), the money is taken."""
    order = await c.engine.confirm(c.distributor, c.params["order_id"])
    c.metrics.delivered(len(order.codes))
    return order


@route("POST", "/v1/orders/{order_id}/cancel", auth="distributor", out=Order)
async def cancel_order(c: Call) -> Order:
    """Cancel a reservation: its codes go back to stock, the hold is released."""
    return await c.engine.cancel(c.distributor, c.params["order_id"])


@route("GET", "/v1/orders/{order_id}", auth="distributor", out=Order)
async def get_order(c: Call) -> Order:
    """One of your orders, with its codes."""
    return await c.engine.get_order(c.distributor, c.params["order_id"])


@route("GET", "/v1/orders", auth="distributor", query=m.OrderQuery, out=OrderPage | Order)
async def list_orders(c: Call) -> Order | OrderPage:
    """Your orders a page at a time (pass next_cursor back), or the one with ?external_ref=."""
    q: m.OrderQuery = c.query
    if q.external_ref is not None:
        if (q.status, q.since, q.cursor) != (None, None, None):
            raise ValidationError("external_ref cannot be combined with status, since or cursor")
        return await c.engine.get_order_by_ref(c.distributor, q.external_ref)
    return await c.engine.list_orders(c.distributor, status=q.status, since=q.since, cursor=q.cursor,
                                      limit=q.limit)


@route("GET", "/v1/skus", auth="distributor", out=Catalog)
async def catalog(c: Call) -> Catalog:
    """The SKUs you may buy, at your price, with their stock status."""
    return Catalog(skus=await c.engine.catalog(c.distributor))


@route("GET", "/v1/balance", auth="distributor", out=Balance)
async def balance(c: Call) -> Balance:
    """Your balance, the amount held by reservations, and your credit limit."""
    return await c.engine.balance(c.distributor)


@route("GET", "/v1/statements/{month}", auth="distributor", query=m.StatementQuery, out=Statement)
async def statement(c: Call) -> Statement | Reply:
    """Your statement for a month (YYYY-MM, UTC): opening and closing balance and held
    amount, and your ledger entries summed by kind; format=csv for CSV."""
    return await _statement(c, c.distributor)


@route("GET", "/v1/limits", auth="distributor", out=Limits)
async def my_limits(c: Call) -> Limits:
    """Your transaction limits (0: none) and what today and this month (UTC) have spent."""
    return await c.engine.limits(c.distributor)


@route("POST", "/v1/subdistributors", auth="distributor", body=m.SubCreate, status=201, out=NewSubDistributor)
async def create_subdistributor(c: Call) -> NewSubDistributor:
    """Open a sub-distributor of yours (id: yours, "~" and its name); its API key is in this answer only."""
    b: m.SubCreate = c.body
    return await c.engine.create_subdistributor(c.distributor, b.subdistributor, b.name, markup_bps=b.markup_bps,
                                                markups=b.markups, allowed_skus=b.allowed_skus)


@route("GET", "/v1/subdistributors", auth="distributor", out=m.SubList)
async def list_subdistributors(c: Call) -> m.SubList:
    """Your own sub-distributors, by id, with their balances."""
    return m.SubList(subdistributors=await c.engine.list_subdistributors(c.distributor))


@route("GET", "/v1/subdistributors/{subdistributor}", auth="distributor", out=SubDistributor)
async def get_subdistributor(c: Call) -> SubDistributor:
    """One of your sub-distributors."""
    return await c.engine.get_subdistributor(c.distributor, c.params["subdistributor"])


@route("PATCH", "/v1/subdistributors/{subdistributor}", auth="distributor", body=m.SubPatch, out=SubDistributor)
async def update_subdistributor(c: Call) -> SubDistributor:
    """Change a sub-distributor's name, status, allowed SKUs or markup; suspended stops its whole subtree."""
    b: m.SubPatch = c.body
    return await c.engine.update_subdistributor(c.distributor, c.params["subdistributor"], name=b.name,
                                                status=b.status, allowed_skus=b.allowed_skus,
                                                markup_bps=b.markup_bps, markups=b.markups)


@route("POST", "/v1/subdistributors/{subdistributor}/keys", auth="distributor", out=m.NewKey)
async def rotate_subdistributor_key(c: Call) -> m.NewKey:
    """A new API key for a sub-distributor; the old one stops working (within auth_cache_ttl_s)."""
    sub = c.params["subdistributor"]
    return m.NewKey(distributor=sub, api_key=await c.engine.rotate_subdistributor_key(c.distributor, sub))


@route("POST", "/v1/subdistributors/{subdistributor}/transfer", auth="distributor", body=m.TopupRequest,
       out=SubDistributor)
async def transfer(c: Call) -> SubDistributor:
    """Move money from your balance (not your credit) to a sub-distributor's, once per reference."""
    b: m.TopupRequest = c.body
    return await c.engine.transfer(c.distributor, c.params["subdistributor"], b.amount, b.reference)


@route("GET", "/v1/subdistributors/{subdistributor}/orders", auth="distributor", query=m.SubOrderQuery,
       out=SubOrderPage)
async def subdistributor_orders(c: Call) -> SubOrderPage:
    """A sub-distributor's orders, oldest first, a page at a time, with your margin on each: never their codes."""
    q: m.SubOrderQuery = c.query
    return await c.engine.subdistributor_orders(c.distributor, c.params["subdistributor"], cursor=q.cursor,
                                                limit=q.limit)


@route("GET", "/v1/tier", auth="distributor", out=TierStatus)
async def my_tier(c: Call) -> TierStatus:
    """Your price tier, your spend in the tier window and the next rule above it."""
    return await c.engine.tier_status(c.distributor)


@route("POST", "/v1/tickets", auth="distributor", body=m.TicketCreate, status=201, out=Ticket)
async def open_ticket(c: Call) -> Ticket:
    """Claim that a code you bought does not work (once per code, within the after-sales window)."""
    b: m.TicketCreate = c.body
    return await c.engine.open_ticket(c.distributor, b.order_id, b.code, b.reason)


@route("GET", "/v1/tickets", auth="distributor", query=m.TicketQuery, out=m.TicketList)
async def list_tickets(c: Call) -> m.TicketList:
    """Your tickets, oldest first."""
    return m.TicketList(tickets=await c.engine.list_tickets(c.distributor, c.query.status))


@route("GET", "/v1/tickets/{ticket_id}", auth="distributor", out=Ticket)
async def get_ticket(c: Call) -> Ticket:
    """One of your tickets, with its decision (and replacement code, if one was given)."""
    return await c.engine.get_ticket(c.params["ticket_id"], c.distributor)


# ============================================================================================
# admin endpoints
# ============================================================================================

async def _page(c: Call, read: Callable[..., Awaitable[list[T]]], key: Callable[[T], str],
                **filters: Any) -> tuple[list[T], str | None]:
    """The page the query asks for (``cursor``, ``limit``), read with one item more than
    the limit, and its next_cursor: the id of its last item when more follow, else None."""
    items = await read(**filters, after=c.query.cursor, limit=c.query.limit + 1)
    if len(items) > c.query.limit:
        items = items[:c.query.limit]
        return items, key(items[-1])
    return items, None


@route("GET", "/admin/overview", auth="admin", out=m.Overview)
async def overview(c: Call) -> m.Overview:
    """This process's orders and codes a second, order latency and refusals over the last
    minute, and the store's health."""
    started = time.perf_counter()
    try:
        await c.engine.ready()
        due, failed = await c.engine.webhooks.backlog()
        status: Literal["ready", "unavailable"] = "ready"
    except StoreUnavailableError:
        status, due, failed = "unavailable", None, None
    store = m.StoreHealth(status=status, latency_ms=round((time.perf_counter() - started) * 1000, 3),
                          webhooks_due=due, webhooks_failed=failed)
    return m.Overview(live=c.metrics.live(), store=store)


@route("GET", "/admin/skus", auth="admin", query=m.PageQuery, out=m.SkuList)
async def list_skus(c: Call) -> m.SkuList:
    """SKUs by id, a page at a time, each with its stock and restock forecast."""
    skus, cursor = await _page(c, c.engine.sku_details, lambda s: s.sku)
    return m.SkuList(skus=skus, next_cursor=cursor)


@route("GET", "/admin/skus/{sku}", auth="admin", out=SkuDetail)
async def get_sku(c: Call) -> SkuDetail:
    """A SKU with its stock and restock forecast."""
    return await c.engine.sku_detail(c.params["sku"])


@route("GET", "/admin/skus/{sku}/batches", auth="admin", out=m.BatchList)
async def sku_batches(c: Call) -> m.BatchList:
    """A SKU's batches, oldest first: supplier, unit cost, status and counts."""
    return m.BatchList(batches=await c.engine.sku_batches(c.params["sku"]))


@route("POST", "/admin/skus", auth="admin", role="operator", body=m.SkuCreate, status=201, out=Sku)
async def create_sku(c: Call) -> Sku:
    """Create a SKU."""
    b: m.SkuCreate = c.body
    return await c.engine.create_sku(b.sku, b.name, b.face_value, b.currency, b.price, b.low_stock_threshold,
                                     sale_order=b.sale_order, after_sales=b.after_sales, code_rule=b.code_rule,
                                     pin_rule=b.pin_rule, free=b.free, min_shelf_life_s=b.min_shelf_life_s,
                                     buckets=b.buckets)


@route("PATCH", "/admin/skus/{sku}", auth="admin", role="operator", body=m.SkuPatch, out=Sku)
async def update_sku(c: Call) -> Sku:
    """Change a SKU's name, price, low-stock threshold, status (paused stops sales at once),
    sale order, after-sales default, code or PIN rule, free, minimum shelf life or buckets."""
    b: m.SkuPatch = c.body
    return await c.engine.update_sku(c.params["sku"], name=b.name, price=b.price,
                                     low_stock_threshold=b.low_stock_threshold, status=b.status,
                                     sale_order=b.sale_order, after_sales=b.after_sales, code_rule=b.code_rule,
                                     pin_rule=b.pin_rule, free=b.free, min_shelf_life_s=b.min_shelf_life_s,
                                     buckets=b.buckets)


@route("GET", "/admin/skus/{sku}/stock", auth="admin", out=Stock)
async def stock(c: Call) -> Stock:
    """A SKU's codes by state, with a restock forecast (days of cover, reorder quantity)."""
    return await c.engine.stock(c.params["sku"])


@route("POST", "/admin/suppliers", auth="admin", role="operator", body=m.SupplierCreate, status=201, out=Supplier)
async def create_supplier(c: Call) -> Supplier:
    """Create a supplier."""
    b: m.SupplierCreate = c.body
    if b.deposit:
        c.need("finance", "an opening deposit")
    return await c.engine.create_supplier(b.supplier, b.name, b.deposit)


@route("GET", "/admin/suppliers", auth="admin", query=m.PageQuery, out=m.SupplierList)
async def list_suppliers(c: Call) -> m.SupplierList:
    """Suppliers by id, a page at a time: deposit, status, delivered, invalid rate, rating."""
    rows, cursor = await _page(c, c.engine.list_suppliers, lambda s: s.supplier)
    return m.SupplierList(suppliers=rows, next_cursor=cursor)


@route("GET", "/admin/suppliers/{supplier}", auth="admin", out=SupplierStats)
async def get_supplier(c: Call) -> SupplierStats:
    """A supplier: deposit, status, delivered, invalidated, invalid rate, rating."""
    return await c.engine.supplier_stats(c.params["supplier"])


@route("PATCH", "/admin/suppliers/{supplier}", auth="admin", role="operator", body=m.SupplierPatch, out=Supplier)
async def update_supplier(c: Call) -> Supplier:
    """Rename a supplier, blacklist it (its unsold codes leave sale) or reinstate it."""
    b: m.SupplierPatch = c.body
    return await c.engine.update_supplier(c.params["supplier"], name=b.name, status=b.status, reason=b.reason)


@route("POST", "/admin/suppliers/{supplier}/deposit", auth="admin", role="finance", body=m.DepositRequest,
       out=Supplier)
async def deposit(c: Call) -> Supplier:
    """Credit a supplier's deposit; the same reference credits once."""
    b: m.DepositRequest = c.body
    return await c.engine.deposit(c.params["supplier"], b.amount, b.reference)


@route("GET", "/admin/suppliers/{supplier}/report", auth="admin", out=SupplierReport)
async def supplier_report(c: Call) -> SupplierReport:
    """Deposit, delivered and invalidated codes (per batch too), invalid rate and rating."""
    return await c.engine.supplier_report(c.params["supplier"])


@route("GET", "/admin/tickets", auth="admin", query=m.AdminTicketQuery, out=m.TicketList)
async def admin_tickets(c: Call) -> m.TicketList:
    """Tickets of every distributor (or one), oldest first, a page at a time."""
    q: m.AdminTicketQuery = c.query
    rows, cursor = await _page(c, c.engine.list_tickets, lambda t: t.ticket_id, distributor=q.distributor,
                               status=q.status)
    return m.TicketList(tickets=rows, next_cursor=cursor)


@route("GET", "/admin/tickets/{ticket_id}", auth="admin", out=Ticket)
async def admin_ticket(c: Call) -> Ticket:
    """One ticket."""
    return await c.engine.get_ticket(c.params["ticket_id"])


@route("POST", "/admin/tickets/{ticket_id}/resolve", auth="admin", role=("operator", "finance"),
       body=m.TicketResolve, out=Ticket)
async def resolve_ticket(c: Call) -> Ticket:
    """Approve (code invalidated, supplier charged, refund or replacement) or reject a ticket."""
    b: m.TicketResolve = c.body
    if b.decision == "approve":
        c.need("finance", "approving a ticket (a refund or replacement, the supplier charged)")
    return await c.engine.resolve_ticket(c.params["ticket_id"], b.decision, replace=b.replace, note=b.note)


@route("GET", "/admin/events", auth="admin", query=m.EventQuery, out=EventPage)
async def events(c: Call) -> EventPage:
    """Events of one stream (dist:<id>, sku:<id>, supplier:<id>), oldest first, a page at a time."""
    q: m.EventQuery = c.query
    return await c.engine.events(q.stream, q.after, q.limit)


@route("POST", "/admin/tiers", auth="admin", role="operator", body=m.TierCreate, status=201, out=Tier)
async def create_tier(c: Call) -> Tier:
    """Create a price tier: a discount, and explicit prices per SKU."""
    b: m.TierCreate = c.body
    return await c.engine.create_tier(b.tier, b.discount_bps, b.prices)


@route("GET", "/admin/tiers", auth="admin", query=m.PageQuery, out=m.TierList)
async def list_tiers(c: Call) -> m.TierList:
    """Price tiers by id, a page at a time."""
    tiers, cursor = await _page(c, c.engine.list_tiers, lambda t: t.tier)
    return m.TierList(tiers=tiers, next_cursor=cursor)


@route("GET", "/admin/tiers/{tier}", auth="admin", out=Tier)
async def get_tier(c: Call) -> Tier:
    """A price tier."""
    return await c.engine.get_tier(c.params["tier"])


@route("GET", "/admin/tier-rules", auth="admin", out=TierRules)
async def tier_rules(c: Call) -> TierRules:
    """The volume tier rules: spend in the window (rolling 30 days or last calendar month) -> tier."""
    return await c.engine.tier_rules()


@route("PUT", "/admin/tier-rules", auth="admin", role="operator", body=m.TierRulesSet, out=TierRules)
async def set_tier_rules(c: Call) -> TierRules:
    """Replace the volume tier rules; every distributor that is not pinned gets its tier under them at once."""
    b: m.TierRulesSet = c.body
    return await c.engine.set_tier_rules(b.window, b.rules)


async def _admin_view(c: Call, distributor: Distributor) -> m.AdminDistributor:
    rate = await c.engine.rate_limit(distributor.distributor)
    return m.AdminDistributor(**msgspec.structs.asdict(distributor), rate_limit=rate)


@route("POST", "/admin/distributors", auth="admin", role="operator", body=m.DistributorCreate, status=201,
       out=m.CreatedDistributor)
async def create_distributor(c: Call) -> m.CreatedDistributor:
    """Open a distributor account; its API key is in this answer only."""
    b: m.DistributorCreate = c.body
    if b.credit_limit:
        c.need("finance", "a credit limit")
    new = await c.engine.create_distributor(b.distributor, b.name, b.tier, b.credit_limit, b.allowed_skus)
    if b.rate_limit is not None:
        await c.engine.set_rate_limit(b.distributor, b.rate_limit)
    return m.CreatedDistributor(distributor=await _admin_view(c, new.distributor), api_key=new.api_key)


@route("GET", "/admin/distributors", auth="admin", query=m.PageQuery, out=m.DistributorList)
async def list_distributors(c: Call) -> m.DistributorList:
    """Distributors by id, a page at a time: balance, held, credit limit, tier, status, rate limit."""
    rows, cursor = await _page(c, c.engine.list_distributors, lambda d: d.distributor)
    return m.DistributorList(distributors=[await _admin_view(c, d) for d in rows], next_cursor=cursor)


@route("GET", "/admin/distributors/{distributor}", auth="admin", out=m.AdminDistributor)
async def get_distributor(c: Call) -> m.AdminDistributor:
    """A distributor: balance, held, credit limit, tier, status, allowed SKUs, rate limit."""
    return await _admin_view(c, await c.engine.get_distributor(c.params["distributor"]))


@route("PATCH", "/admin/distributors/{distributor}", auth="admin", role=("operator", "finance"),
       body=m.DistributorPatch, out=m.AdminDistributor)
async def update_distributor(c: Call) -> m.AdminDistributor:
    """Change a distributor's tier, credit limit, allowed SKUs, status or rate limit."""
    b: m.DistributorPatch = c.body
    dist = c.params["distributor"]
    if b.credit_limit is not msgspec.UNSET:
        c.need("finance", "changing a credit limit")
    if any(getattr(b, f) is not msgspec.UNSET for f in b.__struct_fields__ if f != "credit_limit"):
        c.need("operator", "changing a distributor's name, tier, allowed SKUs, status or rate limit")
    d = await c.engine.update_distributor(dist, name=b.name, tier=b.tier, credit_limit=b.credit_limit,
                                          allowed_skus=b.allowed_skus, status=b.status)
    if b.rate_limit is not msgspec.UNSET:
        await c.engine.set_rate_limit(dist, b.rate_limit)
    return await _admin_view(c, d)


@route("GET", "/admin/distributors/{distributor}/statements/{month}", auth="admin", query=m.StatementQuery,
       out=Statement)
async def admin_statement(c: Call) -> Statement | Reply:
    """A distributor's statement for a month (YYYY-MM, UTC); format=csv for CSV."""
    return await _statement(c, c.params["distributor"])


async def _statement(c: Call, distributor: str) -> Statement | Reply:
    s = await c.engine.statement(distributor, c.params["month"])
    if c.query.format == "csv":
        return Reply(200, c.engine.statement_csv(s), b"text/csv; charset=utf-8",
                     [(b"content-disposition", b'attachment; filename="statement-%s.csv"' % s.month.encode())])
    return s


@route("GET", "/admin/distributors/{distributor}/limits", auth="admin", out=Limits)
async def limits(c: Call) -> Limits:
    """A distributor's transaction limits and its spend today and this month."""
    return await c.engine.limits(c.params["distributor"])


@route("PUT", "/admin/distributors/{distributor}/limits", auth="admin", role="finance", body=m.LimitsSet,
       out=Limits)
async def set_limits(c: Call) -> Limits:
    """Set every transaction limit of a distributor (absent or 0: none), checked with each purchase."""
    b: m.LimitsSet = c.body
    return await c.engine.set_limits(c.params["distributor"], max_order_qty=b.max_order_qty,
                                     max_order_amount=b.max_order_amount, daily=b.daily, monthly=b.monthly)


@route("GET", "/admin/distributors/{distributor}/tier", auth="admin", out=TierStatus)
async def tier_status(c: Call) -> TierStatus:
    """A distributor's tier, whether it is pinned, its spend in the tier window and the next rule."""
    return await c.engine.tier_status(c.params["distributor"])


@route("PUT", "/admin/distributors/{distributor}/tier-pin", auth="admin", role="operator", body=m.TierPin,
       out=TierStatus)
async def pin_tier(c: Call) -> TierStatus:
    """Pin a distributor to a tier (null: none): the tier rules leave it alone."""
    return await c.engine.pin_tier(c.params["distributor"], c.body.tier)


@route("DELETE", "/admin/distributors/{distributor}/tier-pin", auth="admin", role="operator", out=TierStatus)
async def unpin_tier(c: Call) -> TierStatus:
    """Unpin a distributor: the tier rules decide its tier again, at once."""
    return await c.engine.unpin_tier(c.params["distributor"])


@route("GET", "/admin/distributors/{distributor}/verification", auth="admin", out=Verification)
async def verification(c: Call) -> Verification:
    """A distributor's real-name verification (the ID number by its last 4 characters)."""
    return await c.engine.verification(c.params["distributor"])


@route("PUT", "/admin/distributors/{distributor}/verification", auth="admin", role="operator",
       body=m.VerificationSet, out=Verification)
async def verify(c: Call) -> Verification:
    """Record a distributor's real name as verified (the identity is stored encrypted)."""
    b: m.VerificationSet = c.body
    return await c.engine.verify(c.params["distributor"], b.legal_name, b.id_type, b.id_number, b.verified_by)


@route("DELETE", "/admin/distributors/{distributor}/verification", auth="admin", role="operator", out=Verification)
async def unverify(c: Call) -> Verification:
    """Withdraw a distributor's verification; with require_verification it can no longer buy."""
    return await c.engine.unverify(c.params["distributor"])


@route("POST", "/admin/distributors/{distributor}/keys", auth="admin", role="operator", out=m.NewKey)
async def rotate_key(c: Call) -> m.NewKey:
    """A new API key for the distributor; the old one stops working (within auth_cache_ttl_s)."""
    dist = c.params["distributor"]
    return m.NewKey(distributor=dist, api_key=await c.engine.rotate_api_key(dist))


@route("POST", "/admin/distributors/{distributor}/topup", auth="admin", role="finance", body=m.TopupRequest,
       out=Balance)
async def topup(c: Call) -> Balance:
    """Credit a balance; the same reference credits once."""
    b: m.TopupRequest = c.body
    return await c.engine.topup(c.params["distributor"], b.amount, b.reference)


_IMPORT_FORMATS = {b"text/plain": "text", b"text/csv": "csv", b"": "auto", b"application/octet-stream": "auto"}


@route("POST", "/admin/batches", auth="admin", role="operator", query=m.BatchQuery, stream=True, status=201,
       out={201: BatchReport, 200: BatchReport})
async def import_batch(c: Call) -> Any:
    """Upload a batch of codes (text/plain: one a line; text/csv: with a header naming `code`), streamed:
    201 with its report, 200 with ``replayed`` for the same batch sent again once imported."""
    q: m.BatchQuery = c.query
    ctype = c.request.headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    fmt = _IMPORT_FORMATS.get(ctype)
    if fmt is None:
        raise ValidationError("Content-Type must be text/plain (one code a line) or text/csv")
    report = await c.engine.import_codes(c.request.stream, sku=q.sku, supplier=q.supplier, unit_cost=q.unit_cost,
                                         batch_id=q.batch_id, format=fmt)
    return (200, report) if report.replayed else (201, report)


@route("POST", "/admin/batches/{batch_id}/void", auth="admin", role="operator", out=m.VoidReport)
async def void_batch(c: Call) -> m.VoidReport:
    """Withdraw a batch's unsold codes from sale."""
    batch_id = c.params["batch_id"]
    return m.VoidReport(batch_id=batch_id, voided=await c.engine.void_batch(batch_id))


async def _set_webhook(c: Call, distributor: str | None) -> m.WebhookSecret:
    url = c.body.url
    return m.WebhookSecret(url=url, secret=await c.engine.set_webhook(distributor, url))


async def _webhook(c: Call, distributor: str | None) -> WebhookTarget:
    target = await c.engine.webhooks.target(distributor)
    if target is None:
        raise NotFoundError("no webhook is registered")
    return target


async def _remove_webhook(c: Call, distributor: str | None) -> m.Status:
    if not await c.engine.remove_webhook(distributor):
        raise NotFoundError("no webhook is registered")
    return m.Status("removed")


@route("PUT", "/admin/webhook", auth="admin", role="owner", body=m.WebhookSet, out=m.WebhookSecret)
async def set_admin_webhook(c: Call) -> m.WebhookSecret:
    """Register the admin webhook (every event); the answer holds its signing secret, shown once."""
    return await _set_webhook(c, None)


@route("GET", "/admin/webhook", auth="admin", out=WebhookTarget)
async def admin_webhook(c: Call) -> WebhookTarget:
    """The admin webhook (never its secret)."""
    return await _webhook(c, None)


@route("DELETE", "/admin/webhook", auth="admin", role="owner", out=m.Status)
async def remove_admin_webhook(c: Call) -> m.Status:
    """Unregister the admin webhook."""
    return await _remove_webhook(c, None)


@route("PUT", "/admin/distributors/{distributor}/webhook", auth="admin", role="operator", body=m.WebhookSet,
       out=m.WebhookSecret)
async def set_webhook(c: Call) -> m.WebhookSecret:
    """Register a distributor's webhook (its own events); the answer holds its signing secret, shown once."""
    return await _set_webhook(c, c.params["distributor"])


@route("GET", "/admin/distributors/{distributor}/webhook", auth="admin", out=WebhookTarget)
async def webhook(c: Call) -> WebhookTarget:
    """A distributor's webhook (never its secret)."""
    return await _webhook(c, c.params["distributor"])


@route("DELETE", "/admin/distributors/{distributor}/webhook", auth="admin", role="operator", out=m.Status)
async def remove_webhook(c: Call) -> m.Status:
    """Unregister a distributor's webhook."""
    return await _remove_webhook(c, c.params["distributor"])


@route("GET", "/admin/webhooks/failed", auth="admin", query=m.FailedQuery, out=m.FailedList)
async def failed_webhooks(c: Call) -> m.FailedList:
    """Deliveries that failed for good (every try used), the most recent first."""
    return m.FailedList(deliveries=await c.engine.webhooks.failed(c.query.limit))


@route("POST", "/admin/webhooks/failed/{job_id}/replay", auth="admin", role="operator", out=m.Replayed)
async def replay_webhook(c: Call) -> m.Replayed:
    """Try a failed delivery again now, with its tries counted afresh."""
    await c.engine.replay_webhook(c.params["job_id"])
    return m.Replayed(replayed=1)


@route("POST", "/admin/webhooks/failed/replay", auth="admin", role="operator", out=m.Replayed)
async def replay_webhooks(c: Call) -> m.Replayed:
    """Try every failed delivery again now."""
    return m.Replayed(replayed=await c.engine.replay_webhooks())


def _csv(blocks: Any, name: str) -> StreamReply:
    return StreamReply(200, blocks, b"text/csv; charset=utf-8",
                       [(b"content-disposition", b'attachment; filename="%s"' % name.encode())])


@route("GET", "/admin/orders/export", auth="admin", query=m.OrderExportQuery, out=str)
async def export_orders(c: Call) -> StreamReply:
    """Every distributor's orders created in [from, to), as CSV (streamed; codes masked unless codes=plain)."""
    q: m.OrderExportQuery = c.query
    if q.codes == "plain":
        c.need("owner", "exporting codes in clear")
    return _csv(c.engine.export_orders(q.from_, q.to, show_codes=q.codes == "plain"), "orders.csv")


@route("GET", "/admin/ledger/export", auth="admin", query=m.ExportQuery, out=str)
async def export_ledger(c: Call) -> StreamReply:
    """Every ledger entry (distributors, then suppliers) made in [from, to), as CSV (streamed)."""
    q: m.ExportQuery = c.query
    return _csv(c.engine.export_ledger(q.from_, q.to), "ledger.csv")


@route("POST", "/admin/tokens", auth="admin", role="owner", body=m.TokenCreate, status=201, out=NewAdminToken)
async def create_token(c: Call) -> NewAdminToken:
    """Create a named admin token with a role; the token is in this answer only (its hash is kept)."""
    b: m.TokenCreate = c.body
    return await c.engine.create_admin_token(b.name, b.role)


@route("GET", "/admin/tokens", auth="admin", role="owner", out=m.TokenList)
async def list_tokens(c: Call) -> m.TokenList:
    """Named admin tokens by name, with their roles (never the tokens)."""
    return m.TokenList(tokens=await c.engine.list_admin_tokens())


@route("DELETE", "/admin/tokens/{name}", auth="admin", role="owner", out=AdminToken)
async def revoke_token(c: Call) -> AdminToken:
    """Revoke a named admin token: it is refused (401) from the next request on, by every worker."""
    return await c.engine.revoke_admin_token(c.params["name"])


@route("GET", "/admin/audit", auth="admin", query=m.AuditQuery, out=AuditPage)
async def audit_trail(c: Call) -> AuditPage:
    """The audit trail of admin writes, the most recent first, a page at a time: who, through
    what, which action on which target, its outcome, and the target before and after."""
    q: m.AuditQuery = c.query
    return await c.engine.audit_trail(actor=q.actor, target=q.target, since=q.from_, until=q.to, cursor=q.cursor,
                                      limit=q.limit)


# ============================================================================================
# operations
# ============================================================================================

@route("GET", "/healthz", auth="none", out=m.Status)
async def healthz(c: Call) -> m.Status:
    """The process is up."""
    return m.Status("ok")


@route("GET", "/readyz", auth="none", out=m.Status)
async def readyz(c: Call) -> Any:
    """Redis answers and the scripts are loaded (503 while shutting down or when it does not)."""
    if c.state.draining:
        return 503, m.Status("shutting_down")
    try:
        await c.engine.ready()
    except StoreUnavailableError:
        return 503, m.Status("store_unavailable")
    return m.Status("ready")


@route("GET", "/metrics", auth="none", out=str)
async def metrics(c: Call) -> Reply:
    """Prometheus metrics of this process."""
    return Reply(200, await c.metrics.render(), METRICS_TYPE)


@route("GET", "/console", auth="none", out=str)
async def console_page(c: Call) -> Reply:
    """The operator's console (sign in with the admin token)."""
    return console.asset("index.html")


@route("GET", "/console/", auth="none", out=str)
async def console_page_slash(c: Call) -> Reply:
    """The console, for an address typed with a trailing slash."""
    return console.asset("index.html")


@route("GET", "/console/{asset}", auth="none", out=str)
async def console_asset(c: Call) -> Reply:
    """A file of the console: its scripts and style sheet."""
    return console.asset(c.params["asset"])


@route("GET", "/openapi.json", auth="none", out=dict)
async def openapi(c: Call) -> Reply:
    """This API's OpenAPI 3.1 document."""
    return Reply(200, c.openapi)
