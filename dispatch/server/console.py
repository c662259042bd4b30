"""The operator's console: plain HTML, CSS and JavaScript modules kept in the package
(``dispatch/console/``) and served as they are, with no build step and nothing
fetched from elsewhere. The page signs in with the admin token, keeps it in the
tab's sessionStorage and calls the admin API with it as a Bearer header.

Every file is answered with a strict Content-Security-Policy (only this origin's
files; no inline script or style, no plugins, no framing), so that a value the page
shows can never run as code even if it held markup: the scripts put values in as
text nodes besides.
"""

from __future__ import annotations

from importlib import resources

from ..errors import NotFoundError
from .responses import Reply

__all__ = ["asset", "ASSET_PATTERN", "CSP"]

CSP = (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: The names a console file may have (anything else is a 404 before any lookup).
ASSET_PATTERN = r"[a-z]{1,32}\.(?:html|css|js)"

_TYPES = {"html": b"text/html; charset=utf-8", "css": b"text/css; charset=utf-8",
          "js": b"text/javascript; charset=utf-8"}
_HEADERS = [(b"content-security-policy", CSP), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"), (b"cache-control", b"no-cache")]


def _load() -> dict[str, Reply]:
    out = {}
    for f in resources.files("dispatch.console").iterdir():
        kind = _TYPES.get(f.name.rpartition(".")[2])
        if kind is not None and f.is_file():
            out[f.name] = Reply(200, f.read_bytes(), kind, _HEADERS)
    return out


_ASSETS = _load()


def asset(name: str) -> Reply:
    """The reply holding the console file *name* (``index.html`` is the page itself)."""
    reply = _ASSETS.get(name)
    if reply is None:
        raise NotFoundError(f"no console file {name[:64]}")
    return reply
