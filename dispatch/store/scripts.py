"""The Lua scripts of dispatch/lua, loaded once and called by EVALSHA.

redis-py's script objects re-load a script on NOSCRIPT (after a Redis restart or
SCRIPT FLUSH), so callers never see it.
"""

from __future__ import annotations

import re
from importlib import resources

# Scripts that share heads of helpers (their KEYS layout and little functions).
_ACCOUNT = ("_events", "_limits", "_account")
_SKU = ("_events", "_codes", "_sku")
_MONEY = (*_ACCOUNT, "_margins")  # account scripts that also pay a sub-distributor's ancestors
_PRELUDE = {
    "deliver": ("_events", "_codes", "_limits", "_margins"),
    "settle": ("_events", "_codes", "_limits", "_account", "_margins"),
    "begin": _MONEY, "commit": _MONEY, "topup": _ACCOUNT, "transfer": ("_events", "_limits", "_margins"),
    "ticket_open": _ACCOUNT, "ticket_decide": _ACCOUNT, "ticket_finish": _MONEY,
    "supplier_money": _ACCOUNT, "supplier_status": _ACCOUNT,
    "take": _SKU, "sku_settle": _SKU, "import_push": _SKU, "batch_void": _SKU,
    "batch_park": _SKU, "sku_invalidate": _SKU, "sku_requeue": _SKU, "sku_level": _SKU, "sku_reconcile": _SKU,
    "sku_expire": _SKU, "tier_apply": ("_events", "_limits"),
}
NAMES = ("deliver", "begin", "commit", "settle", "unpend", "topup", "transfer", "put", "take", "sku_settle", "import_push",
         "batch_void", "fp_claim", "rotate_key", "rate_limit", "fpkey_swap",
         "ticket_open", "ticket_decide", "ticket_finish", "supplier_money", "supplier_status",
         "batch_park", "sku_invalidate", "sku_requeue", "sku_level", "sku_reconcile", "sku_expire",
         "webhook_enqueue", "webhook_claim", "webhook_settle", "webhook_replay", "admin_token",
         "tier_apply", "tier_rules")


# Ahead of every script: the globals it reads, as locals. A global is a lookup in the
# globals table at each use, a local a register (an upvalue in the functions below it).
_LOCALS = ("local redis, cmsgpack, string, table, math = redis, cmsgpack, string, table, math\n"
           "local tonumber, unpack, pairs, ipairs, next, type = tonumber, unpack, pairs, ipairs, next, type\n"
           "local KEYS, ARGV = KEYS, ARGV\n")


def source(name: str) -> str:
    """The full text of script *name*: its shared heads' definitions that it uses, then
    its own text."""
    lua = resources.files("dispatch") / "lua"
    body = (lua / f"{name}.lua").read_text()
    heads = "\n".join((lua / f"{h}.lua").read_text() for h in _PRELUDE.get(name, ()))
    return "\n".join([_LOCALS, *_used(heads, body), body])


# A script runs its whole text at every call, heads included: each `local function` is a
# closure made anew, and making one walks the list of the locals captured before it, so a
# head's every helper costs each call, however few orders it carries (bench/README.md, "A
# call's own cost"). So a script gets only the definitions it uses.
# A head is cut into top-level statements, each from a line that starts with `local` or
# `if` to the next: one that defines names is kept if kept code names one of them (a name
# read as an identifier, outside strings and comments), one that defines none always.
_LEXEME = re.compile(r"""--\[(=*)\[.*?\]\1\]|--[^\n]*|\[(=*)\[.*?\]\2\]|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"|([A-Za-z_]\w*)""",
                     re.S)
_STATEMENT = re.compile(r"^(?=local\s|if\s)", re.M)
_DEFINES = re.compile(r"local\s+function\s+(\w+)|local\s+([\w\s,]+?)\s*(?:=|$|--)", re.M)


def _names(code: str) -> set[str]:
    return {m[3] for m in _LEXEME.finditer(code) if m[3]}


def _used(heads: str, body: str) -> list[str]:
    """The statements of *heads* that *body* needs, directly or through each other, in
    their order."""
    statements = [s for s in _STATEMENT.split(heads) if s.strip()]
    defines = []
    for s in statements:
        m = _DEFINES.match(s)
        defines.append(set() if m is None else {m[1]} if m[1] else {n.strip() for n in m[2].split(",")})
    needed, kept = _names(body), [False] * len(statements)
    grew = True
    while grew:
        grew = False
        for k, s in enumerate(statements):
            if not kept[k] and (not defines[k] or defines[k] & needed):
                kept[k], grew = True, True
                needed |= _names(s)
    return [s for s, keep in zip(statements, kept) if keep]
