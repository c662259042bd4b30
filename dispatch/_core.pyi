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

# --- Import (used by dispatch/vault.py, dispatch/inventory.py, dispatch/store/inventory.py) ---
#
# An import of a million codes moves them in packed form: secrets and fingerprints
# concatenated in bytes, with "ends" (native uint32 offsets, array("I") layout) where
# the lengths vary. Nothing makes a Python object per code but seal's results.

class Fingerprints:
    """Keyed BLAKE2b-128 of codes (``hashlib.blake2b(code, key=key, digest_size=16)``),
    and the set of the fingerprints this object has seen: one per import, to drop
    the repeats within it. *key* has 1 to 64 bytes (ValueError otherwise)."""

    def __init__(self, key: bytes) -> None: ...
    def __len__(self) -> int:
        """How many distinct fingerprints :meth:`fresh` has seen."""
    def fingerprint(self, code: bytes) -> bytes:
        """The 16-byte fingerprint of *code* (not added to the set)."""
    def fresh(self, codes: list[bytes], secrets: list[bytes]) -> tuple[bytes, bytes, bytes, int]:
        """Fingerprint each code, in order, and keep the ones not seen before (adding
        them to the set): ``(secrets, ends, fingerprints, repeats)`` where *secrets* is
        the kept codes' secrets (``secrets[i]`` goes with ``codes[i]``) concatenated,
        *ends* the offset in it where each ends, *fingerprints* their 16-byte
        fingerprints concatenated, and *repeats* how many codes were dropped.

        Works without the GIL once it has read the lists (which must not change
        meanwhile); RuntimeError if another thread is in ``fresh`` of this object."""

def group_claims(fps: bytes) -> list[tuple[int, bytes, bytes]]:
    """The fp_claim arguments of packed 16-byte fingerprints: ``(shard, entries,
    positions)`` for each shard (``fp[0]``) that has any, by shard. *entries* is runs
    of: the bucket (``fp[1]``) as two lowercase hex digits, a count byte n (1..255),
    then n fields (``fp[2:]``, 14 bytes each); buckets in order, a bucket's
    fingerprints in the order of *fps*, more than 255 in one bucket as several runs.
    *positions* holds, as native uint32, the index in *fps* of each entry's field."""

def seal(key: bytes, key_id: int, aad: bytes, secrets: bytes, ends: bytes, keep: bytes | None,
         nonces: bytes) -> list[bytes]:
    """AES-GCM through OpenSSL, as ``Vault.encrypt`` does one at a time: for each
    secret in the packed *secrets* (ending at the uint32 offsets *ends*) whose *keep*
    byte is not 0 (all of them when None), ``key_id || nonce || ciphertext || tag``
    with the next 12 bytes of *nonces* and *aad* as associated data. *key* has 16, 24
    or 32 bytes. The encryption runs without the GIL. ValueError for arguments that do
    not fit together."""

class Opener:
    """AES-GCM decryption with *key* (16, 24 or 32 bytes), its key schedule set up once:
    what ``Vault.decrypt`` runs for each code it shows. It holds the GIL throughout, so
    threads may share one."""

    def __init__(self, key: bytes) -> None: ...

    def open(self, blob: bytes, at: int, aad: bytes) -> bytes:
        """The plaintext of ``nonce (12 bytes) || ciphertext || tag (16 bytes)`` found in
        *blob* from offset *at*, checked against *aad*; ValueError if it is too short or
        fails authentication (wrong key, aad or data)."""

# The per-code forms of Fingerprints.fresh and group_claims: a Python object per code,
# plainer; the reference the packed forms are tested against (tests/test_core.py).

def fingerprint_chunk(key: bytes, codes: list[bytes], secrets: list[bytes],
                      seen: set[bytes]) -> tuple[list[bytes], list[bytes], int]:
    """``(fresh secrets, their fingerprints, duplicates)``: the keyed BLAKE2b-128 of each
    code (as ``Vault.fingerprint``), skipping those already in *seen*, which the new
    ones are added to."""

def group_fingerprints(fps: list[bytes], bucket_keys: list[str]) -> dict[int, tuple[list[str], list[bytes], list[int]]]:
    """``{shard byte: (bucket keys, fields, indexes in fps)}``: the shard of a fingerprint
    is ``fp[0]``, its bucket ``bucket_keys[fp[0] * 256 + fp[1]]``, its field ``fp[2:]``."""
