"""The compiled RESP packer says exactly what redis-py's own packer says."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.connection import Encoder, PythonRespSerializer

from dispatch._core import pack_command, pack_evalsha

words = st.lists(st.one_of(st.binary(max_size=300), st.text(max_size=50), st.integers(-2**62, 2**62)),
                 min_size=1, max_size=40)
reference = PythonRespSerializer(1 << 30, Encoder("utf-8", "strict", False).encode)


@given(words)
def test_pack_command_matches_redis_py(parts: list) -> None:
    # redis-py treats the first word (the command name) specially: give it a plain one
    assert pack_command([b"EVALSHA", *parts]) == b"".join(reference.pack(b"EVALSHA", *parts))


def test_pack_evalsha_and_refusals() -> None:
    assert pack_evalsha(b"ab", ["k"], [1, b"\x00"]) == b"".join(reference.pack("EVALSHA", b"ab", 1, "k", 1, b"\x00"))
    try:
        pack_command([object()])
    except TypeError as e:
        assert "object" in str(e)
    else:
        raise AssertionError("an object was packed")
