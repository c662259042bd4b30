"""The import parser: dispatch.imports.parse_codes and its C core, dispatch._core.scan_lines."""

from __future__ import annotations

import asyncio
import gc
import pathlib
import random
import re
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch._core import MAX_LINE_BYTES, scan_lines
from dispatch.errors import ValidationError
from dispatch.imports import ParsedChunk, decode_secret, encode_secret, parse_codes

# --- helpers ---------------------------------------------------------------------


def ref_scan_lines(data: bytes, pos: int = 0, line: int = 1, max_length: int = 128, max_lines: int = -1):
    """The straightforward Python version of _core.scan_lines: both must always agree."""
    codes, lines, malformed = [], [], []
    done = 0
    while pos < len(data) and done != max_lines:
        end = data.find(b"\n", pos)
        after = len(data) if end < 0 else end + 1
        raw = data[pos:len(data) if end < 0 else end]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) > MAX_LINE_BYTES:
            malformed.append((line, f"line longer than {MAX_LINE_BYTES} bytes"))
        elif field := raw.strip():
            reason = ref_field_reason(field, max_length)
            if reason is None:
                codes.append(field)
                lines.append(line)
            else:
                malformed.append((line, reason))
        line += 1
        done += 1
        pos = after
    return codes, lines, malformed, pos, line


def ref_field_reason(field: bytes, max_length: int) -> str | None:
    control = next((i for i, b in enumerate(field) if b < 0x20 or b == 0x7F), None)
    try:
        text, invalid = field.decode(), None
    except UnicodeDecodeError as e:
        text, invalid = "", e.start
    if control is not None and (invalid is None or control < invalid):
        return "control character"
    if invalid is not None:
        return "invalid UTF-8"
    if len(text) > max_length:
        return f"longer than {max_length} characters"
    return None


def parse(source, **options) -> list[ParsedChunk]:
    """The chunks of *source*, judged line by line (no text_only check unless asked)."""
    options.setdefault("text_only", False)

    async def run():
        return [chunk async for chunk in parse_codes(source, **options)]

    return asyncio.run(run())


def outcome(source, **options) -> list[ParsedChunk] | str:
    """The chunks, or the message of the ValidationError that stopped the parse."""
    try:
        return parse(source, **options)
    except ValidationError as e:
        return f"ValidationError: {e}"


def merged(chunks: list[ParsedChunk]) -> ParsedChunk:
    return ParsedChunk(
        secrets=[s for c in chunks for s in c.secrets],
        codes=[s for c in chunks for s in c.codes],
        lines=[n for c in chunks for n in c.lines],
        malformed=[m for c in chunks for m in c.malformed],
    )


def one(content: bytes, **options) -> ParsedChunk:
    return merged(parse(content, **options))


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


async def agen(blocks):
    for block in blocks:
        await asyncio.sleep(0)
        yield block


# Fragments that hit every rule, so random joins of them make interesting files.
FRAGMENTS = [
    b"a", b"Z9", b"-", b" ", b"  ", b"\t", b"\r", b"\n", b"\n", b"\n", b"\r\n", b",", b'"', b"\x00",
    b"\x01", b"\x1f", b"\x7f", b"\x0b", b"\x0c", b"\xef\xbb\xbf", "é".encode(), "€".encode(),
    "😀".encode(), "中".encode(), b"\xff", b"\x80", b"\xc0\xaf", b"\xe0\x80\x80", b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xf0\x9f\x98", b"code", b"CODE", b"pin", b"serial",
    b"expires_at", b"2024-01-31", b"2024-01-31T10:00:00Z", b"2024-13-01", b"\"x\"\"y\"",
]
contents = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map(b"".join)
headers = st.sampled_from([
    b"", b"code\n", b"Code,PIN\r\n", b"\xef\xbb\xbfcode , serial,expires_at\n",
    b"\n \ncode,pin,serial,expires_at\n", b"code,bogus\n", b"pin\n",
])


# --- the C core against the reference -----------------------------------------------


@settings(max_examples=1500)
@given(data=st.binary(max_size=200) | contents, max_length=st.integers(0, 12),
       max_lines=st.integers(-1, 8), line=st.integers(1, 10**12))
def test_core_agrees_with_reference_on_arbitrary_bytes(data, max_length, max_lines, line):
    assert scan_lines(data, 0, line, max_length, max_lines) == ref_scan_lines(data, 0, line, max_length, max_lines)


@given(data=contents, pos=st.integers(0, 400))
def test_core_resumes_where_it_stopped(data, pos):
    pos = min(pos, len(data))
    everything = scan_lines(data, pos, 1, 5)
    codes, lines, malformed = [], [], []
    line = 1
    while pos < len(data):
        c, n, m, pos, line = scan_lines(data, pos, line, 5, 1)
        codes += c
        lines += n
        malformed += m
    assert (codes, lines, malformed, pos, line) == everything


def test_core_utf8_is_strict():
    valid = ["é", "€", "😀", "\U0010ffff", "\ud7ff", "\ue000", "\x80"]
    for ch in valid:
        assert scan_lines(ch.encode())[0] == [ch.encode()], ch
    invalid = [
        b"\x80", b"\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x9f\xbf", b"\xf0\x8f\xbf\xbf",  # overlongs
        b"\xed\xa0\x80", b"\xed\xbf\xbf",  # surrogates
        b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff",  # beyond U+10FFFF
        b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"\xe2\x82A",  # truncated
    ]
    for raw in invalid:
        assert scan_lines(b"ok" + raw + b"ok")[2] == [(1, "invalid UTF-8")], raw


def test_core_rejects_bad_arguments():
    with pytest.raises(ValueError):
        scan_lines(b"abc", 4)
    with pytest.raises(ValueError):
        scan_lines(b"abc", -1)
    with pytest.raises(TypeError):
        scan_lines(bytearray(b"abc"))


# --- text format -----------------------------------------------------------------


def test_text_lines_are_trimmed_numbered_and_blank_ones_skipped():
    got = one(b"\n  AB-12 \n\t\n\r\nx y z\n  \t \nCaSe\n\n", format="text")
    assert got.codes == [b"AB-12", b"x y z", b"CaSe"]
    assert got.secrets == got.codes
    assert got.lines == [2, 5, 7]
    assert got.malformed == []


def test_crlf_and_lone_cr():
    got = one(b"a1\r\nb2\r\nc\rd\r\ne5\r", format="text")
    assert got.codes == [b"a1", b"b2", b"e5"]
    assert got.lines == [1, 2, 4]
    assert got.malformed == [(3, "control character")]


def test_bom_is_ignored_only_at_the_very_start():
    assert one(b"\xef\xbb\xbfabc\n").codes == [b"abc"]
    assert one(b"\xef\xbb\xbf").codes == []
    assert one(b"\xef\xbb").malformed == [(1, "invalid UTF-8")]
    assert one(b"abc\n\xef\xbb\xbfdef\n").codes == [b"abc", "\ufeffdef".encode()]


def test_lengths_count_characters_not_bytes():
    got = one(("€" * 8 + "\n" + "€" * 9 + "\n" + "a" * 9 + "\n").encode(), format="text", max_length=8)
    assert got.codes == ["€".encode() * 8]
    assert got.malformed == [(2, "longer than 8 characters"), (3, "longer than 8 characters")]
    default = one(b"a" * 128 + b"\n" + b"b" * 129)
    assert default.codes == [b"a" * 128]
    assert default.malformed == [(2, "longer than 128 characters")]


def test_control_characters_and_bad_bytes():
    got = one(b"a\x00b\nin\ttab\nA\x7f\nok\n\xffbad\n\xc0\xaf\nlast\x1fx\n", format="text")
    assert got.codes == [b"ok"]
    assert got.malformed == [
        (1, "control character"), (2, "control character"), (3, "control character"),
        (5, "invalid UTF-8"), (6, "invalid UTF-8"), (7, "control character"),
    ]


def test_very_long_lines_are_malformed_and_never_held_whole():
    huge = b"x" * (5 * MAX_LINE_BYTES)
    content = b"first\n" + huge + b"\nsecond\n" + b"y" * (MAX_LINE_BYTES + 1) + b"\r\n" + b"z" * MAX_LINE_BYTES + b"\r\n"
    expected = [(2, f"line longer than {MAX_LINE_BYTES} bytes"), (4, f"line longer than {MAX_LINE_BYTES} bytes"),
                (5, "longer than 128 characters")]
    for blocks in ([content], split_at(content, list(range(0, len(content), 4099))),
                   split_at(content, [len(content) - 2, len(content) - 1]), split_at(content, [6 + len(huge) - 1])):
        got = merged(parse(blocks))
        assert got.codes == [b"first", b"second"]
        assert got.lines == [1, 3]
        assert got.malformed == expected


def test_a_line_of_exactly_max_line_bytes_is_read():
    line = b" " * (MAX_LINE_BYTES - 3) + b"abc"
    for blocks in ([line + b"\r\n"], [line + b"\r", b"\n"], [line, b"\r", b"\n"], [line + b"\r"], [line]):
        assert merged(parse(blocks)).codes == [b"abc"], [len(b) for b in blocks]


def test_chunks_cover_at_most_chunk_lines_physical_lines():
    content = b"".join(b"c%d\n" % i if i % 3 else b"\n" for i in range(1, 101))
    chunks = parse(content, chunk_lines=7)
    for chunk in chunks:
        assert chunk.lines and max(chunk.lines) - min(chunk.lines) < 7
        assert len({(n - 1) // 7 for n in chunk.lines}) == 1
    assert merged(chunks).lines == [i for i in range(1, 101) if i % 3]


def test_chunks_of_blank_lines_only_are_not_yielded():
    assert parse(b"\n" * 50 + b"x\n", chunk_lines=10) == [ParsedChunk([b"x"], [b"x"], [51], [])]
    assert parse(b"") == []
    assert parse(b"\n \r\n\t\n") == []


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(content=contents, max_length=st.integers(1, 6))
def test_text_parse_matches_reference_over_whole_file(content, max_length):
    body = content[3:] if content.startswith(b"\xef\xbb\xbf") else content
    codes, lines, malformed, _, _ = ref_scan_lines(body, max_length=max_length)
    got = one(content, format="text", max_length=max_length)
    assert (got.codes, got.lines, got.malformed) == (codes, lines, malformed)
    assert got.secrets == got.codes


# --- block boundaries ----------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, content=contents, cuts=st.lists(st.integers(0, 500), max_size=12),
       format=st.sampled_from(["auto", "text", "csv"]), chunk_lines=st.integers(1, 5),
       max_length=st.integers(1, 20))
def test_results_do_not_depend_on_block_boundaries(header, content, cuts, format, chunk_lines, max_length):
    data = header + content
    options = dict(format=format, chunk_lines=chunk_lines, max_length=max_length)
    whole = outcome(data, **options)
    assert outcome(split_at(data, cuts), **options) == whole
    assert outcome([data[i:i + 1] for i in range(len(data))], **options) == whole
    assert outcome(agen(split_at(data, cuts[::-1])), **options) == whole


def test_every_split_position_of_a_tricky_file():
    data = "\ufeffcode,pin\r\n\"a,1\",€9\r\nb\x01,x\r\n\xc3\n\n😀,\r\nc,\"q\"\"r\"".encode("utf-8", "surrogateescape")
    whole = parse(data, chunk_lines=2)
    assert merged(whole).codes == [b"a,1", "😀".encode(), b"c"]
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert parse([data[:i], data[i:j], data[j:]], chunk_lines=2) == whole, (i, j)


# --- CSV ---------------------------------------------------------------------------


def test_csv_fields_become_secret_payloads():
    got = one(b"code,pin,serial,expires_at\n"
              b"A1, 1234 ,S-1, 2025-06-30 \n"
              b"B2,,,\n"
              b"C3,,,2025-06-30T23:59:59+08:00\n"
              b"D 4,99,,\n")
    assert got.codes == [b"A1", b"B2", b"C3", b"D 4"]
    assert got.lines == [2, 3, 4, 5]
    assert got.secrets == [
        b"A1\x1f1234\x1fS-1\x1f2025-06-30", b"B2",
        b"C3\x1f\x1f\x1f2025-06-30T23:59:59+08:00", b"D 4\x1f99\x1f\x1f",
    ]
    assert [decode_secret(s) for s in got.secrets] == [
        ("A1", "1234", "S-1", "2025-06-30"), ("B2", None, None, None),
        ("C3", None, None, "2025-06-30T23:59:59+08:00"), ("D 4", "99", None, None),
    ]


@pytest.mark.parametrize("header", [
    b"code", b"CODE", b" Code ", b"\xef\xbb\xbfcode", b"code\r", b"\n\n  \ncode", b'"code"',
    b"pin,code", b"Serial , EXPIRES_AT,code,PIN",
])
def test_csv_header_variants(header):
    names = [name.strip(b' "\r\n\xef\xbb\xbf').lower() for name in header.split(b",")]
    row = b",".join(b"X1" if name == b"code" else b"" for name in names)
    got = one(header + b"\n" + row + b"\n", format="csv")
    assert got.codes == got.secrets == [b"X1"]
    assert got == one(header + b"\n" + row + b"\n")  # auto finds the header too


def test_csv_column_order_follows_the_header():
    got = one(b"serial,code,pin\nS1,C1,P1\n")
    assert got.codes == [b"C1"]
    assert decode_secret(got.secrets[0]) == ("C1", "P1", "S1", None)


@pytest.mark.parametrize("header, message", [
    (b"code,color", "CSV header (line 1) has unknown column(s) 'color' (allowed: code, pin, serial, expires_at)"),
    (b"\ncode,pin,Batch,x", "CSV header (line 2) has unknown column(s) 'Batch', 'x'"),
    (b"code,pin,PIN", "CSV header (line 1) repeats column(s) 'pin'"),
    (b"code,,pin", "CSV header (line 1) has an empty column name"),
    (b"code,pin,", "CSV header (line 1) has an empty column name"),
    (b'"code,pin', "CSV header (line 1): unclosed quote"),
])
def test_bad_csv_headers_fail_the_whole_file(header, message):
    with pytest.raises(ValidationError, match="^" + re.escape(message)):
        parse(header + b"\nA,1,2\n", format="csv")
    with pytest.raises(ValidationError):
        parse(header + b"\nA,1,2\n", format="auto")


def test_csv_without_a_code_column_fails_and_does_not_echo_the_line():
    with pytest.raises(ValidationError) as info:
        parse(b"SECRET-CODE-1,1234\nB,2\n", format="csv")
    assert str(info.value) == ("CSV header (line 1) has no 'code' column "
                               "(allowed: code, pin, serial, expires_at)")
    with pytest.raises(ValidationError, match=r"CSV header \(line 1\) is malformed: control character"):
        parse(b"code\x01\nA\n", format="csv")
    with pytest.raises(ValidationError, match=r"line 1 looks like CSV"):
        parse(b"SECRET-CODE-1,1234\nB,2\n")


def test_csv_quoted_fields():
    got = one(b'code,pin\n"a,b",1\n"x""y",""\n" padded ",2\n"u" ,3\nlate"quote,4\n"open,5\nnext,6\n')
    assert got.codes == [b"a,b", b'x"y', b"padded", b'late"quote', b"next"]
    assert got.lines == [2, 3, 4, 6, 8]
    assert got.malformed == [
        (5, "bad CSV quoting: ',' expected after '\"'"),
        (7, "unclosed quote (a quoted field cannot span lines)"),
    ]


def test_csv_row_errors():
    got = one(b"code,pin,expires_at\n"
              b"a,1\n"
              b"b,1,2024-01-01,extra,more\n"
              b",1,\n"
              b"  ,,\n"
              b"c,1,2024-02-30\n"
              b"d,1,tomorrow\n"
              b"e,1,2024-01-01T25:00\n"
              b"f,12345,\n"
              b"ghijkl,1,\n"
              b"h,\x7f,\n"
              b"ok,1,20240131\n"
              b",,\n",
              max_length=4)
    assert got.codes == [b"ok"]
    assert got.lines == [12]
    assert got.malformed == [
        (2, "expected 3 fields, got 2"),
        (3, "expected 3 fields, got 5"),
        (4, "empty code"),
        (5, "empty code"),
        (6, "expires_at is not an ISO 8601 date"),
        (7, "expires_at is not an ISO 8601 date"),
        (8, "expires_at is not an ISO 8601 date"),
        (9, "pin longer than 4 characters"),
        (10, "longer than 4 characters"),
        (11, "control character"),
        (13, "empty code"),
    ]


def test_expires_at_accepts_iso_dates_and_datetimes_as_written():
    values = ["2025-01-31", "20250131", "2025-01-31T10:00", "2025-01-31 10:00:00", "2025-01-31T10:00:00Z",
              "2025-01-31T10:00:00.123+05:30", "2025-W05-5"]
    content = b"code,expires_at\n" + b"".join(b"c%d, %s \n" % (i, v.encode()) for i, v in enumerate(values))
    got = one(content)
    assert got.malformed == []
    assert [decode_secret(s)[3] for s in got.secrets] == values


def test_auto_detection():
    assert one(b"code\nA\nB\n").codes == [b"A", b"B"]  # a lone `code` is a one-column header
    assert one(b"\n\n  Code  \r\nA\n").lines == [4]
    assert one(b"codes\nA\n").codes == [b"codes", b"A"]  # not `code`: plain text
    assert one(b"A B C\nD\n").codes == [b"A B C", b"D"]
    assert one(b"\xff\ncode\n").malformed == [(1, "invalid UTF-8")]  # a malformed first line: text
    assert one(b"x" * 129 + b"\ncode\n").codes == [b"code"]
    assert one(b"a,b\nc,d\n", format="text").codes == [b"a,b", b"c,d"]
    with pytest.raises(ValidationError, match="looks like CSV"):
        parse(b"\n1234,5678\n")


def test_an_empty_csv_is_an_empty_import():
    assert parse(b"", format="csv") == []
    assert parse(b"\n\n", format="csv") == []
    assert parse(b"code\n", format="csv") == []


# --- sources and arguments -------------------------------------------------------------


async def test_path_sources(tmp_path):
    path = tmp_path / "codes.txt"
    path.write_bytes(b"\xef\xbb\xbfA1\r\n\r\nB2\r\n")
    for source in (path, str(path)):
        chunks = [c async for c in parse_codes(source)]
        assert chunks == [ParsedChunk([b"A1", b"B2"], [b"A1", b"B2"], [1, 3], [])]


async def test_missing_or_unreadable_paths_name_the_path(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(ValidationError, match=f"import file {missing} does not exist"):
        [c async for c in parse_codes(missing)]
    with pytest.raises(ValidationError, match=f"import file {tmp_path} cannot be read"):
        [c async for c in parse_codes(str(tmp_path))]


async def test_in_memory_and_iterable_sources():
    content = b"code,pin\nA,1\nB,2\n"
    expected = [c async for c in parse_codes(content)]
    assert len(merged(expected).codes) == 2
    for source in (bytearray(content), memoryview(content), [content[:5], bytearray(content[5:9]), memoryview(content[9:])],
                   iter([content]), agen([content[:3], content[3:]])):
        assert [c async for c in parse_codes(source)] == expected


async def test_bad_arguments_fail_at_the_call():
    with pytest.raises(ValidationError, match="format must be 'auto', 'text' or 'csv', got 'tsv'"):
        parse_codes(b"", format="tsv")
    for bad in (0, -1, 4097, True, 1.5):
        with pytest.raises(ValidationError, match="max_length"):
            parse_codes(b"", max_length=bad)
    for bad in (0, None, 2.0):
        with pytest.raises(ValidationError, match="chunk_lines"):
            parse_codes(b"", chunk_lines=bad)
    with pytest.raises(TypeError, match="source must be a path, bytes"):
        parse_codes(12)
    with pytest.raises(TypeError, match="a str source is a path"):
        parse_codes("A1\nB2\n")
    with pytest.raises(TypeError, match="the source yielded str, expected bytes blocks"):
        [c async for c in parse_codes(["A1\n"])]


# --- secret payloads -----------------------------------------------------------------


fields = st.text(st.characters(blacklist_characters="\x1f", blacklist_categories=("Cs",)), min_size=1)


@given(code=fields, pin=st.none() | fields, serial=st.none() | fields, expires_at=st.none() | fields)
def test_secret_round_trip(code, pin, serial, expires_at):
    payload = encode_secret(code, pin, serial, expires_at)
    assert decode_secret(payload) == (code, pin, serial, expires_at)
    if pin is serial is expires_at is None:
        assert payload == code.encode()


def test_secret_edge_cases():
    assert encode_secret("A", "", "", "") == b"A"
    assert encode_secret("A", serial="S") == b"A\x1f\x1fS\x1f"
    assert decode_secret(memoryview(b"A\x1f1\x1f\x1f")) == ("A", "1", None, None)
    with pytest.raises(ValidationError):
        encode_secret("A\x1fB")
    with pytest.raises(ValidationError):
        encode_secret("A", pin="1\x1f2")
    with pytest.raises(ValidationError, match="3 fields"):
        decode_secret(b"A\x1fB\x1fC")


# --- memory and speed -----------------------------------------------------------------


async def test_a_large_file_is_streamed_not_read_whole(tmp_path: pathlib.Path):
    # ~190 MB of 1000-character codes: holding the file, or its codes, would show in the peak.
    path = tmp_path / "big.txt"
    line = b"".join(b"%09d-" % i for i in range(100))[:1000] + b"\n"
    block = line * 1000
    with open(path, "wb") as f:
        for _ in range(190):
            f.write(block)
    size = path.stat().st_size
    gc.collect()
    tracemalloc.start()
    try:
        count = 0
        async for chunk in parse_codes(path, max_length=1000, chunk_lines=2000):
            count += len(chunk.codes)
            del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 190_000
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"


async def test_chunks_come_before_the_source_is_exhausted():
    pulled = 0

    def blocks():
        nonlocal pulled
        for i in range(100):
            pulled += 1
            yield b"".join(b"%015d\n" % (i * 10_000 + j) for j in range(10_000))

    async for chunk in parse_codes(blocks()):
        assert chunk.lines[0] == 1
        break
    assert pulled == 1


def test_parse_speed(capsys):
    async def count(content: bytes, format: str) -> tuple[int, float]:
        started = time.perf_counter()
        n = 0
        async for chunk in parse_codes(content, format=format):
            n += len(chunk.codes)
        return n, time.perf_counter() - started

    content = b"".join(b"%016X\n" % random.getrandbits(64) for _ in range(1_000_000))
    text_n, text_s = asyncio.run(count(content, "text"))
    text_n, text_s = min(asyncio.run(count(content, "text")), (text_n, text_s), key=lambda r: r[1])
    started = time.perf_counter()
    pos = 0
    while pos < len(content):
        pos = scan_lines(content, pos, 1, 128, 10_000)[3]
    core_s = time.perf_counter() - started
    csv_content = b"code,pin\n" + content[:17 * 200_000].replace(b"\n", b",1234\n")
    csv_n, csv_s = asyncio.run(count(csv_content, "csv"))
    assert (text_n, csv_n) == (1_000_000, 200_000)
    with capsys.disabled():
        print(f"\nimport parse, 16-char codes: text {text_n / text_s / 1e6:.1f}M lines/s "
              f"(scan_lines alone {text_n / core_s / 1e6:.1f}M), csv {csv_n / csv_s / 1e6:.2f}M lines/s")
