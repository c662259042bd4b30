"""The ``dispatch`` command: argument parsing only. Each command builds the Config and
calls the engine (or the server); errors are one line on stderr and a non-zero exit.

With the embedded store, a command run while ``dispatch serve`` holds the data
directory talks to the daemon's redis-server through its socket. Writes go into the
audit trail as actor ``cli:<user>`` (the OS user).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import getpass
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from .config import Config
from .engine import Engine
from .errors import DispatchError, NotFoundError
from .exports import Exports
from .models import ROLES
from .trail import acting

__all__ = ["main"]

T = TypeVar("T")
out = Console()
err = Console(stderr=True)


# ---- plumbing ----------------------------------------------------------------------------

def _config(args: argparse.Namespace, **overrides: Any) -> Config:
    return Config.load(args.config, **overrides)


def _attach(config: Config) -> Config:
    """The config to reach the store: a running daemon's embedded Redis if it holds the data dir."""
    if config.redis_url is not None:
        return config
    lock, sock = Path(config.data_dir) / "dispatch.lock", Path(config.data_dir) / "redis.sock"
    if not lock.exists() or not sock.exists():
        return config
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # a dispatch process owns the directory: use its server
        return msgspec.structs.replace(config, redis_url=f"unix://{sock.resolve()}")
    finally:
        os.close(fd)
    return config


def _run(args: argparse.Namespace, work: Callable[[Engine], Awaitable[T]]) -> T:
    config = _attach(_config(args))

    async def run() -> T:
        async with Engine(config, sweep=False) as engine:
            with acting(f"cli:{getpass.getuser()}", "cli"):
                return await work(engine)

    return asyncio.run(run())


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table with every value whole and as it is: values are plain text (never rich
    markup or :emoji: codes), and the table is as wide as its values need, even beyond
    the terminal's width, so an id can be copied from it."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if c in _NUMERIC else "left", no_wrap=True)
    for row in rows:
        t.add_row(*(Text("" if v is None else str(v)) for v in row))
    width = out.width
    out.width = max(width, Measurement.get(out, out.options.update_width(1 << 16), t).maximum)
    try:
        out.print(t)
    finally:
        out.width = width


_NUMERIC = {"face_value", "price", "threshold", "deposit", "discount_bps", "credit_limit", "balance", "held",
            "rate_limit", "accepted", "duplicate", "malformed", "available", "reserved", "sold", "voided",
            "invalidated", "line"}


def _show(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    if isinstance(value, list):
        return ",".join(map(str, value))
    return value


def _fields(obj: msgspec.Struct, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(name, value) of every field; a nested record's as ``name.field``."""
    for k, v in msgspec.structs.asdict(obj).items():
        if isinstance(v, msgspec.Struct):
            yield from _fields(v, f"{prefix}{k}.")
        else:
            yield prefix + k, _show(v)


def _record(obj: msgspec.Struct) -> None:
    _table(type(obj).__name__, ["field", "value"], list(_fields(obj)))


def _when(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _pairs(items: list[str], flag: str, what: str) -> list[tuple[str, int]]:
    """``ID=AMOUNT`` items of *flag* as (id, amount), in order."""
    pairs = []
    for item in items:
        key, sep, amount = item.partition("=")
        if not sep or not amount.isdigit():
            raise DispatchError(f"{flag} takes {what} (minor units), got {item!r}")
        pairs.append((key, int(amount)))
    return pairs


def _prices(items: list[str]) -> dict[str, int]:
    return dict(_pairs(items, "--price", "SKU=PRICE"))


def _skus(text: str | None) -> list[str] | None:
    return None if text in (None, "*") else [s for s in text.split(",") if s]  # type: ignore[union-attr]


# ---- commands --------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(_config(args, host=args.host, port=args.port, workers=args.workers))


def cmd_import(args: argparse.Namespace) -> int:
    path = args.file
    total = None if path == "-" else os.path.getsize(path)

    async def blocks(progress: Progress, task: Any) -> AsyncIterator[bytes]:
        f = sys.stdin.buffer if path == "-" else open(path, "rb")
        try:
            while block := await asyncio.to_thread(f.read, 1 << 20):
                progress.update(task, advance=len(block))
                yield block
        finally:
            if f is not sys.stdin.buffer:
                f.close()

    async def work(engine: Engine) -> Any:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=err, transient=True) as progress:
            task = progress.add_task(f"importing {os.path.basename(path)}", total=total)
            return await engine.import_codes(blocks(progress, task), sku=args.sku, supplier=args.supplier,
                                             unit_cost=args.cost, batch_id=args.batch_id, format=args.format)

    report = _run(args, work)
    _table(f"batch {report.batch_id}", ["sku", "supplier", "accepted", "duplicate", "malformed"],
           [(report.sku, report.supplier, report.accepted, report.duplicate, report.malformed)])
    if report.malformed_lines:
        shown = report.malformed_lines[:20]
        _table("malformed lines" + (" (first 20)" if len(report.malformed_lines) > 20 else ""),
               ["line", "reason"], [(x.line, x.reason) for x in shown])
    if report.duplicate_lines:
        dups = report.duplicate_lines[:20]
        _table("duplicate lines" + (" (first 20)" if len(report.duplicate_lines) > 20 else ""),
               ["line", "repeats", "batch"], [(x.line, x.of, x.batch_id or "") for x in dups])
    return 0


def _buckets(value: str) -> int | str:
    if value == "masters" or value.isdigit():
        return value if value == "masters" else int(value)
    raise argparse.ArgumentTypeError(f"an integer from 1 to 16, or masters, not {value!r}")


def _spread(e: Engine, sku: str, buckets: int | str | None) -> int | None:
    return e.buckets_on_every_master(sku) if buckets == "masters" else buckets  # type: ignore[return-value]


def cmd_sku(args: argparse.Namespace) -> int:
    if args.action == "create":
        _record(_run(args, lambda e: e.create_sku(args.sku, args.name, args.face_value, args.currency, args.price,
                                                  args.low_stock, sale_order=args.sale_order,
                                                  after_sales=args.after_sales, code_rule=args.code_rule,
                                                  pin_rule=args.pin_rule, free=args.free,
                                                  min_shelf_life_s=args.min_shelf_life,
                                                  buckets=_spread(e, args.sku, args.buckets))))
    elif args.action == "update":
        changes = {k: v for k, v in dict(name=args.name, price=args.price, low_stock_threshold=args.low_stock,
                                         status=args.status, sale_order=args.sale_order,
                                         after_sales=args.after_sales, code_rule=args.code_rule,
                                         pin_rule=args.pin_rule,
                                         min_shelf_life_s=args.min_shelf_life).items()
                   if v is not None}

        def update(e: Engine) -> Awaitable[Any]:
            buckets = _spread(e, args.sku, args.buckets)
            return e.update_sku(args.sku, **changes, **({} if buckets is None else {"buckets": buckets}))
        _record(_run(args, update))
    else:
        skus = _run(args, lambda e: e.list_skus())
        _table("SKUs", ["sku", "name", "face_value", "currency", "price", "threshold", "status"],
               [(s.sku, s.name, s.face_value, s.currency, s.price, s.low_stock_threshold, s.status) for s in skus])
    return 0


def cmd_supplier(args: argparse.Namespace) -> int:
    if args.action == "create":
        _record(_run(args, lambda e: e.create_supplier(args.supplier, args.name, args.deposit)))
    elif args.action == "deposit":
        _record(_run(args, lambda e: e.deposit(args.supplier, args.amount, args.reference)))
    elif args.action == "update":
        changes = {k: v for k, v in dict(name=args.name, status=args.status).items() if v is not None}
        _record(_run(args, lambda e: e.update_supplier(args.supplier, reason=args.reason, **changes)))
    elif args.action == "report":
        r = _run(args, lambda e: e.supplier_report(args.supplier))
        _table(f"supplier {r.supplier}", ["name", "status", "deposit", "delivered", "invalidated", "invalid_rate",
                                          "rating", "blacklist_reason"],
               [(r.name, r.status, r.deposit, r.delivered, r.invalidated, f"{r.invalid_rate:.2%}", r.rating,
                 r.blacklist_reason or "")])
        _table("batches", ["batch", "sku", "unit_cost", "status", "accepted", "delivered", "invalidated", "voided"],
               [(b.batch_id, b.sku, b.unit_cost, b.status, b.accepted, b.delivered, b.invalidated, b.voided)
                for b in r.batches])
    else:
        rows = _run(args, lambda e: e.list_suppliers())
        _table("suppliers", ["supplier", "name", "deposit", "status"],
               [(s.supplier, s.name, s.deposit, s.status) for s in rows])
    return 0


def cmd_webhook(args: argparse.Namespace) -> int:
    if args.action == "set":  # distributor None: the admin webhook (every event)
        secret = _run(args, lambda e: e.set_webhook(args.distributor, args.url))
        out.print(f"signing secret (shown once):\n[bold]{secret}[/bold]")
    elif args.action == "remove":
        if not _run(args, lambda e: e.remove_webhook(args.distributor)):
            raise NotFoundError("no webhook is registered")
    elif args.action == "replay":
        async def replay(e: Engine) -> int:
            if args.job:
                await e.replay_webhook(args.job)
                return 1
            return await e.replay_webhooks()

        out.print(f"{_run(args, replay)} deliveries will be tried again")
    else:
        rows = _run(args, lambda e: e.webhooks.failed(args.limit))
        _table("failed deliveries", ["job", "type", "entity", "version", "attempts", "last error", "failed at"],
               [(f.job_id, f.type, f.entity, f.version, f.attempts, f.last_error, f.failed_at.isoformat())
                for f in rows])
    return 0


def cmd_ticket(args: argparse.Namespace) -> int:
    if args.action == "resolve":
        _record(_run(args, lambda e: e.resolve_ticket(args.ticket, args.decision, replace=args.replace,
                                                      note=args.note)))
    else:
        rows = _run(args, lambda e: e.list_tickets(args.distributor, args.status))
        _table("tickets", ["ticket", "distributor", "order", "sku", "code #", "status", "outcome", "refund", "reason"],
               [(t.ticket_id, t.distributor, t.order_id, t.sku, t.code_index, t.status, t.outcome or "", t.refund,
                 t.reason) for t in rows])
    return 0


def cmd_tier(args: argparse.Namespace) -> int:
    if args.action == "create":
        _record(_run(args, lambda e: e.create_tier(args.tier, args.discount_bps, _prices(args.price))))
    elif args.action == "list":
        rows = _run(args, lambda e: e.list_tiers())
        _table("tiers", ["tier", "discount_bps", "prices"],
               [(t.tier, t.discount_bps, ", ".join(f"{k}={v}" for k, v in sorted(t.prices.items()))) for t in rows])
    elif args.action == "rules":
        if args.rule or args.clear or args.window:
            rules = [{"min_spend": spend, "tier": tier}
                     for tier, spend in _pairs(args.rule, "--rule", "TIER=MIN_SPEND")]
            got = _run(args, lambda e: e.set_tier_rules(args.window or "rolling_30d", rules))
        else:
            got = _run(args, lambda e: e.tier_rules())
        _table("tier rules", ["version", "window", "min_spend", "tier"],
               [(got.version, got.window, r.min_spend, r.tier) for r in got.rules]
               or [(got.version, "", "", "none: tiers are set by hand")])
    elif args.action == "pin":
        _record(_run(args, lambda e: e.pin_tier(args.distributor, args.tier or None)))
    elif args.action == "unpin":
        _record(_run(args, lambda e: e.unpin_tier(args.distributor)))
    else:
        _record(_run(args, lambda e: e.tier_status(args.distributor)))
    return 0


def cmd_distributor(args: argparse.Namespace) -> int:
    if args.action == "create":
        async def create(e: Engine) -> Any:
            new = await e.create_distributor(args.distributor, args.name, args.tier, args.credit_limit,
                                             _skus(args.allowed_skus))
            if args.rate_limit is not None:
                await e.set_rate_limit(args.distributor, args.rate_limit)
            return new

        new = _run(args, create)
        _record(new.distributor)
        out.print(f"API key (shown once, only its hash is kept):\n[bold]{new.api_key}[/bold]")
    elif args.action == "update":
        changes: dict[str, Any] = {k: v for k, v in dict(name=args.name, credit_limit=args.credit_limit,
                                                         status=args.status).items() if v is not None}
        if args.tier is not None:
            changes["tier"] = args.tier or None
        if args.allowed_skus is not None:
            changes["allowed_skus"] = _skus(args.allowed_skus)

        async def update(e: Engine) -> Any:
            d = await e.update_distributor(args.distributor, **changes)
            if args.rate_limit is not None:
                await e.set_rate_limit(args.distributor, args.rate_limit)
            return d

        _record(_run(args, update))
    else:
        async def listing(e: Engine) -> list[tuple[Any, int]]:
            return [(d, await e.rate_limit(d.distributor)) for d in await e.list_distributors()]

        _table("distributors", ["distributor", "name", "tier", "status", "balance", "held", "credit_limit",
                                "rate_limit", "allowed_skus"],
               [(d.distributor, d.name, d.tier, d.status, d.balance, d.held, d.credit_limit, rate,
                 "*" if d.allowed_skus is None else ",".join(d.allowed_skus)) for d, rate in _run(args, listing)])
    return 0


def cmd_topup(args: argparse.Namespace) -> int:
    _record(_run(args, lambda e: e.topup(args.distributor, args.amount, args.reference)))
    return 0


def cmd_stock(args: argparse.Namespace) -> int:
    _record(_run(args, lambda e: e.stock(args.sku)))
    return 0


def cmd_statement(args: argparse.Namespace) -> int:
    s = _run(args, lambda e: e.statement(args.distributor, args.month))
    if args.csv:
        sys.stdout.write(Exports.statement_csv(s).decode())
        return 0
    rows = [("opening", "", "", "", s.opening_balance, s.opening_held),
            *[(x.kind, x.count, x.amount, x.held_delta, "", "") for x in s.lines],
            ("closing", "", "", "", s.closing_balance, s.closing_held)]
    _table(f"{s.distributor} {s.month}" + ("" if s.reconciled else " (NOT reconciled: run audit)"),
           ["line", "count", "amount", "held delta", "balance", "held"], rows)
    return 0


def cmd_limits(args: argparse.Namespace) -> int:
    given = {k: getattr(args, k) for k in ("max_order_qty", "max_order_amount", "daily", "monthly")
             if getattr(args, k) is not None}
    if given:  # every limit at once: those not given are none
        _record(_run(args, lambda e: e.set_limits(args.distributor, **given)))
    else:
        _record(_run(args, lambda e: e.limits(args.distributor)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.withdraw:
        _record(_run(args, lambda e: e.unverify(args.distributor)))
    elif args.legal_name is None:
        _record(_run(args, lambda e: e.verification(args.distributor)))
    else:
        missing = [f"--{f.replace('_', '-')}" for f in ("id_type", "id_number", "by") if getattr(args, f) is None]
        if missing:
            raise DispatchError(f"verifying needs {', '.join(missing)} too")
        _record(_run(args, lambda e: e.verify(args.distributor, args.legal_name, args.id_type, args.id_number,
                                              args.by)))
    return 0


def cmd_admin_token(args: argparse.Namespace) -> int:
    if args.action == "create":
        new = _run(args, lambda e: e.create_admin_token(args.name, args.role))
        _record(new.token)
        out.print(f"admin token (shown once, only its hash is kept):\n[bold]{new.secret}[/bold]")
    elif args.action == "revoke":
        _record(_run(args, lambda e: e.revoke_admin_token(args.name)))
    else:
        _table("admin tokens", ["name", "role", "created_at", "created_by"],
               [(t.name, t.role, t.created_at.isoformat(), t.created_by)
                for t in _run(args, lambda e: e.list_admin_tokens())])
    return 0


def cmd_audit_log(args: argparse.Namespace) -> int:
    page = _run(args, lambda e: e.audit_trail(actor=args.actor, target=args.target, since=args.from_,
                                              until=args.to, cursor=args.cursor, limit=args.limit))
    if args.json:
        sys.stdout.write(msgspec.json.encode(page).decode() + "\n")
        return 0
    _table("audit trail, most recent first", ["at", "actor", "via", "action", "target", "outcome", "before", "after"],
           [(x.at.isoformat(timespec="milliseconds"), x.actor, x.via, x.action, x.target, x.outcome,
             msgspec.json.encode(x.before).decode(), msgspec.json.encode(x.after).decode()) for x in page.entries])
    if page.next_cursor:
        err.print(f"older entries: --cursor {page.next_cursor}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    async def work(engine: Engine) -> int:
        rows = 0
        f = sys.stdout.buffer if args.out in (None, "-") else open(args.out, "wb")
        try:
            blocks = (engine.export_ledger(args.from_, args.to) if args.what == "ledger" else
                      engine.export_orders(args.from_, args.to, show_codes=args.codes == "plain"))
            async for block in blocks:
                f.write(block)
                rows += block.count(b"\n")
        finally:
            if f is not sys.stdout.buffer:
                f.close()
            else:
                f.flush()
        return rows - 1

    n = _run(args, work)
    if args.out not in (None, "-"):
        err.print(f"{n} {'entries' if args.what == 'ledger' else 'orders'} written to {args.out}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    rotation = _run(args, lambda e: e.rotate_master_key())
    out.print("[bold]A new master key[/bold] (shown once; keep it as safe as the data):\n")
    out.print(f"    {rotation.master_key}\n", highlight=False, soft_wrap=True)
    out.print("The fingerprint key is now wrapped under it. Before the next start of any dispatch "
              "process, set:\n", soft_wrap=True)
    out.print(f"    DISPATCH_MASTER_KEY={rotation.master_key}", highlight=False, soft_wrap=True)
    out.print(f"    DISPATCH_OLD_MASTER_KEYS=\"{' '.join(rotation.old_master_keys)}\"\n", highlight=False,
              soft_wrap=True)
    out.print("Codes stored so far keep their key id: they stay readable while the old keys are in "
              "DISPATCH_OLD_MASTER_KEYS. New codes are encrypted with the new key by processes started "
              "with it; daemons running now keep working until they restart.", soft_wrap=True)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from . import loadtest
    from .loadtest.target import LoadtestError

    if args.spawn == bool(args.url):
        raise DispatchError("give a target: --url URL (with --admin-token) or --spawn")
    knobs = dict(distributors=args.distributors, connections=args.connections, timeout_s=args.timeout,
                 reserve_share=args.reserve_share, confirm_share=args.confirm_share,
                 retry_share=args.retry_share, seed=args.seed)
    token = args.admin_token or os.environ.get("DISPATCH_ADMIN_TOKEN")
    try:
        return loadtest.main(scenario=args.scenario, preset=args.preset, url=args.url, admin_token=token,
                             spawn=args.spawn, duration_s=args.duration, rate_scale=args.rate_scale,
                             overrides={k: v for k, v in knobs.items() if v is not None}, json_path=args.json,
                             plot_path=args.plot, quiet=args.quiet, keep=args.keep)
    except (LoadtestError, ValueError, msgspec.ValidationError) as e:
        raise DispatchError(str(e)) from None


# ---- parser ----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dispatch", description="card-dispatch: card-code dispatch engine on Redis")
    p.add_argument("--version", action="version", version=f"dispatch {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML config file (DISPATCH_* variables override it)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", parents=[common], help="run the HTTP daemon")
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default 8080)")
    s.add_argument("--workers", type=int, help="worker processes sharing the port (default 1)")
    s.set_defaults(run=cmd_serve)

    s = sub.add_parser("import", parents=[common], help="import a batch of codes from a file ('-': stdin)")
    s.add_argument("file")
    s.add_argument("--sku", required=True)
    s.add_argument("--supplier", required=True)
    s.add_argument("--cost", type=int, required=True, help="unit cost in minor units")
    s.add_argument("--batch-id", help="resend with the same id to resume an interrupted import")
    s.add_argument("--format", choices=("auto", "text", "csv"), default="auto")
    s.set_defaults(run=cmd_import)

    s = sub.add_parser("sku", help="create, list or update SKUs")
    a = s.add_subparsers(dest="action", required=True)
    c = a.add_parser("create", parents=[common])
    c.add_argument("sku")
    c.add_argument("--name", required=True)
    c.add_argument("--face-value", type=int, required=True)
    c.add_argument("--currency", required=True)
    c.add_argument("--price", type=int, required=True, help="base price in minor units")
    c.add_argument("--low-stock", type=int, default=0, help="low-stock threshold")
    c.add_argument("--free", action="store_true", help="given away: the only way to a price of 0")
    a.add_parser("list", parents=[common])
    c = a.add_parser("update", parents=[common])
    c.add_argument("sku")
    c.add_argument("--name")
    c.add_argument("--price", type=int)
    c.add_argument("--low-stock", type=int)
    c.add_argument("--status", choices=("active", "paused"))
    for c, creating in ((a.choices["create"], True), (c, False)):
        c.add_argument("--sale-order", choices=("oldest_first", "best_rated", "first_expiring"),
                       default="oldest_first" if creating else None, help="which batch sells first")
        c.add_argument("--min-shelf-life", type=int, default=0 if creating else None, metavar="SECONDS",
                       help="time a code must have left before its expires_at to be imported or sold")
        for what in ("code", "pin"):
            c.add_argument(f"--{what}-rule", type=json.loads, metavar="JSON",
                           help=f'what a {what} must look like, e.g. {{"charset": "digits", "min_length": 8}}')
        c.add_argument("--after-sales", choices=("refund", "replace"), default="refund" if creating else None,
                       help="what an approved ticket gives by default")
        c.add_argument("--buckets", type=_buckets, default=1 if creating else None, metavar="N|masters",
                       help="shards its stock is spread over (1-16; on a cluster, over masters by hash slot;"
                            " masters: the fewest that put one on every master)")
    s.set_defaults(run=cmd_sku)

    s = sub.add_parser("supplier", help="create, list, update, fund or report on suppliers")
    a = s.add_subparsers(dest="action", required=True)
    c = a.add_parser("create", parents=[common])
    c.add_argument("supplier")
    c.add_argument("--name", required=True)
    c.add_argument("--deposit", type=int, default=0)
    a.add_parser("list", parents=[common])
    c = a.add_parser("update", parents=[common], help="rename, blacklist or reinstate")
    c.add_argument("supplier")
    c.add_argument("--name")
    c.add_argument("--status", choices=("active", "blacklisted"))
    c.add_argument("--reason", default="manual", help="why (kept with a blacklisting)")
    c = a.add_parser("deposit", parents=[common], help="credit the deposit after-sales refunds are charged to")
    c.add_argument("supplier")
    c.add_argument("amount", type=int, help="minor units")
    c.add_argument("--reference", required=True, help="payment id: the same reference credits once")
    c = a.add_parser("report", parents=[common], help="delivered and invalidated codes, rating, batches")
    c.add_argument("supplier")
    s.set_defaults(run=cmd_supplier)

    s = sub.add_parser("webhook", help="register webhooks; list and replay failed deliveries")
    a = s.add_subparsers(dest="action", required=True)
    c = a.add_parser("set", parents=[common], help="register (or replace) a webhook; prints its signing secret once")
    c.add_argument("url")
    c.add_argument("--distributor", help="its own events (default: the admin webhook, every event)")
    c = a.add_parser("remove", parents=[common])
    c.add_argument("--distributor")
    c = a.add_parser("failed", parents=[common], help="deliveries that used every try")
    c.add_argument("--limit", type=int, default=100)
    c = a.add_parser("replay", parents=[common], help="try failed deliveries again now")
    c.add_argument("job", nargs="?", help="one job id (default: all)")
    s.set_defaults(run=cmd_webhook)

    s = sub.add_parser("ticket", help="list or resolve after-sales tickets")
    a = s.add_subparsers(dest="action", required=True)
    c = a.add_parser("list", parents=[common])
    c.add_argument("--distributor")
    c.add_argument("--status", choices=("open", "approving", "approved", "rejected"))
    c = a.add_parser("resolve", parents=[common])
    c.add_argument("ticket")
    c.add_argument("decision", choices=("approve", "reject"))
    c.add_argument("--replace", action=argparse.BooleanOptionalAction, default=None,
                   help="deliver another code instead of refunding (default: the SKU's after_sales)")
    c.add_argument("--note")
    s.set_defaults(run=cmd_ticket)

    s = sub.add_parser("tier", help="price tiers: create, list; volume tier rules, a distributor's tier, pins")
    a = s.add_subparsers(dest="action", required=True)
    c = a.add_parser("create", parents=[common])
    c.add_argument("tier")
    c.add_argument("--discount-bps", type=int, default=0, help="discount in basis points (500 = 5%%)")
    c.add_argument("--price", action="append", default=[], metavar="SKU=PRICE", help="explicit price (repeatable)")
    a.add_parser("list", parents=[common])
    c = a.add_parser("rules", parents=[common],
                     help="the volume tier rules: show them, or replace them (--rule, repeatable, ascending)")
    c.add_argument("--window", choices=("rolling_30d", "calendar_month"),
                   help="spend over the last 30 days (default) or the last calendar month")
    c.add_argument("--rule", action="append", default=[], metavar="TIER=MIN_SPEND",
                   help="spend (minor units) from which a distributor gets TIER")
    c.add_argument("--clear", action="store_true", help="no rules: tiers by hand only")
    c = a.add_parser("status", parents=[common], help="a distributor's tier, spend and next rule")
    c.add_argument("distributor")
    c = a.add_parser("pin", parents=[common], help="pin a distributor to a tier: the rules leave it alone")
    c.add_argument("distributor")
    c.add_argument("tier", nargs="?", default="", help="the tier (absent: none, the base price)")
    c = a.add_parser("unpin", parents=[common], help="let the rules decide a distributor's tier again")
    c.add_argument("distributor")
    s.set_defaults(run=cmd_tier)

    s = sub.add_parser("distributor", help="create, list or update distributors")
    a = s.add_subparsers(dest="action", required=True)
    for name in ("create", "update"):
        c = a.add_parser(name, parents=[common])
        c.add_argument("distributor")
        c.add_argument("--name", required=name == "create")
        c.add_argument("--tier", help="price tier ('' to remove, on update)")
        c.add_argument("--credit-limit", type=int, default=0 if name == "create" else None)
        c.add_argument("--allowed-skus", metavar="SKU,SKU", help="SKUs it may buy ('*': all)")
        c.add_argument("--rate-limit", type=int, help="requests a second through the daemon (0: unlimited)")
        if name == "update":
            c.add_argument("--status", choices=("active", "suspended"))
    a.add_parser("list", parents=[common])
    s.set_defaults(run=cmd_distributor)

    s = sub.add_parser("topup", parents=[common], help="credit a distributor's balance")
    s.add_argument("distributor")
    s.add_argument("amount", type=int, help="minor units")
    s.add_argument("--reference", required=True, help="payment id: the same reference credits once")
    s.set_defaults(run=cmd_topup)

    s = sub.add_parser("statement", parents=[common], help="a distributor's month from its ledger")
    s.add_argument("distributor")
    s.add_argument("month", help="YYYY-MM (UTC)")
    s.add_argument("--csv", action="store_true", help="CSV on stdout instead of a table")
    s.set_defaults(run=cmd_statement)

    s = sub.add_parser("limits", parents=[common],
                       help="a distributor's transaction limits: show them, or set them all (0 or absent: none)")
    s.add_argument("distributor")
    for flag, what in (("--max-order-qty", "codes an order"), ("--max-order-amount", "minor units an order"),
                       ("--daily", "minor units a day (UTC)"), ("--monthly", "minor units a calendar month")):
        s.add_argument(flag, type=int, help=what)
    s.set_defaults(run=cmd_limits)

    s = sub.add_parser("verify", parents=[common],
                       help="a distributor's real-name verification: show, record (all four options) or withdraw")
    s.add_argument("distributor")
    s.add_argument("--legal-name")
    s.add_argument("--id-type", choices=["national_id", "passport", "business_license", "other"])
    s.add_argument("--id-number")
    s.add_argument("--by", help="who checked the documents")
    s.add_argument("--withdraw", action="store_true")
    s.set_defaults(run=cmd_verify)

    s = sub.add_parser("stock", parents=[common], help="a SKU's codes by state")
    s.add_argument("sku")
    s.set_defaults(run=cmd_stock)

    s = sub.add_parser("export", help="export data as CSV")
    a = s.add_subparsers(dest="what", required=True)
    for what, help_ in (("orders", "every distributor's orders (codes masked unless --codes plain)"),
                        ("ledger", "every ledger entry: distributors' balances, suppliers' deposits")):
        c = a.add_parser(what, parents=[common], help=help_)
        c.add_argument("--from", dest="from_", type=_when, help="ISO 8601; UTC unless it names a zone")
        c.add_argument("--to", type=_when, help="ISO 8601, exclusive")
        c.add_argument("--out", metavar="FILE", help="default: stdout")
        if what == "orders":
            c.add_argument("--codes", choices=("masked", "plain"), default="masked")
    s.set_defaults(run=cmd_export)

    s = sub.add_parser("loadtest", help="drive peak traffic against a daemon, then verify the store")
    g = s.add_mutually_exclusive_group()
    g.add_argument("scenario", nargs="?", metavar="SCENARIO.toml", help="a scenario file")
    g.add_argument("--preset", choices=("steady", "ramp", "flash-sale", "holiday-recharge"),
                   help="a built-in scenario (default: steady)")
    s.add_argument("--url", help="a running daemon, http://HOST:PORT (admin token: --admin-token or "
                                 "DISPATCH_ADMIN_TOKEN)")
    s.add_argument("--admin-token")
    s.add_argument("--spawn", action="store_true", help="start a daemon on a fresh embedded Redis, and stop it after")
    s.add_argument("--keep", action="store_true", help="with --spawn: keep its temp dir (data, log)")
    s.add_argument("--duration", type=float, metavar="S", help="stretch or shrink the scenario to S seconds")
    s.add_argument("--rate-scale", type=float, default=1.0, metavar="X", help="multiply every rate by X")
    s.add_argument("--distributors", type=int)
    s.add_argument("--connections", type=int, help="keep-alive connections at most")
    s.add_argument("--timeout", type=float, metavar="S", help="client timeout from a request's intended start")
    s.add_argument("--reserve-share", type=float, help="share of orders placed as reservations")
    s.add_argument("--confirm-share", type=float, help="share of reservations confirmed (the rest cancelled)")
    s.add_argument("--retry-share", type=float, help="share of orders sent again with the same external_ref")
    s.add_argument("--seed", type=int, help="random seed")
    s.add_argument("--json", metavar="FILE", help="write the report as JSON")
    s.add_argument("--plot", metavar="FILE.png", help="plot throughput and latency over time")
    s.add_argument("--quiet", action="store_true", help="no live progress")
    s.set_defaults(run=cmd_loadtest)

    s = sub.add_parser("admin-token", help="named admin tokens with a role: create, list, revoke")
    a = s.add_subparsers(dest="action", required=True)
    c = a.add_parser("create", parents=[common], help="prints the token once")
    c.add_argument("name")
    c.add_argument("--role", choices=ROLES, required=True)
    a.add_parser("list", parents=[common])
    c = a.add_parser("revoke", parents=[common], help="refused from the next request on")
    c.add_argument("name")
    s.set_defaults(run=cmd_admin_token)

    s = sub.add_parser("audit-log", parents=[common], help="the audit trail of admin writes, most recent first")
    s.add_argument("--actor", help="a token's name, owner, cli:<user>...")
    s.add_argument("--target", help="kind:id (distributor:acme), or an id: every kind")
    s.add_argument("--from", dest="from_", type=_when, help="ISO 8601; UTC unless it names a zone")
    s.add_argument("--to", type=_when, help="ISO 8601, exclusive")
    s.add_argument("--cursor", help="the next page: what the last one printed")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true", help="the page as JSON")
    s.set_defaults(run=cmd_audit_log)

    s = sub.add_parser("keys", parents=[common], help="rotate the master key (re-wraps the fingerprint key)")
    s.set_defaults(run=cmd_keys)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.run is not cmd_serve:  # the daemon sets up its own logging
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except DispatchError as e:
        print(f"error: {e.message}", file=sys.stderr)
    except OSError as e:
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1
