"""How the scripts store orders, batches and tickets, and the small helpers around them.

Shared by the engine and its after-sales half (aftersales.py); not public API.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from ._core import new_ulid, ulid_at
from .errors import ValidationError
from .models import Event, LedgerEntry

T = TypeVar("T")
MAX_REF = 128
#: A reference (external_ref, a top-up's or a deposit's): 1-128 characters, no control
#: character (C0, DEL, C1). JSON Schema's pattern is searched as re.search does, where
#: "$" also matches before a final newline: (?!\n) closes that gap.
REF_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]{1,%d}$(?!\n)" % MAX_REF
_REF = re.compile(REF_PATTERN)
#: Free text (a reason, a note): up to MAX_TEXT characters, not all whitespace, no control
#: character but tab and newline. It is kept trimmed.
MAX_TEXT = 1000
TEXT_PATTERN = r"^[^\x00-\x08\x0b-\x1f]*[^\s\x00-\x08\x0b-\x1f][^\x00-\x08\x0b-\x1f]*$"

new_id = new_ulid  # ULIDs: 48 bits of milliseconds then 80 random bits, so ids sort by creation time


def ms_id_floor(ms: int) -> str:
    """The smallest id (ULID) of millisecond *ms*."""
    return ulid_at(ms, bytes(10))


@lru_cache(maxsize=4096)
def ms_to_dt(ms: int) -> datetime:
    """The UTC datetime of epoch milliseconds *ms* (orders made together share theirs)."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def check(value: Any, typ: type[T], what: str) -> T:
    """*value* converted to *typ*, or ValidationError naming *what*."""
    try:
        return msgspec.convert(value, typ)
    except msgspec.ValidationError as e:
        raise ValidationError(f"invalid {what}: {e}") from None


def check_ref(ref: Any, what: str = "external_ref") -> str:
    if not isinstance(ref, str) or not _REF.search(ref):
        raise ValidationError(f"{what} must be 1-{MAX_REF} characters, none of them a control character")
    return ref


class OrderRec(msgspec.Struct, omit_defaults=True):
    """An order as the account scripts store it (cmsgpack map). A field at its default
    is left out (the scripts read a missing one as its default): every field is work for
    each script that reads the record and packs it again."""

    id: str
    ref: str
    digest: str
    sku: str
    qty: int
    unit_price: int
    currency: str
    mode: Literal["deliver", "reserve"]
    ttl: int
    partial: bool
    status: str
    hold: int
    total: int
    delivered: int
    deadline: int
    created: int
    updated: int
    #: ms it was delivered (0 before), the money refunded by tickets, the event version
    dat: int = 0
    refunded: int = 0
    v: int = 0
    #: the buckets its take looks in, in order ("2,0,1"; "": the SKU's own shard only),
    #: and the one its codes came from
    plan: str = ""
    bk: int = 0
    #: a sub-distributor's order: its ancestors' margins per code, root first, and the
    #: root's unit price (unit_price = bp + sum(mg)); unset (not stored) for any other
    mg: list[int] | UnsetType = UNSET
    bp: int | UnsetType = UNSET


class BatchRec(msgspec.Struct, omit_defaults=True):
    batch_id: str
    sku: str
    supplier: str
    unit_cost: int
    seq: int
    created: int
    status: Literal["importing", "imported", "voided"] = "importing"
    accepted: int = 0
    duplicate: int = 0
    malformed: int = 0
    voided: int = 0
    #: the SKU's buckets when the batch was opened: its codes are spread over 0..buckets-1,
    #: code i of a chunk to the bucket at i mod its length in route ("2,0,1,0"; "": the
    #: buckets in turn)
    buckets: int = 1
    route: str = ""
    #: Sub-batches by expiry: expiry (unix ms) -> the seq of the pool of the codes that
    #: expire then. Codes without an expiry are in the batch's own pool (seq).
    subs: dict[int, int] = {}

    @property
    def seqs(self) -> list[int]:
        """The seqs of every pool of the batch: its own, then its sub-batches'."""
        return [self.seq, *self.subs.values()]


class TicketRec(msgspec.Struct):
    """A ticket as the account scripts store it (see lua/ticket_*.lua)."""

    id: str
    order: str
    index: int
    sku: str
    reason: str
    status: Literal["open", "approving", "approved", "rejected"]
    unit_price: int
    created: int
    updated: int
    v: int
    note: str = ""
    replace: bool = False
    outcome: str = ""
    refund: int = 0
    #: base64 of the replacement code's ciphertext
    replacement: str = ""
    cost: int = 0


#: Order statuses whose codes their buyer sees: paid for (refunded ones too: the buyer has them anyway).
PAID = frozenset({"delivered", "partially_refunded", "refunded"})

decode_order = msgspec.msgpack.Decoder(OrderRec).decode
decode_batch = msgspec.msgpack.Decoder(BatchRec).decode
decode_ticket = msgspec.msgpack.Decoder(TicketRec).decode
decode_codes = msgspec.msgpack.Decoder(list[bytes]).decode
encode = msgspec.msgpack.encode


def running(rows: list[list[str]], balance: int = 0,
            held: int = 0) -> Iterator[tuple[str, str, int, int, int, int, int, bool]]:
    """Stored ledger entries (see _account.lua), from the one after which the balance and
    held amount were *balance* and *held*, each as (kind, ref, amount, held delta,
    balance, held, ms, off): its balance and held are the sums of the entries up to it;
    off is True where the entry carries its own (the last of a script call's does) and
    they are not those sums."""
    for r in rows:
        b, h = int(r[2]), int(r[3])
        balance, held = balance + b, held + h
        yield r[0], r[1], b, h, balance, held, int(r[-1]), len(r) == 7 and (int(r[4]), int(r[5])) != (balance, held)


def ledger_entries(rows: list[list[str]]) -> list[LedgerEntry]:
    """A whole ledger's entries from their stored fields, numbered from 0."""
    return [LedgerEntry(entry_id=str(i), kind=kind, ref=ref, amount=b, held_delta=h,  # type: ignore[arg-type]
                        balance=bal, held=hld, at=ms_to_dt(ms))
            for i, (kind, ref, b, h, bal, hld, ms, _) in enumerate(running(rows))]


def _order_event_data(data: dict[str, Any]) -> dict[str, Any]:
    """What an order event tells: the scripts store the order's record as its data (one
    msgpack pack, not two) and this picks the event's fields from it. Data that is not
    a record (entries written before that) is told as it is."""
    if "id" not in data or "ref" not in data:
        return data
    return {"order_id": data["id"], "external_ref": data["ref"], "sku": data["sku"], "qty": data["qty"],
            "delivered": data["delivered"], "unit_price": data["unit_price"], "total": data["total"],
            "refunded": data.get("refunded", 0), "status": data["status"]}


def decode_events(entry_id: str, fields: dict[bytes, bytes]) -> list[Event]:
    """The events of a stream entry (see lua/_events.lua): one, or one per order record
    of an entry that tells a round's orders at once, numbered ``<entry id>.<k>`` from 0.
    ValueError if it is malformed."""
    try:
        kind, at = fields[b"type"].decode(), ms_to_dt(int(fields[b"at"]))
        if b"records" in fields:
            return [Event(event_id=f"{entry_id}.{k}", type=kind, entity="order:" + r["id"], version=int(r.get("v", 0)),
                          at=at, data=_order_event_data(r))
                    for k, r in enumerate(msgspec.msgpack.decode(fields[b"records"], type=list[dict[str, Any]]))]
        entity = fields[b"entity"].decode()
        data = msgspec.msgpack.decode(fields[b"data"], type=dict[str, Any])
        if entity.startswith("order:"):
            data = _order_event_data(data)
        return [Event(event_id=entry_id, type=kind, entity=entity, version=int(fields[b"v"]), at=at, data=data)]
    except (KeyError, ValueError, UnicodeDecodeError, msgspec.DecodeError) as e:
        raise ValueError(f"malformed event {entry_id}: {type(e).__name__}: {e}") from None
