"""The compiled core of card-dispatch (built from ext/dispatch/_core.pyx).

Private to the package: the pure-Python modules wrap every function here.
"""

from collections.abc import Sequence
from typing import Any

# --- Imports (used by dispatch/imports.py) -----------------------------------

#: A physical line longer than this (terminator excluded) is malformed whatever
#: its content; a streaming parser never holds more than this of one line.
MAX_LINE_BYTES: int

def scan_lines(
    data: bytes,
    pos: int = 0,
    line: int = 1,
    max_length: int = 128,
    max_lines: int = -1,
) -> tuple[list[bytes], list[int], list[tuple[int, str]], int, int]:
    """Validate the lines of *data* from byte offset *pos*, in one pass in C.

    A line ends at ``\\n`` (one ``\\r`` before it, or at the very end of
    *data*, is dropped too) or at the end of *data*, which therefore must
    hold complete lines only; a final ``\\n`` does not start another line.
    *line* is the 1-based number of the first line; at most *max_lines* lines
    are read (negative: all of them).

    Each line is trimmed of ASCII whitespace (``bytes.strip()``'s set) at both
    ends; a line left empty is blank and skipped. Otherwise it is malformed,
    with the reason for the first offending byte, when it contains

    - a control character (C0 or DEL): ``"control character"``;
    - bytes that are not strict UTF-8 (overlongs, surrogates and code points
      above U+10FFFF included): ``"invalid UTF-8"``;

    and, when every byte is fine, when it has more than *max_length*
    characters (not bytes): ``"longer than N characters"``. A line over
    MAX_LINE_BYTES bytes is ``"line longer than 65536 bytes"`` unread.

    Returns ``(codes, lines, malformed, pos, line)``: the accepted trimmed
    lines and their line numbers, the ``(line, reason)`` of the malformed
    ones, all in order, then the offset and the line number to resume at.
    """

# --- RESP (used by dispatch/store/store.py) ------------------------------------

def pack_calls(sha: bytes,
               calls: list[tuple[list[str], list[Any], Sequence[Sequence[Any]]]]) -> bytes:
    """The RESP encoding of one ``EVALSHA sha numkeys key... arg... field...`` per
    ``(keys, args, items)`` call, concatenated; the fields are every item's, in order."""

# --- Order ids (used by dispatch/records.py) -------------------------------------

def ulid_at(ms: int, rnd: bytes) -> str:
    """The ULID of *ms* (48 bits) and 10 random bytes: 26 Crockford base-32 characters."""

def new_ulid() -> str:
    """A fresh ULID (now, 80 random bits): ids that sort by creation time."""

# --- Import (used by dispatch/vault.py and dispatch/store/inventory.py) -------------------

def fingerprint_chunk(key: bytes, codes: list[bytes], secrets: list[bytes],
                      seen: set[bytes]) -> tuple[list[bytes], list[bytes], int]:
    """``(fresh secrets, their fingerprints, duplicates)``: the keyed BLAKE2b-128 of each
    code (as ``Vault.fingerprint``), skipping those already in *seen*, which the new
    ones are added to."""

def group_fingerprints(fps: list[bytes], bucket_keys: list[str]) -> dict[int, tuple[list[str], list[bytes], list[int]]]:
    """``{shard byte: (bucket keys, fields, indexes in fps)}``: the shard of a fingerprint
    is ``fp[0]``, its bucket ``bucket_keys[fp[0] * 256 + fp[1]]``, its field ``fp[2:]``."""
