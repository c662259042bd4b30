"""Everything that talks to Redis: the only package that imports redis or builds keys."""

from .embedded import EmbeddedRedis
from .store import Store

__all__ = ["EmbeddedRedis", "Store"]
