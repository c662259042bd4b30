"""The Lua scripts of dispatch/lua, loaded once and called by EVALSHA.

redis-py's script objects re-load a script on NOSCRIPT (after a Redis restart or
SCRIPT FLUSH), so callers never see it.
"""

from __future__ import annotations

from importlib import resources

# Scripts that share a head of helpers (their KEYS layout and little functions).
_PRELUDE = {
    "begin": "_account", "commit": "_account", "settle": "_account", "topup": "_account",
    "take": "_sku", "sku_settle": "_sku", "import_push": "_sku", "batch_void": "_sku",
}
NAMES = ("begin", "commit", "settle", "topup", "put", "take", "sku_settle", "import_push",
         "batch_void", "fp_claim", "rotate_key",
         "rate_limit", "fpkey_swap")  # daemon (issue 4)


def source(name: str) -> str:
    """The full text of script *name*, its shared head included."""
    lua = resources.files("dispatch") / "lua"
    text = (lua / f"{name}.lua").read_text()
    head = _PRELUDE.get(name)
    return (lua / f"{head}.lua").read_text() + "\n" + text if head else text
