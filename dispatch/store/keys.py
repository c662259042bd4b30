"""Every Redis key the engine uses, in one place.

Keys are grouped by *hash tag* so that each Lua script touches one tag only and
runs unchanged on Redis Cluster (all but ``deliver``, which spans the SKUs and
accounts of a round on the node that holds them all):

``{g}``        global catalog: SKU/distributor registries, suppliers, tiers, API keys, batches
``{s:SKU}``    one SKU's shard: metadata, counters, per-batch pools, delivery records
``{s:SKU~B}``  bucket B (1, 2...) of a SKU spread over several masters: a shard like the
               SKU's own, with its own pools, counters and delivery records (bucket 0 is
               the SKU's own shard; see bucket_shard)
``{a:DIST}``   one distributor's account: balance, ledger, orders, leases, pending sagas;
               and its sub-distributors' accounts (a whole tree is one shard, see acct_tag)
``{p:SUP}``    one supplier's shard: deposit, its ledger, charges, batches, events
``{f:XX}``     one of 256 fingerprint shards for global dedupe of imported codes
``{w}``        webhook deliveries (dispatch/webhooks.py)
``{t}``        the admins' audit trail: a stream of its own, away from the catalog's node
``{r:N}``      a master's replication marker (acked)

Every shard with events has its own Redis Stream (``events``), written by the same
script that makes the change, so an event is never lost nor told twice.

Pools are one LIST per batch (``p:SEQ``), named by the scripts from ``pool_prefix``;
that keeps voiding a batch O(1) and lets the sale order between batches be chosen.
"""

from __future__ import annotations

PREFIX = "d:"

# ---- global {g} --------------------------------------------------------------
SKUS = PREFIX + "{g}:skus"              # SET of SKU ids
DISTS = PREFIX + "{g}:dists"            # SET of distributor ids
SUPPLIERS = PREFIX + "{g}:suppliers"    # SET of supplier ids
TIERS = PREFIX + "{g}:tiers"            # HASH id -> msgpack Tier
APIKEYS = PREFIX + "{g}:apikeys"        # HASH sha256(api key) -> distributor id
KEYOF = PREFIX + "{g}:keyof"            # HASH distributor id -> sha256(api key)
BATCHES = PREFIX + "{g}:batches"        # HASH batch id -> msgpack {sku, seq, ...}
SEQ = PREFIX + "{g}:seq"                # HASH counter name -> int
FPKEY = PREFIX + "{g}:fpkey"            # the wrapped fingerprint key
TICKETS = PREFIX + "{g}:tickets"        # HASH ticket id -> distributor id
BATCH_SEQ = PREFIX + "{g}:batchseq"     # HASH batch seq -> batch id
TIER_RULES = PREFIX + "{g}:tierrules"   # HASH v (version, grows with each change), rules (msgpack TierRules)
ADMINS = PREFIX + "{g}:admins"          # HASH admin token name -> msgpack admins.AdminRec (role, hash...)
ADMINKEYS = PREFIX + "{g}:adminkeys"    # HASH sha256(admin token) -> name

# ---- the audit trail {t} (dispatch/trail.py) --------------------------------------
TRAIL = PREFIX + "{t}:trail"            # STREAM one entry per admin write: actor, via, action, target,
#                                         outcome, before, after (JSON); appended only, never trimmed

# ---- webhook deliveries {w} (dispatch/webhooks.py) ------------------------------
WEBHOOK_CURSOR = PREFIX + "{w}:cursor"    # HASH event stream key -> id of the last entry consumed
WEBHOOK_JOBS = PREFIX + "{w}:jobs"        # HASH job id -> msgpack job (the body it sends, attempts...)
WEBHOOK_DUE = PREFIX + "{w}:due"          # ZSET job id -> ms of its next attempt (or of its lease's end)
WEBHOOK_FAILED = PREFIX + "{w}:failed"    # ZSET job id -> ms it failed for good
WEBHOOK_TARGETS = PREFIX + "{w}:targets"  # HASH "admin" | "dist:<id>" -> msgpack {url, sealed secret, created}


#: Joins a SKU id and a bucket number in a shard id; never part of an id (models.Id).
BUCKET = "~"
#: The most buckets a SKU may be spread over.
MAX_BUCKETS = 16


def bucket_shard(sku: str, bucket: int) -> str:
    """The shard id of bucket *bucket* of a SKU: the SKU itself for bucket 0, ``SKU~B``
    otherwise. The SKU scripts take a bucket's keys (``SkuKeys(shard)``) as a SKU's."""
    return sku if bucket == 0 else sku + BUCKET + str(bucket)


def sku_tag(sku: str) -> str:
    """The prefix of a SKU's keys, or of a bucket's (*sku* a shard id of bucket_shard)."""
    return PREFIX + "{s:" + sku + "}:"


#: Joins a parent's id and a sub-distributor's own name in the sub's id (``shop-1~agent-a``,
#: its sub ``shop-1~agent-a~retail``); never part of a distributor's own id (models.Id).
SUB = "~"


def acct_tag(dist: str) -> str:
    """The prefix of an account's keys. A sub-distributor's keys carry its root
    distributor's hash tag (the part of its id before the first ``~``), followed by the
    rest of its id: ``d:{a:shop-1}:~agent-a:``. So a whole tree is one shard: the account
    script that charges a sub also credits every ancestor its margin and checks their
    status, on one node, on one Redis or a cluster. _margins.lua names an ancestor's keys
    from its id by the same rule."""
    root, sep, rest = dist.partition(SUB)
    return PREFIX + "{a:" + root + "}:" + (sep + rest + ":" if sep else "")


def supplier_tag(supplier: str) -> str:
    return PREFIX + "{p:" + supplier + "}:"


def events_key(kind: str, id_: str) -> str:
    """The event stream of a distributor (``dist``), a SKU (``sku``) or a supplier (``supplier``)."""
    tag = {"dist": acct_tag, "sku": sku_tag, "supplier": supplier_tag}[kind]
    return tag(id_) + "events"


#: A field, from their creation, of the hashes a purchase reads or writes field by field
#: (an account, its codes and its external_refs; a SKU shard's metadata, counters,
#: delivery records and their codes, batch counters and sales by hour), whose value is
#: longer than a small hash may hold (hash-max-ziplist-value, 64 bytes by default), so
#: Redis keeps each a hash table: a small hash (up to hash-max-ziplist-entries fields,
#: 512 by default) is a flat list, where reading a field is a scan of the fields before
#: it (of all of them, for one that is absent, as most of an account's limits and every
#: new external_ref are) and writing one a scan of all of them. Readers of these hashes
#: skip it.
PIN = "~"
PIN_FIELD = PIN.encode()  # as redis-py returns it
PIN_VALUE = "a hash table: this value is longer than hash-max-ziplist-value (64 bytes by default)"
#: The pin of an account's external_refs, a field no external_ref can be (records.REF_PATTERN).
REFS_PIN = "\x00"


class SkuKeys:
    """Keys of one SKU shard (a SKU, or a bucket of one), in the order the SKU scripts take them."""

    __slots__ = ("meta", "stats", "queue", "dlv", "dlv_codes", "chunks", "void", "pool_prefix", "batch_stats",
                 "parked", "sales", "scores", "events", "expq", "expired", "all")

    def __init__(self, sku: str) -> None:
        t = sku_tag(sku)
        self.meta = t + "meta"          # HASH name, face_value, currency, price, status, buckets, spread...
        #                                 (a bucket holds a copy: its scripts check status)
        self.stats = t + "stats"        # HASH accepted, available, reserved, sold, voided, invalidated, parked,
        #                                 expired, level; next_exp (the earliest expiry in expq, ms: absent, none),
        #                                 expiring; a bucket's: chg (its changes); a spread SKU's own: bav:B and
        #                                 bchg:B (what bucket B told last), others (their sum; sku_level.lua)
        self.queue = t + "bq"           # ZSET batch seq -> sale priority (lowest sold first)
        self.dlv = t + "dlv"            # HASH order id -> cmsgpack {st = state, b = {seq, count, ...}};
        #                                 and PIN (see there, as on meta, stats and an account's acct)
        self.dlv_codes = t + "dlvc"     # HASH order id -> its codes, each with a 2-byte length prefix (reservations
        #                                 and replacements; a delivered order's codes are its account's); and PIN
        self.chunks = t + "chunks"      # HASH "seq:chunk" -> digest (import idempotency)
        self.void = t + "void"          # SET of voided batch seqs
        self.pool_prefix = t + "p:"     # LIST per batch: pool_prefix .. seq
        self.batch_stats = t + "bstat"  # HASH "seq:d" codes of batch seq delivered, "seq:i" invalidated,
        #                                 "seq:e" expired
        self.parked = t + "parked"      # SET of parked batch seqs (their supplier is blacklisted)
        self.sales = t + "sales"        # HASH hour (unix ms // 3600000) -> codes sold in it
        self.scores = t + "bscore"      # HASH seq -> sale priority of the batch (absent: seq, oldest first)
        self.events = t + "events"      # STREAM stock.low, stock.out, stock.restored
        # Batches whose codes expire (one expiry each: an import's codes are split by expiry
        # into sub-batches, records.BatchRec.subs). retire_due (lua/_codes.lua) names these
        # two, and void, parked, bstat, bq, stats, p:, from the tag: keep the names in step.
        self.expq = t + "expq"          # ZSET batch seq -> expiry (ms), until the batch is retired
        self.expired = t + "expired"    # SET of retired batch seqs: their codes are counted expired
        self.all = [self.meta, self.stats, self.queue, self.dlv, self.chunks, self.void, self.dlv_codes,
                    self.batch_stats, self.parked, self.sales, self.scores, self.events, self.expq, self.expired]

    def pool(self, seq: int) -> str:
        return self.pool_prefix + str(seq)


class AcctKeys:
    """Keys of one distributor account, in the order the account scripts take them."""

    __slots__ = ("acct", "ledger", "refs", "orders", "codes", "index", "leases", "pending", "topups", "events",
                 "tickets", "claims", "all")

    def __init__(self, dist: str) -> None:
        t = acct_tag(dist)
        self.acct = t + "acct"          # HASH balance, held, credit_limit, status, tier, allowed, ...; volume
        #                                 tiers: tpin, trv, tver, tday, tup, tlo, tdue (lua/tier_apply.lua)
        self.ledger = t + "ledger"      # LIST of entries "kind ref b h ms", \x1f-joined
        self.refs = t + "refs"          # HASH external_ref -> order id; and REFS_PIN
        self.orders = t + "orders"      # HASH order id -> cmsgpack order
        self.codes = t + "codes"        # HASH order id -> msgpack list of code ciphertexts; and PIN
        self.index = t + "oidx"         # ZSET (score 0) of the ids a call opened, concatenated, the least first
        #                                 (ULIDs sort by time; one member per call and 32 ms window)
        self.leases = t + "leases"      # ZSET order id -> reservation deadline (ms)
        self.pending = t + "pending"    # ZSET order id -> ms of its last saga step
        self.topups = t + "topups"      # HASH top-up reference -> amount
        self.events = t + "events"      # STREAM order.delivered, order.expired, ticket.*, distributor.tier_changed ...
        self.tickets = t + "tickets"    # HASH ticket id -> cmsgpack ticket
        self.claims = t + "claims"      # HASH "order_id:code index" -> ticket id (a code is claimed once)
        self.all = [self.acct, self.ledger, self.refs, self.orders, self.codes, self.index, self.leases,
                    self.pending, self.topups, self.events, self.tickets, self.claims]


class SupplierKeys:
    """Keys of one supplier, in the order the supplier scripts take them.

    The deposit is kept like an account balance (``balance``, with ``held`` always 0)
    so that the account scripts' ledger helpers serve it unchanged.
    """

    __slots__ = ("acct", "ledger", "refs", "events", "batches", "all")

    def __init__(self, supplier: str) -> None:
        t = supplier_tag(supplier)
        self.acct = t + "acct"          # HASH name, balance (the deposit), held (0), status, invalidated, ver
        self.ledger = t + "ledger"      # LIST of entries, as an account's
        self.refs = t + "refs"          # HASH "kind:reference" -> amount (deposits and charges happen once)
        self.events = t + "events"      # STREAM supplier.blacklisted, supplier.reinstated
        self.batches = t + "batches"    # SET of the supplier's batch ids
        self.all = [self.acct, self.ledger, self.refs, self.events, self.batches]


_BUCKET_KEYS: list[str] = []


def fingerprint_buckets() -> list[str]:
    """The key of every fingerprint bucket, by ``fp[0] * 256 + fp[1]``: a 16-byte
    fingerprint lives in shard ``{f:<fp[0]>}``, bucket ``<fp[1]>``, field ``fp[2:]``.

    256 tags x 256 buckets keep each bucket a small listpack-encoded HASH
    (about 15 codes per bucket at a million codes), which is what keeps the
    dedupe index to a few bytes per code.
    """
    if not _BUCKET_KEYS:
        _BUCKET_KEYS.extend(fingerprint_shard(shard) + "%02x" % bucket for shard in range(256) for bucket in range(256))
    return _BUCKET_KEYS


def fingerprint_shard(shard: int) -> str:
    """The prefix of the buckets of fingerprint shard *shard* (``fp[0]``): bucket
    ``fp[1]`` is this prefix and two lowercase hex digits (what ``fp_claim`` builds)."""
    return PREFIX + "{f:%02x}:" % shard


# ---- replication -------------------------------------------------------------------------


def acked(n: int) -> str:
    """STRING "": written after each round of scripts, just before ``WAIT`` (with
    ``min_replicas_acked``), so that the connection's replication offset is the master's
    even when the round's scripts wrote nothing (a replay of an order made on another
    connection); see store/replication.py. One Redis writes ``acked(0)``; each master of
    a cluster the first ``acked(n)`` whose slot it serves."""
    return PREFIX + "{r:%d}:acked" % n


# ---- per-account keys outside the account scripts' KEYS --------------------------------


def rate_bucket(dist: str) -> str:
    """HASH ``tokens`` (thousandths of a request), ``ts`` (ms): the account's token bucket."""
    return acct_tag(dist) + "rl"


def children(dist: str) -> str:
    """SET of the ids of the account's own sub-distributors."""
    return acct_tag(dist) + "kids"


def transfers(dist: str) -> str:
    """HASH reference -> amount: transfers from the account's parent to it (once each)."""
    return acct_tag(dist) + "xfers"


def spend_days(dist: str) -> str:
    """HASH day (since 1970-01-01, UTC) -> what the account paid for purchases that day,
    net of refunds: the volume tiers' spend. Written by the account's money scripts,
    which name it from their ``acct`` key (count_spend, lua/_limits.lua); days no
    window needs are dropped by tier_apply.lua."""
    return acct_tag(dist) + "spend"


def seen_signature(dist: str, signature: str) -> str:
    """STRING, set with EX: a signed request already served (replays are refused)."""
    return acct_tag(dist) + "sig:" + signature
