"""The scripts' texts: each gets only the definitions of its shared heads that it uses
(dispatch/store/scripts.py), and each still loads into a real Redis with every helper it
reads defined."""

from __future__ import annotations

import re
from importlib import resources

import redis

from dispatch.store import scripts

HEAD = """-- a head
local A = 'a'
local unused_const = {'x'}
local function helper(x)
  return A .. x
end
local function outer()
  return helper('y')  -- calls helper
end
local function shadowed() return 1 end
local function said_in_a_string() return 2 end
local function said_in_a_comment() return 3 end
local state
local function sets_state() state = 1 end
if A then redis.call('PING') end
local function never() return unused_const end
"""


def test_used_keeps_what_the_body_reaches_and_drops_the_rest() -> None:
    body = ("local x = outer()\n"
            "-- said_in_a_comment()\n"
            "local s = 'said_in_a_string'\n"
            "sets_state()\n"
            "return x\n")
    kept = "".join(scripts._used(HEAD, body))
    defined = set(re.findall(r"^local function (\w+)|^local (\w+)", kept, re.M))
    names = {a or b for a, b in defined}
    # outer directly; helper through outer, A through helper; state through sets_state
    assert names == {"outer", "helper", "A", "sets_state", "state"}
    assert "redis.call('PING')" in kept  # a statement defining nothing always stays
    assert kept.index("local A") < kept.index("local function helper") < kept.index("local function outer")


def test_used_keeps_everything_a_body_names() -> None:
    body = "return never() + shadowed() + said_in_a_string() + said_in_a_comment()"
    kept = "".join(scripts._used(HEAD, body))
    for name in ("never", "unused_const", "shadowed", "said_in_a_string", "said_in_a_comment"):
        assert re.search(rf"^local (function )?{name}\b", kept, re.M), name
    assert "helper" not in kept and "outer" not in kept


def _code(text: str) -> str:
    """*text* without comments and string literals."""
    text = re.sub(r"--\[(=*)\[.*?\]\1\]|--[^\n]*", "", text, flags=re.S)
    return re.sub(r"'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\"", "''", text)


def _top_level(text: str) -> set[str]:
    """The names *text* defines at its top level."""
    return {a or n.strip() for a, b in re.findall(r"^local function (\w+)|^local ([\w, ]+)", text, re.M)
            for n in (b.split(",") if b else [""])}


def test_every_script_defines_each_head_name_it_reads(flushed_redis_url: str) -> None:
    lua = resources.files("dispatch") / "lua"
    r = redis.Redis.from_url(flushed_redis_url)
    trimmed = 0
    for name in scripts.NAMES:
        heads = "\n".join((lua / f"{h}.lua").read_text() for h in scripts._PRELUDE.get(name, ()))
        text = scripts.source(name)
        read = {n for n in _top_level(heads) if re.search(rf"(?<![\w.]){n}\b", _code(text))}
        assert read <= _top_level(text), (name, read - _top_level(text))
        trimmed += len(text) < len(heads)
        r.script_load(text)  # compiles
    assert trimmed >= 20  # most scripts leave some of their heads out
