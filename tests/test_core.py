"""The compiled core against plain definitions: RESP packing (redis-py's packer), ULIDs,
the fingerprints and shard grouping of imports."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.connection import Encoder, PythonRespSerializer

from dispatch._core import fingerprint_chunk, group_fingerprints, new_ulid, pack_calls, ulid_at
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


def test_new_ulids_are_unique_and_sorted_by_time() -> None:
    ids = [new_ulid() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert [i[:10] for i in ids] == sorted(i[:10] for i in ids)  # the time part never goes back


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
