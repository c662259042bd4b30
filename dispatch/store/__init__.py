"""Everything that talks to Redis."""

from .embedded import EmbeddedRedis
from .store import Store

__all__ = ["EmbeddedRedis", "Store"]
