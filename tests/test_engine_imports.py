"""Imports through the engine, property-based: whatever the file looks like, the
report and the stock agree with a plain model of the rules."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch import errors, inventory
from dispatch.imports import MAX_NON_TEXT_SHARE
from dispatch.models import CodeRule
from dispatch.engine import Engine

from .conftest import make_config

_salt = itertools.count()

valid = st.text(alphabet="ABXY0123", min_size=1, max_size=3).map(lambda s: ("code", s))
padded = st.tuples(st.sampled_from(["", " ", "\t"]), valid, st.sampled_from(["", "  "])).map(
    lambda t: ("padded", t[1][1], t[0], t[2]))
junk = st.sampled_from([
    ("blank", b""), ("blank", b"   "),
    ("bad", b"Z" * 200),            # longer than max_code_length
    ("bad", b"AB\x01CD"),           # control character
    ("bad", b"\xff\xfeAB"),         # not UTF-8
    ("bad", b"AB\rCD"),             # a lone CR inside a line
])
files = st.tuples(st.lists(st.one_of(valid, padded, junk), max_size=40), st.booleans(), st.booleans())


def refused(body: bytes) -> bool:
    """Whether an import of *body* is refused whole: not text, or no line at all."""
    if b"\xff\xfe" in body:
        return True
    text = body.decode().removeprefix("\ufeff")
    return text.count("\x01") > MAX_NON_TEXT_SHARE * len(text) or not text.strip()


def render(lines, bom: bool, crlf: bool, salt: str) -> tuple[bytes, list[str], int]:
    """The file, the codes it holds (in order, with repeats), and its malformed count."""
    out, codes, bad = [], [], 0
    for line in lines:
        if line[0] == "code":
            code = salt + line[1]
            codes.append(code)
            out.append(code.encode())
        elif line[0] == "padded":
            code = salt + line[1]
            codes.append(code)
            out.append((line[2] + code + line[3]).encode())
        else:
            bad += line[0] == "bad"
            out.append(line[1])
    body = (b"\r\n" if crlf else b"\n").join(out)
    return (b"\xef\xbb\xbf" if bom else b"") + body, codes, bad


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=files, second=files)
async def test_reports_and_stock_follow_the_rules(shop: Engine, first, second) -> None:
    n = next(_salt)
    salt = f"H{n}Q"  # fingerprints are global: keep examples apart
    sku_a, sku_b = f"a{n}", f"b{n}"
    for s in (sku_a, sku_b):
        await shop.create_sku(s, s, 100, "CNY", 100)
    body1, codes1, bad1 = render(*first, salt)
    body2, codes2, bad2 = render(*second, salt)
    for body, sku in ((body1, sku_a), (body2, sku_b)):
        if refused(body):
            try:
                await shop.import_codes(body, sku=sku, supplier="sup", unit_cost=1)
            except errors.ValidationError:
                assert (await shop.stock(sku)).accepted == 0
                assert not [b for b in await shop.store.inventory.batches() if b.sku == sku]
                return
            raise AssertionError("an import that is not text, or blank, was taken")
    r1 = await shop.import_codes(body1, sku=sku_a, supplier="sup", unit_cost=1)
    r2 = await shop.import_codes(body2, sku=sku_b, supplier="sup", unit_cost=1)
    distinct1 = set(codes1)
    fresh2 = set(codes2) - distinct1
    assert (r1.accepted, r1.duplicate, r1.malformed) == (len(distinct1), len(codes1) - len(distinct1), bad1)
    assert (r2.accepted, r2.duplicate, r2.malformed) == (len(fresh2), len(codes2) - len(fresh2), bad2)
    assert len(r1.malformed_lines) == bad1
    assert (await shop.stock(sku_a)).available == len(distinct1)
    assert (await shop.stock(sku_b)).available == len(fresh2)
    # what is sold is exactly what was accepted, trimmed, in file order for the first file
    if distinct1:
        order = await shop.purchase("beta", sku_a, len(distinct1), f"all-{n}")
        assert [c.code for c in order.codes] == list(dict.fromkeys(codes1))


async def test_windows_and_chunks_of_any_size_give_the_same_import(flushed_redis_url, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(inventory, "_CLAIM_WINDOW", 7)  # claims go out every 7 fresh codes
    monkeypatch.setattr(inventory, "_PUSH_GROUP", 2)
    async with Engine(make_config(tmp_path, redis_url=flushed_redis_url, import_chunk=5), sweep=False) as e:
        for sku in ("a", "b"):
            await e.create_sku(sku, sku, 100, "CNY", 100)
        await e.create_supplier("sup", "S")
        await e.create_distributor("d", "D")
        await e.topup("d", 1_000_000, "seed")
        codes1 = [f"W{i % 45:03d}" for i in range(60)]  # the last 15 repeat earlier ones, across windows
        body1 = "\n".join(codes1[:30] + ["bad\x07"] + codes1[30:]).encode()
        r1 = await e.import_codes(body1, sku="a", supplier="sup", unit_cost=1, batch_id="w1")
        again = await e.import_codes(body1, sku="a", supplier="sup", unit_cost=1, batch_id="w1")
        assert (r1.accepted, r1.duplicate, r1.malformed) == (again.accepted, again.duplicate, again.malformed) == (45, 15, 1)
        assert (await e.stock("a")).accepted == 45
        body2 = "\n".join(f"W{i:03d}" for i in range(30, 90)).encode()
        r2 = await e.import_codes(body2, sku="b", supplier="sup", unit_cost=1, batch_id="w2")
        assert (r2.accepted, r2.duplicate) == (45, 15)
        order = await e.purchase("d", "a", 45, "all-a")
        assert [c.code for c in order.codes] == list(dict.fromkeys(codes1))


async def test_fp_claim_tells_each_fingerprint_whose_it_is(shop: Engine) -> None:
    crowded = [bytes((3, 4)) + i.to_bytes(14, "big") for i in range(300)]  # one bucket, two runs
    spread = [hashlib.blake2b(b"%d" % i, digest_size=16).digest() for i in range(200)]
    claim = shop.store.inventory.claim_fingerprints
    assert await claim(1, b"".join(crowded[:200] + spread[:100])) == (bytearray(b"\x01" * 300), {})
    assert await claim(1, b"".join(crowded[:200] + spread[:100])) == (bytearray(b"\x01" * 300), {})  # resumed
    mixed, others = await claim(2, b"".join(crowded + spread))
    assert mixed == bytearray(b"\x00" * 200 + b"\x01" * 100 + b"\x00" * 100 + b"\x01" * 100)
    assert others == {at: 1 for at in [*range(200), *range(300, 400)]}


async def test_a_skus_code_and_pin_rules_make_lines_malformed(shop: Engine) -> None:
    await shop.create_sku("pins", "PIN card", 100, "CNY", 100,
                          code_rule={"min_length": 6, "max_length": 8, "charset": "digits"},
                          pin_rule=CodeRule(pattern=r"[0-9]{4}"))
    body = b"code,pin\n123456,1234\n12345,1234\n123456789,1234\n12A456,1234\n654321,12\n7654321,\n7654320,4321\n"
    r = await shop.import_codes(body, sku="pins", supplier="sup", unit_cost=1)
    assert (r.accepted, r.malformed) == (2, 5)
    assert [(m.line, m.reason) for m in r.malformed_lines] == [
        (3, "code shorter than 6 characters"), (4, "code longer than 8 characters"),
        (5, "code has characters outside digits"), (6, "pin does not match the SKU's pattern"),
        (7, "no pin (the SKU asks for one)")]
    sold = await shop.purchase("beta", "pins", 2, "pins")
    assert [(c.code, c.pin) for c in sold.codes] == [("123456", "1234"), ("7654320", "4321")]
    # the rule changes, then is dropped
    s = await shop.update_sku("pins", code_rule={"pattern": "9+"}, pin_rule=None)
    assert (s.code_rule, s.pin_rule) == (CodeRule(pattern="9+"), None)
    assert (await shop.get_sku("pins")).code_rule == CodeRule(pattern="9+")
    r = await shop.import_codes(b"999999\n888888\n", sku="pins", supplier="sup", unit_cost=1)
    assert (r.accepted, [m.line for m in r.malformed_lines]) == (1, [2])
    with pytest.raises(errors.ValidationError, match="code_rule"):
        await shop.update_sku("pins", code_rule={"pattern": "(unclosed"})
    with pytest.raises(errors.ValidationError, match="max_length 2 is below min_length 3"):
        await shop.create_sku("x", "x", 100, "CNY", 100, code_rule={"min_length": 3, "max_length": 2})
    assert await shop.audit() == []


async def test_duplicates_are_told_by_line_and_what_they_repeat(shop: Engine) -> None:
    await shop.create_sku("other", "Other SKU", 100, "CNY", 100)
    await shop.create_supplier("rival", "Rival")
    await shop.import_codes(b"MINE-0001\nMINE-0002\n", sku="g100", supplier="sup", unit_cost=1, batch_id="mine")
    await shop.import_codes(b"THEIRS-01\n", sku="g100", supplier="rival", unit_cost=1, batch_id="theirs")
    await shop.import_codes(b"ELSEWHERE\n", sku="other", supplier="sup", unit_cost=1, batch_id="else")
    body = b"NEW-00001\nMINE-0002\nNEW-00001\nTHEIRS-01\nELSEWHERE\n\nNEW-00002\nNEW-00002\n"
    r = await shop.import_codes(body, sku="g100", supplier="sup", unit_cost=1, batch_id="new")
    assert (r.accepted, r.duplicate, r.duplicate_truncated) == (2, 5, False)
    assert [(d.line, d.of, d.batch_id) for d in r.duplicate_lines] == [
        (2, "this_sku", "mine"), (3, "this_file", None), (4, "this_sku", None), (5, "other_sku", "else"),
        (8, "this_file", None)]
    # a resumed import tells the same
    again = await shop.import_codes(body, sku="g100", supplier="sup", unit_cost=1, batch_id="new")
    assert again.duplicate_lines == r.duplicate_lines
    assert (await shop.stock("g100")).accepted == 5
