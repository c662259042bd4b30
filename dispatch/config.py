"""Configuration: one frozen Struct, read from defaults, a TOML file and the environment.

Precedence: defaults < ``--config`` TOML file < ``DISPATCH_*`` environment variables.
Every field may be set in the file under its own name, or in the environment as
``DISPATCH_<NAME>`` (upper case).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import unquote

import msgspec

from .errors import ConfigError

__all__ = ["Config", "ClusterUrl", "SentinelUrl", "cluster_url", "sentinel_url"]

Positive = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Everything an engine or daemon needs to know; the defaults need no file."""

    #: ``redis://``, ``rediss://`` or ``unix://`` URL of one Redis;
    #: ``redis+sentinel://host:port[,host:port...]/service_name`` naming the sentinels
    #: that watch a master and its replicas (the master is followed across failovers);
    #: ``redis+cluster://host:port[,host:port...]`` naming seed nodes of a Redis Cluster
    #: (``rediss+...`` for TLS); unset starts the embedded redis-server.
    redis_url: str | None = None
    #: Where the embedded Redis keeps its AOF, socket and lock, and the generated master key.
    data_dir: str = "data"
    #: Explicit path to a ``redis-server`` binary for the embedded store.
    redis_server: str | None = None
    #: jemalloc for an embedded redis-server built with libc's malloc: "auto" preloads
    #: the system's libjemalloc.so.2 when found, "required" refuses to start without it.
    redis_jemalloc: Literal["auto", "required", "off"] = "auto"
    #: fsync policy of the embedded Redis; ``always`` makes every reply durable.
    appendfsync: Literal["always", "everysec", "no"] = "always"
    #: Connections in the pool to Redis.
    redis_pool_size: Positive = 64
    #: Seconds to wait for Redis on connect and per command before failing.
    redis_timeout_s: Seconds = 5.0
    #: Replicas that must have a round's writes before any caller of the round hears its
    #: answer (on a cluster: of every master the round wrote to); 0 answers once the
    #: master has them.
    min_replicas_acked: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    #: What those replicas must have done: "received" the writes (WAIT: enough for a
    #: replica promoted after the master died), or "fsynced" them to their AOF (WAITAOF:
    #: also when every machine loses power; needs Redis >= 7.2 or Valkey, whose replicas
    #: acknowledge it only about once a second, so each round waits that long).
    replica_ack: Literal["received", "fsynced"] = "received"
    #: How long a round waits for those replicas before it fails as store_unavailable.
    replica_ack_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 1000

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    workers: Positive = 1
    admin_token: str | None = None
    #: Base64 of 32 bytes. Unset: generated once into ``data_dir`` (mode 0600).
    master_key: str | None = None
    #: Earlier master keys, still accepted for decryption after a rotation.
    old_master_keys: tuple[str, ...] = ()

    #: Longest accepted code (and pin/serial) in characters; longer lines are malformed.
    max_code_length: Annotated[int, msgspec.Meta(ge=4, le=1024)] = 128
    #: Codes pushed to Redis per import step (one pipelined round).
    import_chunk: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10_000
    #: Reservation lease when the order does not name one, and the longest allowed.
    reserve_ttl_s: Annotated[int, msgspec.Meta(ge=1)] = 300
    max_reserve_ttl_s: Annotated[int, msgspec.Meta(ge=1)] = 86_400
    #: How often the background sweep expires leases and recovers half-done orders.
    sweep_interval_s: Seconds = 1.0
    #: The sweep counts a SKU's codes on sale that reach their sell-by within this
    #: window (Stock.expiring, the dispatch_stock_expiring_codes metric) ...
    expiring_window_s: Seconds = 7 * 86_400.0
    #: ... and tells stock.expiring when they are at least this many (0: never).
    expiring_alert_codes: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: An order still mid-saga after this long is finished (or rolled back) by the sweep.
    recovery_grace_s: Seconds = 10.0
    #: How long prices and tiers are cached in-process before being re-read.
    catalog_ttl_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    #: Most orders coalesced into one script call per shard; a second call beside one in
    #: flight waits for an eighth of it (dispatch/coalescer.py).
    coalesce_max: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    #: False sends one script call per order and step (the straightforward way; benchmarks compare).
    coalesce: bool = True
    #: Largest qty in one order.
    max_order_qty: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000
    #: Only distributors whose real name is verified may buy (the others: 403
    #: ``verification_required``). Each distributor's own limits apply either way.
    require_verification: bool = False

    # ---- daemon ---------------------------------------------------------------------
    #: Longest request line plus headers; more is refused with 413 and the connection closed.
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 16 * 1024
    #: Largest JSON request body.
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1024 * 1024
    #: Largest import upload (``POST /admin/batches``, streamed, never held whole).
    max_import_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1024 ** 3
    #: A request's line and headers must arrive within this many seconds of its first byte.
    header_timeout_s: Seconds = 10.0
    #: A JSON body must arrive within this many seconds of the headers; an import
    #: upload may not pause longer than this between two blocks.
    body_timeout_s: Seconds = 30.0
    #: An import upload must be complete within this many seconds of its headers,
    #: however steadily it trickles.
    upload_timeout_s: Seconds = 3600.0
    #: An idle keep-alive connection is closed after this many seconds.
    keepalive_timeout_s: Seconds = 15.0
    #: Open connections per worker process; one more is accepted and closed at once.
    max_connections: Positive = 1000
    #: On SIGTERM/SIGINT, how long requests in flight may take to finish.
    shutdown_timeout_s: Seconds = 10.0
    #: How long a distributor's API key (and its rate limit) is trusted without
    #: asking Redis again: a rotated key stops working within this time.
    auth_cache_ttl_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 1.0
    #: Distributor requests must carry X-Dispatch-Timestamp and X-Dispatch-Signature.
    require_signatures: bool = False
    #: Requests a second allowed to a distributor with no rate_limit of its own (0: unlimited).
    default_rate_limit: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: One JSON line per request on the ``dispatch.access`` logger (stdout under ``dispatch serve``).
    access_log: bool = True

    # ---- after-sales, suppliers, events ---------------------------------------------
    #: How long after delivery a distributor may file a ticket on a code.
    ticket_window_s: Annotated[int, msgspec.Meta(ge=1)] = 7 * 86_400
    #: Blacklist a supplier automatically once its invalidated / delivered codes exceed this.
    auto_blacklist: bool = True
    blacklist_invalid_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.05
    #: ... and it has delivered at least this many codes (a small sample proves nothing).
    blacklist_min_delivered: Annotated[int, msgspec.Meta(ge=1)] = 50
    #: What happens to a blacklisted supplier's unsold codes: parked (kept off sale,
    #: back on sale if it is reinstated) or voided (withdrawn for good).
    blacklist_action: Literal["park", "void"] = "park"
    #: Restock forecast: days of sales history weighed, and supplier lead time.
    forecast_window_days: Annotated[int, msgspec.Meta(ge=1, le=365)] = 28
    restock_lead_time_days: Annotated[float, msgspec.Meta(ge=0)] = 7.0
    #: Webhook delivery: tries per event before it is parked as failed, the first
    #: retry delay (doubling each time, capped), and the timeout of one try.
    webhook_max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 12
    webhook_backoff_s: Seconds = 5.0
    webhook_backoff_cap_s: Seconds = 3600.0
    webhook_timeout_s: Seconds = 5.0

    def __post_init__(self) -> None:
        # a malformed cluster or sentinel URL is refused here, by name
        if self.redis_url is not None:
            cluster_url(self.redis_url)
            sentinel_url(self.redis_url)
        if self.min_replicas_acked and self.redis_url is None:
            raise ConfigError("min_replicas_acked needs replicas: the embedded Redis has none; "
                              "set redis_url to masters with replicas (redis+sentinel://, redis+cluster:// "
                              "or redis://)")
        if self.max_reserve_ttl_s < self.reserve_ttl_s:
            raise ConfigError(
                f"max_reserve_ttl_s ({self.max_reserve_ttl_s}) is below reserve_ttl_s ({self.reserve_ttl_s})"
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None,
             **overrides: Any) -> Config:
        """Defaults, then the TOML file at *path*, then ``DISPATCH_*`` variables, then *overrides*."""
        data: dict[str, Any] = {}
        if path is not None:
            data.update(_read_toml(path))
        data.update(_from_environ(os.environ if environ is None else environ))
        data.update({k: v for k, v in overrides.items() if v is not None})
        return _convert(data, source=str(path) if path else "environment")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Defaults overridden by ``DISPATCH_*`` environment variables."""
        return cls.load(None, environ)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Config:
        """Defaults overridden by a TOML file (the environment is not read)."""
        return _convert(_read_toml(path), source=str(path))


_FIELDS = frozenset(Config.__struct_fields__)


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith("DISPATCH_"):
            continue
        field = name[len("DISPATCH_"):].lower()
        if field not in _FIELDS:
            continue  # other tools share the prefix; the file is where typos are caught
        if field == "old_master_keys":
            out[field] = [v for v in value.replace(",", " ").split() if v]
        else:
            out[field] = value
    return out


def _convert(data: dict[str, Any], *, source: str) -> Config:
    try:
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid configuration ({source}): {e}") from None


class ClusterUrl(NamedTuple):
    """A ``redis+cluster://`` URL taken apart: its seed nodes and how to log in."""

    tls: bool
    seeds: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None


class SentinelUrl(NamedTuple):
    """A ``redis+sentinel://`` URL taken apart: the sentinels, the service they watch,
    and how to log in to its master (the sentinels themselves are asked without)."""

    tls: bool
    sentinels: tuple[tuple[str, int], ...]
    service: str
    username: str | None
    password: str | None


_CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}
_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}


def cluster_url(url: str) -> ClusterUrl | None:
    """The seed nodes of a ``redis+cluster://`` / ``rediss+cluster://`` URL
    (``[user:password@]host:port[,host:port...][/0]``); None for any other URL (one
    Redis). ConfigError, naming what is wrong, if a cluster URL is malformed."""
    opened = _opened(url, _CLUSTER_SCHEMES, "cluster")
    if opened is None:
        return None
    tls, rest, bad = opened
    where, _, db = rest.partition("/")
    if db not in ("", "0"):
        raise bad(f"a cluster has only database 0, not {db!r}")
    username, password, seeds = _nodes(where, "seed node", bad)
    return ClusterUrl(tls, seeds, username, password)


def sentinel_url(url: str) -> SentinelUrl | None:
    """The sentinels and service of a ``redis+sentinel://`` / ``rediss+sentinel://`` URL
    (``[user:password@]host:port[,host:port...]/service_name``); None for any other
    URL. ConfigError, naming what is wrong, if a sentinel URL is malformed."""
    opened = _opened(url, _SENTINEL_SCHEMES, "sentinel")
    if opened is None:
        return None
    tls, rest, bad = opened
    where, slash, service = rest.partition("/")
    if not slash or not service:
        raise bad("no service name (expected host:port[,host:port...]/service_name)")
    if "/" in service:
        raise bad(f"{service!r}: the path is one service name (a database other than 0 is not supported)")
    username, password, sentinels = _nodes(where, "sentinel", bad)
    return SentinelUrl(tls, sentinels, unquote(service), username, password)


def _opened(url: str, schemes: dict[str, bool], kind: str) -> tuple[bool, str, Callable[[str], ConfigError]] | None:
    """(TLS or not, what follows ``://``, a maker of errors naming the scheme) of a URL
    of one of *schemes*; None for any other URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in schemes:
        return None

    def bad(why: str) -> ConfigError:
        return ConfigError(f"redis_url {scheme}://...: {why}")

    if "?" in rest or "#" in rest:
        raise bad(f"a {kind} URL takes no query or fragment")
    return schemes[scheme.lower()], rest, bad


def _nodes(where: str, what: str, bad: Callable[[str], ConfigError]) -> tuple[str | None, str | None, tuple[tuple[str, int], ...]]:
    """``[user:password@]host:port[,host:port...]``: (username, password, nodes)."""
    login, at, hosts = where.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = login.partition(":")
        username, password = unquote(user) or None, unquote(secret) if colon else None
    if not hosts:
        raise bad(f"no {what} (expected host:port[,host:port...])")
    nodes = []
    for node in hosts.split(","):
        if not node:
            raise bad(f"an empty {what} in {hosts!r}")
        if node.startswith("["):  # [IPv6]:port
            host, close, port = node[1:].partition("]")
            if not close or not port.startswith(":"):
                raise bad(f"{what} {node!r} is not [ipv6]:port")
            port = port[1:]
        else:
            host, colon, port = node.rpartition(":")
            if not colon:
                raise bad(f"{what} {node!r} has no port (expected host:port)")
        if not host:
            raise bad(f"{what} {node!r} has no host")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise bad(f"{what} {node!r}: the port must be a number from 1 to 65535")
        nodes.append((host, int(port)))
    return username, password, tuple(nodes)
