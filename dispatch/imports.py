"""Import files: a stream of card codes, plain text or CSV, parsed into bounded chunks.

Rules:

- A line ends at ``\\n`` or ``\\r\\n``; a lone ``\\r`` inside a line is a
  control character. A UTF-8 BOM at the very start is ignored. Line numbers
  are 1-based physical lines, blank ones included.
- Every field (a text line; each CSV field) is trimmed of ASCII whitespace at
  both ends. A blank line is skipped: neither accepted nor malformed. A line is
  malformed, with a short reason, when it holds a control character (C0 or
  DEL), is not valid UTF-8, has a field longer than *max_length* characters,
  or is over ``MAX_LINE_BYTES`` (64 KiB), the most a streaming parser holds
  of one line. Interior spaces are kept and case is never changed.
- CSV: a header names ``code`` and optionally ``pin``, ``serial``,
  ``expires_at`` (any order and case; a header with no ``code``, an unknown,
  empty or repeated column fails the whole file with ValidationError). Quoting
  follows RFC 4180 within one line; a quoted field cannot span lines. Every
  row has as many fields as the header. An empty code is malformed; an empty
  optional field is absent; ``expires_at`` must be an ISO 8601 date or
  datetime and is kept as written.
- ``format="auto"`` looks at the first non-blank line: it is a CSV header when
  one of its comma-separated fields is ``code`` (trimmed, any case), so a file
  whose first line is just ``code`` is CSV with one column. Otherwise, if the
  line holds a comma, it is taken for a CSV file without a proper header and
  the import fails rather than storing ``"a,b"`` as one code (pass
  ``format="text"`` for codes with commas). Otherwise the file is plain text.

- With *text_only* (the default), the body must be text: its first ``SNIFF_BYTES`` (all of it when shorter) are
  looked at before any line is parsed, and a NUL byte, bytes that are not UTF-8,
  or more than ``MAX_NON_TEXT_SHARE`` of characters that are control or
  non-printable (tab, CR and LF aside) fail the whole import with
  ValidationError: an image or random bytes are refused, not read as lines.

Each accepted line becomes a *secret payload* (see encode_secret) and the code
alone, which is what the caller deduplicates on.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import operator
import os
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from datetime import datetime, timezone
from typing import Literal, TypeAlias

import msgspec

from ._core import MAX_LINE_BYTES, scan_lines
from .errors import ValidationError
from .models import CodeRule

__all__ = ["ParsedChunk", "parse_codes", "Intake", "expiry_ms", "check_text", "encode_secret", "decode_secret"]

Format: TypeAlias = Literal["auto", "text", "csv"]
Source: TypeAlias = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | AsyncIterable[bytes] | Iterable[bytes]
)

#: Bytes read from a file (or sliced from an in-memory source) at a time.
BLOCK_SIZE = 1 << 20
#: The columns a CSV header may name.
COLUMNS = ("code", "pin", "serial", "expires_at")
#: Upper bound of *max_length*: four fields of it still fit in one line.
MAX_FIELD_LENGTH = 4096

#: Bytes at the start of an import that decide whether it is text at all.
SNIFF_BYTES = 64 * 1024
#: The most of those characters that may be control or non-printable (tab, CR, LF aside).
MAX_NON_TEXT_SHARE = 0.05

_BOM = b"\xef\xbb\xbf"
_SEP = "\x1f"
_SEP_BYTES = b"\x1f"
_TOO_WIDE = f"line longer than {MAX_LINE_BYTES} bytes"
_ODD = re.compile(r"[^\t\n\r\x20-\x7e]")  # what may be non-printable: looked at one by one


def check_text(head: bytes, *, final: bool) -> None:
    """ValidationError unless *head*, the start of an import (the whole of it when
    *final*), is text: no NUL byte, UTF-8 (a sequence cut at the end of a head that is
    not final aside), at most MAX_NON_TEXT_SHARE control or non-printable characters."""
    nul = head.find(b"\0")
    if nul >= 0:
        raise ValidationError(f"the import is not text: a NUL byte at offset {nul}")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final)
    except UnicodeDecodeError as e:
        raise ValidationError(f"the import is not text: bytes that are not UTF-8 at offset {e.start}") from None
    text = text.removeprefix("\ufeff")
    odd = sum(1 for m in _ODD.finditer(text) if not m[0].isprintable())
    if text and odd > MAX_NON_TEXT_SHARE * len(text):
        raise ValidationError(f"the import is not text: {odd} of its first {len(text)} characters are control "
                              f"or non-printable (at most {MAX_NON_TEXT_SHARE:.0%} allowed)")


class ParsedChunk(msgspec.Struct, frozen=True):
    """What up to *chunk_lines* consecutive lines of an import hold, in file order."""

    #: The secret payload of each accepted line (see encode_secret).
    secrets: list[bytes]
    #: The code alone (UTF-8) of each accepted line: what dedupe fingerprints.
    codes: list[bytes]
    #: The 1-based line number of each accepted line.
    lines: list[int]
    #: ``(line, reason)`` of each malformed line.
    malformed: list[tuple[int, str]]


# --- secret payloads -----------------------------------------------------------


def encode_secret(code: str, pin: str | None = None, serial: str | None = None,
                  expires_at: str | None = None) -> bytes:
    """The secret payload of one code: the code alone, or all four fields joined by 0x1f.

    Empty optional fields count as absent. No field may contain 0x1f (imports
    reject every control character, so parsed fields never do).
    """
    if not (pin or serial or expires_at):
        if _SEP in code:
            raise ValidationError("a secret field contains the 0x1f separator")
        return code.encode()
    fields = (code, pin or "", serial or "", expires_at or "")
    if any(_SEP in field for field in fields):
        raise ValidationError("a secret field contains the 0x1f separator")
    return _SEP.join(fields).encode()


def decode_secret(payload: bytes) -> tuple[str, str | None, str | None, str | None]:
    """``(code, pin, serial, expires_at)`` from a payload made by encode_secret."""
    text = bytes(payload).decode()
    if _SEP not in text:
        return text, None, None, None
    parts = text.split(_SEP)
    if len(parts) != 4:
        raise ValidationError(f"a secret payload has {len(parts)} fields, expected 1 or 4")
    code, pin, serial, expires_at = parts
    return code, pin or None, serial or None, expires_at or None


# --- parsing -------------------------------------------------------------------


def expiry_ms(expires_at: str) -> int:
    """An ``expires_at`` (ISO 8601, as the parser checked it) as unix ms: a date alone is
    its first moment, a time without a zone is UTC (the earliest reading is the safe one)."""
    when = datetime.fromisoformat(expires_at)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)


class Intake:
    """A SKU's rules for the lines of one import, applied chunk by chunk (conform): its
    code and PIN rules, and a code's expiry, which must leave more than the minimum
    shelf life from *now_ms*. At most *max_expiries* distinct expiries per import (each
    is a sub-batch: its own pool)."""

    def __init__(self, code_rule: CodeRule | None, pin_rule: CodeRule | None, *, now_ms: int,
                 min_shelf_life_s: int = 0, max_expiries: int = 1000) -> None:
        self._code_rule, self._pin_rule = code_rule, pin_rule
        self._now, self._shelf_ms = now_ms, min_shelf_life_s * 1000
        self._max_expiries = max_expiries
        self.expiries: set[int] = set()

    def conform(self, chunk: ParsedChunk) -> tuple[ParsedChunk, list[int] | None]:
        """*chunk* with the lines that break a rule made malformed, and the expiry (unix ms,
        0 for none) of each code kept; None when no code of the chunk has one."""
        code_rule, pin_rule = self._code_rule, self._pin_rule
        dated = any(_SEP_BYTES in secret for secret in chunk.secrets)  # only 4-field payloads carry one
        if code_rule is None and pin_rule is None and not dated:
            return chunk, None
        secrets, codes, lines, malformed, expiries = [], [], [], list(chunk.malformed), []
        for secret, code, line in zip(chunk.secrets, chunk.codes, chunk.lines):
            why = code_rule.violation(code.decode()) if code_rule is not None else None
            pin = expires_at = None
            if dated:  # else no line has a pin or an expiry either
                _, pin, _, expires_at = decode_secret(secret)
            if why is None and pin_rule is not None:
                why = "no pin (the SKU asks for one)" if pin is None else pin_rule.violation(pin, "pin")
            expires = 0
            if why is None and expires_at is not None:
                expires = expiry_ms(expires_at)
                why = self._expiry_problem(expires)
            if why is None:
                secrets.append(secret)
                codes.append(code)
                lines.append(line)
                expiries.append(expires)
            else:
                malformed.append((line, why))
        malformed.sort()
        return ParsedChunk(secrets, codes, lines, malformed), expiries if dated else None

    def _expiry_problem(self, expires: int) -> str | None:
        if expires <= self._now:
            return "expired (expires_at is past)"
        if expires - self._shelf_ms <= self._now:
            return f"expires within the SKU's minimum shelf life ({self._shelf_ms // 1000} s)"
        if expires not in self.expiries:
            if len(self.expiries) >= self._max_expiries:
                return f"more than {self._max_expiries} distinct expires_at in one batch"
            self.expiries.add(expires)
        return None


def parse_codes(source: Source, *, format: Format = "auto", max_length: int = 128,
                chunk_lines: int = 10_000, text_only: bool = True) -> AsyncIterator[ParsedChunk]:
    """Parse an import, yielding a ParsedChunk per *chunk_lines* physical lines.

    *source* is a path (str or os.PathLike, read in BLOCK_SIZE blocks), the
    content itself (bytes, bytearray, memoryview), or an async or sync
    iterable of bytes blocks split anywhere (an HTTP body stream). Memory stays
    bounded by one block plus one chunk whatever the size of the import, and
    the chunks are the same however the content is split into blocks. Chunks
    with nothing in them (only blank lines) are not yielded.

    Arguments are checked here, at the call; a missing file, a bad CSV header
    or a bad block raise when iterating. Raises ValidationError for a bad
    *format*, *max_length* or *chunk_lines*, a path that cannot be read, and a
    CSV header that names no ``code`` or an unknown, empty or repeated column;
    TypeError for a source or a block of the wrong type.
    """
    if format not in ("auto", "text", "csv"):
        raise ValidationError(f"format must be 'auto', 'text' or 'csv', got {format!r}")
    if not _is_int(max_length) or not 1 <= max_length <= MAX_FIELD_LENGTH:
        raise ValidationError(f"max_length must be an int in 1..{MAX_FIELD_LENGTH}, got {max_length!r}")
    if not _is_int(chunk_lines) or chunk_lines < 1:
        raise ValidationError(f"chunk_lines must be a positive int, got {chunk_lines!r}")
    return _parse(_blocks(source), _Parser(format, max_length, chunk_lines, text_only))


async def _parse(blocks: AsyncIterator[bytes], parser: _Parser) -> AsyncIterator[ParsedChunk]:
    async for block in blocks:
        for chunk in parser.feed(block):
            yield chunk
    for chunk in parser.close():
        yield chunk


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _blocks(source: Source) -> AsyncIterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_iterable(_slices(memoryview(source).cast("B")))
    if isinstance(source, str) and ("\n" in source or "\r" in source):
        raise TypeError("a str source is a path; pass the content as bytes")
    if isinstance(source, (str, os.PathLike)):
        return _from_path(os.fspath(source))
    if isinstance(source, AsyncIterable):
        return aiter(source)
    if isinstance(source, Iterable):
        return _from_iterable(source)
    raise TypeError(
        "source must be a path, bytes, or an async or sync iterable of bytes blocks, "
        f"got {type(source).__name__}"
    )


def _slices(view: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(view), BLOCK_SIZE):
        yield view[start:start + BLOCK_SIZE]


async def _from_iterable(blocks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for block in blocks:
        yield block


async def _from_path(path: str | bytes) -> AsyncIterator[bytes]:
    shown = os.fsdecode(path)
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise ValidationError(f"import file {shown} does not exist") from None
    except OSError as e:
        raise ValidationError(f"import file {shown} cannot be read: {e.strerror}") from None
    with file:
        # A cold disk can take a while per block: read off the event loop.
        while block := await asyncio.to_thread(file.read, BLOCK_SIZE):
            yield block


class _Parser:
    """Push parser: feed() blocks split anywhere, then close(); both yield finished chunks.

    Complete lines go to scan_lines (the C core); the partial last line of a
    block waits in a carry buffer, which never grows past MAX_LINE_BYTES + 1:
    a longer line is reported at once and the rest of it skipped.
    """

    def __init__(self, format: Format, max_length: int, chunk_lines: int, text_only: bool = True) -> None:
        self._format = format  # "auto" turns into "text" or "csv" at the first non-blank line
        self._header_pending = format != "text"
        self._columns: tuple[str, ...] = ()
        self._pick = operator.itemgetter(0, 1, 2, 3)  # the fields of COLUMNS in a row; set by the header
        self._max_length = max_length
        self._chunk_lines = chunk_lines
        self._carry = bytearray()
        self._at_start = True  # the BOM is still to be looked for
        self._skipping = False  # inside an over-long line, dropping bytes up to its \n
        self._line = 1  # number of the next physical line
        # the first SNIFF_BYTES, until judged by check_text
        self._head: bytearray | None = bytearray() if text_only else None
        self._start_chunk()

    def _start_chunk(self) -> None:
        self._secrets: list[bytes] = []
        self._codes: list[bytes] = []
        self._lines: list[int] = []
        self._malformed: list[tuple[int, str]] = []
        self._taken = 0  # physical lines in this chunk

    def feed(self, block: bytes | bytearray | memoryview) -> Iterator[ParsedChunk]:
        if not isinstance(block, bytes):
            if not isinstance(block, (bytearray, memoryview)):
                raise TypeError(f"the source yielded {type(block).__name__}, expected bytes blocks")
            block = bytes(block)
        if self._head is not None:  # nothing is parsed before the start is known to be text
            self._head += block
            if len(self._head) < SNIFF_BYTES:
                return
            block, self._head = bytes(self._head), None
            check_text(block[:SNIFF_BYTES], final=False)
        yield from self._feed(block)

    def _feed(self, block: bytes) -> Iterator[ParsedChunk]:
        if self._at_start:
            self._carry += block
            if len(self._carry) < len(_BOM) and _BOM.startswith(self._carry):
                return  # may still become a BOM
            self._at_start = False
            if self._carry.startswith(_BOM):
                del self._carry[:len(_BOM)]
            block = bytes(self._carry)
            self._carry.clear()
        if self._skipping:
            end = block.find(b"\n")
            if end < 0:
                return
            self._skipping = False
            block = block[end + 1:]
        end = block.rfind(b"\n") + 1
        if end:
            if self._carry:
                self._carry += block[:end]
                data = bytes(self._carry)
            else:
                data = block[:end]
            self._carry = bytearray(block[end:])
            yield from self._scan(data)
        else:
            self._carry += block
        if len(self._carry) > MAX_LINE_BYTES + 1:  # over the limit even if a CR of CRLF ends it
            self._carry.clear()
            self._skipping = True
            yield from self._overlong()

    def close(self) -> Iterator[ParsedChunk]:
        """Parse what is left (a last line without a newline) and yield the last chunk."""
        if self._head is not None:
            head, self._head = bytes(self._head), None
            check_text(head, final=True)
            yield from self._feed(head)
        if self._carry:
            data = bytes(self._carry)
            self._carry.clear()
            yield from self._scan(data)
        if (chunk := self._flush()) is not None:
            yield chunk

    def _scan(self, data: bytes) -> Iterator[ParsedChunk]:
        pos = 0
        while pos < len(data):
            if self._header_pending:
                pos = self._read_header(data, pos)
            else:
                text = self._format == "text"
                room = self._chunk_lines - self._taken
                codes, lines, malformed, pos, line = scan_lines(
                    data, pos, self._line, self._max_length if text else MAX_LINE_BYTES, room)
                self._taken += line - self._line
                self._line = line
                if text:
                    self._secrets += codes
                    self._codes += codes
                    self._lines += lines
                else:
                    self._add_rows(codes, lines)
                self._malformed += malformed
            if self._taken == self._chunk_lines and (chunk := self._flush()) is not None:
                yield chunk

    def _overlong(self) -> Iterator[ParsedChunk]:
        if self._header_pending:
            self._decide(None, _TOO_WIDE)
        self._malformed.append((self._line, _TOO_WIDE))
        self._line += 1
        self._taken += 1
        if self._taken == self._chunk_lines and (chunk := self._flush()) is not None:
            yield chunk

    def _flush(self) -> ParsedChunk | None:
        chunk = None
        if self._lines or self._malformed:
            self._malformed.sort()  # CSV adds row errors after the line errors of the same lines
            chunk = ParsedChunk(self._secrets, self._codes, self._lines, self._malformed)
        self._start_chunk()
        return chunk

    # --- CSV ---

    def _read_header(self, data: bytes, pos: int) -> int:
        """Consume one blank line, or decide the format on the first non-blank one."""
        rows, _, malformed, after, line = scan_lines(data, pos, self._line, MAX_LINE_BYTES, 1)
        if rows or malformed:
            if not self._decide(rows[0] if rows else None, malformed[0][1] if malformed else ""):
                return pos  # plain text: the line is a code, parsed again by the text rules
        self._taken += line - self._line
        self._line = line
        return after

    def _decide(self, row: bytes | None, reason: str) -> bool:
        """Settle the format on the first non-blank line; True when it is a CSV header."""
        self._header_pending = False
        where = f"CSV header (line {self._line})"
        if row is None:  # the line is malformed: no header, so plain text, if allowed
            if self._format == "csv":
                raise ValidationError(f"{where} is malformed: {reason}")
            self._format = "text"
            return False
        text = row.decode()
        fields = _split_csv(text)
        names = [] if isinstance(fields, str) else [field.strip(" ") for field in fields]
        if self._format == "auto" and "code" not in (name.lower() for name in names):
            if "," in text:
                raise ValidationError(
                    f"line {self._line} looks like CSV (it has a comma) but names no 'code' column; "
                    "start the file with a header such as 'code,pin', or import it as format='text'"
                )
            self._format = "text"
            return False
        if isinstance(fields, str):
            raise ValidationError(f"{where}: {fields}")
        self._format = "csv"
        self._columns = _check_header(names, where)
        absent = len(self._columns)  # the index of the "" _record appends
        self._pick = operator.itemgetter(
            *(self._columns.index(name) if name in self._columns else absent for name in COLUMNS))
        return True

    def _add_rows(self, rows: list[bytes], lines: list[int]) -> None:
        for row, line in zip(rows, lines):
            record = self._record(row.decode())
            if isinstance(record, str):
                self._malformed.append((line, record))
                continue
            code, pin, serial, expires_at = record
            code_bytes = code.encode()
            # Parsed fields hold no control character, so no 0x1f: encode_secret without its check.
            self._secrets.append(_SEP.join(record).encode() if pin or serial or expires_at else code_bytes)
            self._codes.append(code_bytes)
            self._lines.append(line)

    def _record(self, text: str) -> tuple[str, str, str, str] | str:
        """``(code, pin, serial, expires_at)`` of one CSV row ("" when absent), or why it is malformed.

        The row is already a trimmed line of valid UTF-8 with no control
        character, so a space is the only whitespace left to trim.
        """
        fields = _split_csv(text)
        if isinstance(fields, str):
            return fields
        if len(fields) != len(self._columns):
            return f"expected {len(self._columns)} fields, got {len(fields)}"
        fields.append("")  # the columns the header does not name read this empty field
        code, pin, serial, expires_at = self._pick(fields)
        code, pin, serial, expires_at = code.strip(" "), pin.strip(" "), serial.strip(" "), expires_at.strip(" ")
        limit = self._max_length
        if not code:
            return "empty code"
        if len(code) > limit:
            return f"longer than {limit} characters"
        if len(pin) > limit:
            return f"pin longer than {limit} characters"
        if len(serial) > limit:
            return f"serial longer than {limit} characters"
        if expires_at and not _is_iso_datetime(expires_at):
            return "expires_at is not an ISO 8601 date"
        return code, pin, serial, expires_at


def _split_csv(text: str) -> list[str] | str:
    """The fields of one CSV line (RFC 4180 quoting), or why it cannot be split."""
    if '"' not in text:
        return text.split(",")
    try:
        return next(csv.reader((text,), strict=True, skipinitialspace=True))
    except csv.Error as e:
        if str(e) == "unexpected end of data":
            return "unclosed quote (a quoted field cannot span lines)"
        return f"bad CSV quoting: {e}"


def _check_header(names: list[str], where: str) -> tuple[str, ...]:
    columns = tuple(name.lower() for name in names)
    if "code" not in columns:
        # Not echoed: a header-less file's first line is a card code.
        raise ValidationError(f"{where} has no 'code' column (allowed: {', '.join(COLUMNS)})")
    if "" in columns:
        raise ValidationError(f"{where} has an empty column name")
    unknown = [name for name, column in zip(names, columns) if column not in COLUMNS]
    if unknown:
        raise ValidationError(
            f"{where} has unknown column(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(COLUMNS)})"
        )
    repeated = sorted({column for column in columns if columns.count(column) > 1})
    if repeated:
        raise ValidationError(f"{where} repeats column(s) {', '.join(map(repr, repeated))}")
    return columns


def _is_iso_datetime(value: str) -> bool:
    try:
        datetime.fromisoformat(value)  # a date alone is accepted too
    except ValueError:
        return False
    return True
