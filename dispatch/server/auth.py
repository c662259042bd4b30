"""Who is asking: distributor API keys (cached briefly), admin tokens (the configured
one, the owner, and named ones with a role, looked up on every request: a revoked one
is refused at once), and optional request signatures.

Signatures (``require_signatures``): a distributor request carries

    X-Dispatch-Timestamp: <unix seconds>
    X-Dispatch-Signature: hex(hmac_sha256(api_key, timestamp "\\n" method "\\n" target "\\n" hex(sha256(body))))

where *target* is the request target exactly as sent (path and ``?query``) and the
secret is the API key itself. A timestamp more than 60 s off the server's clock,
or a signature seen in the last 120 s (kept in Redis, so every worker and host
sees it), is refused with 401. What this adds to the bearer key: a captured
request cannot be replayed or altered, for example from a proxy's log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..admins import OWNER, Admin
from ..config import Config
from ..engine import Engine
from ..errors import UnauthorizedError
from ..models import Access
from ..shared import SharedLoads

if TYPE_CHECKING:
    from .request import Request

__all__ = ["Authenticator", "sign", "load_admin_token", "ADMIN_TOKEN_FILE"]

log = logging.getLogger("dispatch.server")

ADMIN_TOKEN_FILE = "admin.token"
SKEW_S = 60
_CACHE_MAX = 10_000


def sign(api_key: str, timestamp: str, method: str, target: str, body: bytes) -> str:
    """The X-Dispatch-Signature of a request (what clients compute, and the server checks)."""
    message = f"{timestamp}\n{method}\n{target}\n{hashlib.sha256(body).hexdigest()}".encode()
    return hmac.new(api_key.encode(), message, hashlib.sha256).hexdigest()


def _bearer(req: Request) -> str | None:
    value = req.headers.get(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    try:
        return token.strip().decode("ascii")
    except UnicodeDecodeError:
        return None


class Authenticator:
    """Checks credentials; knows nothing of routes (the router says which check applies)."""

    def __init__(self, engine: Engine, config: Config) -> None:
        self._engine = engine
        self._signed = config.require_signatures
        self._admin = config.admin_token.encode() if config.admin_token else None
        self._keys: SharedLoads[str, Access] = SharedLoads(config.auth_cache_ttl_s, _CACHE_MAX)

    async def admin(self, req: Request) -> Admin:
        """The admin behind the request's token: the configured token is the owner."""
        if self._admin is None:
            raise UnauthorizedError("admin endpoints are disabled: no admin_token is configured")
        token = _bearer(req)
        if token is None:
            raise UnauthorizedError("missing or invalid admin token")
        if hmac.compare_digest(token.encode(), self._admin):
            return Admin(OWNER, "owner")
        return await self._engine.admin_by_token(token)

    async def distributor(self, req: Request) -> Access:
        """The distributor behind the request's API key (and signature, when required)."""
        key = _bearer(req)
        if key is None:
            raise UnauthorizedError("send the API key as Authorization: Bearer <api key>")
        access = await self._keys.get(key, lambda: self._engine.access(key))  # a key that fails is not kept
        if self._signed:
            await self._check_signature(req, key, access.distributor)
        return access

    async def _check_signature(self, req: Request, api_key: str, distributor: str) -> None:
        stamp = req.headers.get(b"x-dispatch-timestamp")
        given = req.headers.get(b"x-dispatch-signature")
        if stamp is None or given is None:
            raise UnauthorizedError("requests must be signed: send X-Dispatch-Timestamp and X-Dispatch-Signature")
        if not stamp.isdigit() or abs(time.time() - int(stamp)) > SKEW_S:
            raise UnauthorizedError(f"X-Dispatch-Timestamp must be unix seconds within {SKEW_S} s of the server's clock")
        expected = sign(api_key, stamp.decode(), req.method, req.target.decode("latin-1"), req.body)
        if not hmac.compare_digest(given.strip().lower(), expected.encode()):
            raise UnauthorizedError("X-Dispatch-Signature does not match the request")
        if not await self._engine.remember_signature(distributor, expected, ttl_s=2 * SKEW_S):
            raise UnauthorizedError("this signature was used before: sign every request anew")


def load_admin_token(config: Config) -> str:
    """The admin token: from the config, else from (or generated into) ``data_dir/admin.token``."""
    if config.admin_token:
        return config.admin_token
    path = Path(config.data_dir) / ADMIN_TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write("adm_" + secrets.token_urlsafe(32) + "\n")
            log.warning("no admin_token configured: generated one into %s (set DISPATCH_ADMIN_TOKEN to "
                        "choose your own)", path.resolve())
    token = path.read_text().strip()
    log.info("admin token: read from %s", path.resolve())
    return token
