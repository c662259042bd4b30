"""The compiled core against plain definitions: RESP packing (redis-py's packer), ULIDs,
the fingerprints, claims and seals of imports and the opening of codes shown (hashlib,
cryptography's AESGCM)."""

from __future__ import annotations

import hashlib
import itertools
import os
from array import array

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st
from redis.connection import Encoder, PythonRespSerializer

from dispatch._core import (Fingerprints, Opener, fingerprint_chunk, group_claims, group_fingerprints, new_ulid,
                            pack_calls, seal, ulid_at)
from dispatch.errors import DispatchError
from dispatch.store import keys
from dispatch.vault import Vault

word = st.one_of(st.binary(max_size=300), st.text(max_size=50), st.integers(-2**62, 2**62),
                 st.integers(-2**70, 2**70), st.sampled_from([0, -1, 2**63 - 1, -2**63, 2**63, -2**63 - 1]))
words = st.lists(word, min_size=1, max_size=40)
reference = PythonRespSerializer(1 << 30, Encoder("utf-8", "strict", False).encode)


@given(words)
def test_pack_calls_matches_redis_py(parts: list) -> None:
    assert pack_calls(b"sha1", [([], parts, ())]) == b"".join(reference.pack(b"EVALSHA", b"sha1", 0, *parts))


@given(st.lists(st.tuples(st.lists(st.text(min_size=1, max_size=20), max_size=4), st.lists(word, max_size=5),
                          st.lists(st.tuples(word, word, word), max_size=6)), min_size=1, max_size=5))
def test_pack_calls_is_evalsha_with_the_items_flattened(calls: list) -> None:
    expected = b"".join(b"".join(reference.pack(b"EVALSHA", b"sha1", len(k), *k, *a, *[x for it in items for x in it]))
                        for k, a, items in calls)
    assert pack_calls(b"sha1", calls) == expected


def test_pack_calls_words_redis_py_refuses_and_refusals() -> None:
    assert pack_calls(b"ab", [(["k"], [True, False, 1.5, bytearray(b"x")], ())]) == (
        b"*8\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n"
        b"$1\r\n1\r\n$1\r\n0\r\n$3\r\n1.5\r\n$1\r\nx\r\n")
    try:
        pack_calls(b"ab", [([], [object()], ())])
    except TypeError as e:
        assert "object" in str(e)
    else:
        raise AssertionError("an object was packed")


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@given(st.integers(0, 2**48 - 1), st.binary(min_size=10, max_size=10))
def test_ulid_matches_its_definition(ms: int, rnd: bytes) -> None:
    n = ms << 80 | int.from_bytes(rnd, "big")
    assert ulid_at(ms, rnd) == "".join(_CROCKFORD[(n >> s) & 31] for s in range(125, -1, -5))


def test_new_ulids_are_unique_and_sorted_in_the_order_made() -> None:
    ids = [new_ulid() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # many share a millisecond: those count up from the first
    assert len({i[:10] for i in ids}) < len(ids)


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=60), st.binary(min_size=32, max_size=32))
def test_fingerprints_and_their_shards_match_plain_python(codes: list[bytes], key: bytes) -> None:
    vault = Vault([bytes(32)])
    vault._fp_key = key
    seen = {vault.fingerprint(codes[0])} if codes else set()
    fresh, fps, dup = fingerprint_chunk(key, codes, [c + b"!" for c in codes], seen)
    expected, already = [], {vault.fingerprint(codes[0])} if codes else set()
    for c in codes:
        if vault.fingerprint(c) not in already:
            already.add(vault.fingerprint(c))
            expected.append((c + b"!", vault.fingerprint(c)))
    assert list(zip(fresh, fps)) == expected and dup == len(codes) - len(expected) and seen == already

    groups = group_fingerprints(fps, keys.fingerprint_buckets())
    flat = sorted((i, bucket, field) for g in groups.values() for bucket, field, i in zip(*g))
    assert flat == [(i, "d:{f:%02x}:%02x" % (fp[0], fp[1]), fp[2:]) for i, fp in enumerate(fps)]
    assert all(b.startswith("d:{f:%02x}:" % shard) for shard, g in groups.items() for b in g[0])


# ---- the packed import path: Fingerprints, group_claims, seal ------------------------

def unpack(blob: bytes, ends: bytes) -> list[bytes]:
    out, start = [], 0
    for end in array("I", ends):
        out.append(blob[start:end])
        start = end
    return out


@given(st.binary(min_size=1, max_size=64), st.lists(st.binary(max_size=400), max_size=20))
def test_fingerprints_are_keyed_blake2b_128(key: bytes, codes: list[bytes]) -> None:
    f = Fingerprints(key)
    assert [f.fingerprint(c) for c in codes] == [hashlib.blake2b(c, key=key, digest_size=16).digest() for c in codes]


@given(st.lists(st.lists(st.binary(min_size=1, max_size=12), max_size=40), max_size=5),
       st.binary(min_size=32, max_size=32))
def test_fresh_matches_fingerprint_chunk(chunks: list[list[bytes]], key: bytes) -> None:
    f, seen = Fingerprints(key), set()
    for codes in chunks:
        secrets_ = [c + b"!" * (len(c) % 3) for c in codes]
        packed, ends, fps, repeats = f.fresh(codes, secrets_)
        fresh, fp_list, dup = fingerprint_chunk(key, codes, secrets_, seen)
        assert (unpack(packed, ends), fps, repeats) == (fresh, b"".join(fp_list), dup)
        assert len(f) == len(seen)


def test_fresh_keeps_every_distinct_code_as_its_set_grows() -> None:
    f = Fingerprints(b"k" * 32)
    codes = [b"C%d" % (i * 7919 % 60_000) for i in range(90_000)]  # 60,000 distinct, repeats in between
    packed, ends, fps, repeats = f.fresh(codes, codes)
    assert unpack(packed, ends) == list(dict.fromkeys(codes)) and repeats == 30_000 and len(f) == 60_000
    assert f.fresh(codes[:10], codes[:10])[3] == 10


def test_fresh_refuses_what_is_not_bytes() -> None:
    f = Fingerprints(b"k")
    with pytest.raises(TypeError):
        f.fresh(["A1"], [b"A1"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        f.fresh([b"A1"], [])
    with pytest.raises(ValueError):
        Fingerprints(b"k" * 65)


def claims_of(fps: bytes) -> list[tuple[int, str, bytes, int]]:
    """(shard, bucket hex, field, index in fps) of every entry of group_claims, in order."""
    out = []
    for shard, entries, positions in group_claims(fps):
        where, at = iter(array("I", positions)), 0
        while at < len(entries):
            bucket, n = entries[at:at + 2].decode(), entries[at + 2]
            assert 1 <= n <= 255
            for k in range(n):
                out.append((shard, bucket, entries[at + 3 + 14 * k:at + 17 + 14 * k], next(where)))
            at += 3 + 14 * n
        assert next(where, None) is None
    return out


@given(st.lists(st.binary(min_size=16, max_size=16), max_size=80))
def test_group_claims_matches_group_fingerprints(fps: list[bytes]) -> None:
    expected = sorted(((shard, bucket[-2:], field, i) for shard, g in group_fingerprints(fps, keys.fingerprint_buckets()).items()
                       for bucket, field, i in zip(*g)), key=lambda e: (e[0], e[1], e[3]))
    assert claims_of(b"".join(fps)) == expected
    assert all(keys.fingerprint_shard(shard) + bucket == keys.fingerprint_buckets()[shard * 256 + int(bucket, 16)]
               for shard, bucket, _, _ in expected)


def test_group_claims_splits_a_crowded_bucket_into_runs() -> None:
    fps = [bytes((7, 9)) + i.to_bytes(14, "big") for i in range(600)] + [bytes((7, 8)) + bytes(14)]
    entries = group_claims(b"".join(fps))
    assert [(shard, len(entries_)) for shard, entries_, _ in entries] == [(7, 3 + 14 + 3 * 3 + 600 * 14)]
    assert [c[3] for c in claims_of(b"".join(fps))] == [600, *range(600)]
    with pytest.raises(ValueError):
        group_claims(b"x" * 17)


@given(st.lists(st.tuples(st.binary(max_size=70), st.booleans()), max_size=30), st.sampled_from([16, 24, 32]),
       st.integers(0, 255), st.binary(max_size=20))
def test_seal_is_aes_gcm_as_the_vault_does_it(items: list[tuple[bytes, bool]], key_size: int, key_id: int,
                                              aad: bytes) -> None:
    key = os.urandom(key_size)
    secrets_ = [s for s, _ in items]
    keep = bytes(k for _, k in items)
    kept = [s for s, k in items if k]
    nonces = os.urandom(12 * len(kept))
    ends = array("I", itertools.accumulate(map(len, secrets_))).tobytes()
    sealed = seal(key, key_id, aad, b"".join(secrets_), ends, keep, nonces)
    aead = AESGCM(key)
    assert sealed == [bytes((key_id,)) + nonces[12 * i:12 * i + 12] + aead.encrypt(nonces[12 * i:12 * i + 12], s, aad)
                      for i, s in enumerate(kept)]
    all_nonces = os.urandom(12 * len(secrets_))
    assert len(seal(key, key_id, aad, b"".join(secrets_), ends, None, all_nonces)) == len(secrets_)


def test_seal_is_read_by_the_vault_and_refuses_bad_arguments() -> None:
    vault = Vault([os.urandom(32)])
    secrets_ = [b"A1", b"code\x1fpin\x1f\x1f", b""]
    ends = array("I", itertools.accumulate(map(len, secrets_))).tobytes()
    sealed = vault.encrypt_chunk(b"".join(secrets_), ends, None, b"sku")
    assert [vault.decrypt(blob, b"sku") for blob in sealed] == secrets_
    only = vault.encrypt_chunk(b"".join(secrets_), ends, b"\x00\x01\x00", b"sku")
    assert [vault.decrypt(blob, b"sku") for blob in only] == [secrets_[1]]
    good = (b"k" * 32, 1, b"", b"abc", array("I", [3]).tobytes(), None, bytes(12))
    assert len(seal(*good)) == 1
    for at, bad in [(0, b"k" * 31), (1, 256), (4, array("I", [4]).tobytes()), (4, b"\x03\x00\x00"),
                    (5, b"\x01\x01"), (6, bytes(11))]:
        args = list(good)
        args[at] = bad
        with pytest.raises(ValueError):
            seal(*args)


@given(st.binary(max_size=70), st.sampled_from([16, 24, 32]), st.binary(max_size=20), st.binary(max_size=5))
def test_opener_reads_aes_gcm_as_cryptography_writes_it(secret: bytes, key_size: int, aad: bytes,
                                                        head: bytes) -> None:
    key, nonce = os.urandom(key_size), os.urandom(12)
    blob = head + nonce + AESGCM(key).encrypt(nonce, secret, aad)
    opener = Opener(key)
    assert opener.open(blob, len(head), aad) == secret
    assert opener.open(blob, len(head), aad) == secret  # the key schedule is kept, not used up


def test_opener_refuses_what_fails_authentication_and_goes_on_working() -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    blob = b"\x07" + nonce + AESGCM(key).encrypt(nonce, b"CODE-1", b"sku")
    opener = Opener(key)
    flipped = bytearray(blob)
    flipped[20] ^= 1
    for bad, at, aad in [(blob, 1, b"other sku"), (bytes(flipped), 1, b"sku"), (blob, 0, b"sku"),
                         (blob[:-1], 1, b"sku"), (blob[:28], 1, b"sku"), (blob, -1, b"sku"),
                         (blob, len(blob), b"sku")]:
        with pytest.raises(ValueError):
            opener.open(bad, at, aad)
    with pytest.raises(ValueError):
        Opener(os.urandom(32)).open(blob, 1, b"sku")  # another key
    assert opener.open(blob, 1, b"sku") == b"CODE-1"
    with pytest.raises(ValueError):
        Opener(b"k" * 31)


def test_the_vault_names_a_missing_key_and_a_failed_code() -> None:
    old, new = b"o" * 32, b"n" * 32
    assert Vault.key_id(old) != Vault.key_id(new)
    blob = Vault([old]).encrypt(b"CODE-1", b"sku")
    assert Vault([new, old]).decrypt(blob, b"sku") == b"CODE-1"
    with pytest.raises(DispatchError, match="not configured"):
        Vault([new]).decrypt(blob, b"sku")
    with pytest.raises(DispatchError, match="failed authentication"):
        Vault([old]).decrypt(blob, b"other sku")
    with pytest.raises(DispatchError, match="not configured"):
        Vault([old]).decrypt(b"", b"sku")
