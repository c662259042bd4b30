"""The standalone daemon: a thin HTTP/1.1 server (uvloop + httptools + msgspec) in front
of the engine. ``dispatch serve`` runs it; :class:`App` embeds it in a running loop."""

from .app import App
from .auth import sign
from .supervisor import serve

__all__ = ["App", "serve", "sign"]
