# cython: language_level=3
"""The compiled core of card-dispatch (see dispatch/_core.pyi for the documented API)."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr


# ---------------------------------------------------------------------------
# Imports: one pass over a buffer of text-import lines (dispatch/imports.py)
# ---------------------------------------------------------------------------
#
# The per-line rules live here once; dispatch/imports.py calls scan_lines for
# plain-text files and for the lines of a CSV file alike.

cdef Py_ssize_t _MAX_LINE_BYTES = 65536
MAX_LINE_BYTES = _MAX_LINE_BYTES

cdef enum _Verdict:
    _OK, _BLANK, _CONTROL, _INVALID, _TOO_LONG, _TOO_WIDE

cdef str _R_CONTROL = "control character"
cdef str _R_INVALID = "invalid UTF-8"
cdef str _R_TOO_WIDE = f"line longer than {_MAX_LINE_BYTES} bytes"


cdef inline bint _is_space(unsigned char c) noexcept nogil:
    # The set bytes.strip() removes: space, \t, \n, \v, \f, \r.
    return c == 0x20 or 0x09 <= c <= 0x0D


cdef inline bint _is_cont(unsigned char c) noexcept nogil:
    return (c & 0xC0) == 0x80


cdef _Verdict _check(const unsigned char* p, Py_ssize_t n, Py_ssize_t max_length) noexcept nogil:
    """Verdict on a trimmed, non-empty field: the first bad byte wins, then length.

    UTF-8 is checked strictly (Unicode table 3-7: no overlongs, no surrogates,
    nothing above U+10FFFF), exactly as bytes.decode("utf-8") does; a bad
    sequence is reported at its lead byte, where the decoder reports it.
    """
    cdef Py_ssize_t i = 0, chars = 0
    cdef unsigned char c, c1
    while i < n:
        c = p[i]
        if c < 0x80:
            if c < 0x20 or c == 0x7F:
                return _CONTROL
            i += 1
        elif c < 0xC2:  # a stray continuation byte, or an overlong 2-byte lead
            return _INVALID
        elif c < 0xE0:
            if i + 1 >= n or not _is_cont(p[i + 1]):
                return _INVALID
            i += 2
        elif c < 0xF0:
            if i + 2 >= n:
                return _INVALID
            c1 = p[i + 1]
            if c == 0xE0:
                if c1 < 0xA0 or c1 > 0xBF:  # overlong
                    return _INVALID
            elif c == 0xED:
                if c1 < 0x80 or c1 > 0x9F:  # surrogates
                    return _INVALID
            elif not _is_cont(c1):
                return _INVALID
            if not _is_cont(p[i + 2]):
                return _INVALID
            i += 3
        elif c < 0xF5:
            if i + 3 >= n:
                return _INVALID
            c1 = p[i + 1]
            if c == 0xF0:
                if c1 < 0x90 or c1 > 0xBF:  # overlong
                    return _INVALID
            elif c == 0xF4:
                if c1 < 0x80 or c1 > 0x8F:  # above U+10FFFF
                    return _INVALID
            elif not _is_cont(c1):
                return _INVALID
            if not _is_cont(p[i + 2]) or not _is_cont(p[i + 3]):
                return _INVALID
            i += 4
        else:
            return _INVALID
        chars += 1
    return _TOO_LONG if chars > max_length else _OK


def scan_lines(bytes data not None, Py_ssize_t pos=0, Py_ssize_t line=1, Py_ssize_t max_length=128,
               Py_ssize_t max_lines=-1):
    """Validate the lines of *data* from offset *pos*; see dispatch/_core.pyi."""
    cdef const unsigned char* base = <const unsigned char*> PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef const unsigned char* nl
    cdef Py_ssize_t start, end, after, done = 0
    cdef _Verdict verdict
    cdef list codes = [], lines = [], malformed = []
    cdef str too_long = None
    if pos < 0 or pos > size:
        raise ValueError(f"pos {pos} is outside the data (0..{size})")
    if max_length < 0:
        raise ValueError(f"max_length must be >= 0, got {max_length}")
    while pos < size and done != max_lines:
        nl = <const unsigned char*> memchr(base + pos, b"\n", <size_t> (size - pos))
        end = size if nl == NULL else nl - base
        after = end if nl == NULL else end + 1
        start = pos
        if end > start and base[end - 1] == 0x0D:  # the CR of CRLF (or a CR at the very end)
            end -= 1
        if end - start > _MAX_LINE_BYTES:
            verdict = _TOO_WIDE
        else:
            while start < end and _is_space(base[start]):
                start += 1
            while end > start and _is_space(base[end - 1]):
                end -= 1
            verdict = _BLANK if start == end else _check(base + start, end - start, max_length)
        if verdict == _OK:
            codes.append(PyBytes_FromStringAndSize(<const char*> base + start, end - start))
            lines.append(line)
        elif verdict == _CONTROL:
            malformed.append((line, _R_CONTROL))
        elif verdict == _INVALID:
            malformed.append((line, _R_INVALID))
        elif verdict == _TOO_LONG:
            if too_long is None:
                too_long = f"longer than {max_length} characters"
            malformed.append((line, too_long))
        elif verdict == _TOO_WIDE:
            malformed.append((line, _R_TOO_WIDE))
        line += 1
        done += 1
        pos = after
    return codes, lines, malformed, pos, line


# ---------------------------------------------------------------------------
# RESP: packing script calls (dispatch/store/store.py)
# ---------------------------------------------------------------------------
#
# A coalesced script call carries thousands of arguments; packing them in
# Python (redis-py's Encoder, one call per argument) was a fifth of the hot path.

from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memcpy

# Words are written straight into one growing buffer: bytes copied, str as its cached
# UTF-8, int formatted in place (no Python object per word); one bytes object at the end.


cdef struct Out:
    char* p
    Py_ssize_t n
    Py_ssize_t cap


cdef int _reserve(Out* o, Py_ssize_t more) except -1:
    cdef Py_ssize_t cap
    cdef char* p
    if o.n + more <= o.cap:
        return 0
    cap = o.cap * 2
    if cap < o.n + more + 4096:
        cap = o.n + more + 4096
    p = <char*>PyMem_Realloc(o.p, cap)
    if p == NULL:
        raise MemoryError()
    o.p, o.cap = p, cap
    return 0


cdef inline Py_ssize_t _decimal(char* out, long long v) noexcept:
    """*v* in decimal at *out* (at most 20 characters); its length."""
    cdef char tmp[24]
    cdef unsigned long long u = <unsigned long long>v
    cdef Py_ssize_t k = 0, n = 0
    if v < 0:
        u = (<unsigned long long>0) - u
        out[0] = b"-"
        n = 1
    while True:
        tmp[k] = <char>(48 + u % 10)
        k += 1
        u //= 10
        if u == 0:
            break
    while k:
        k -= 1
        out[n] = tmp[k]
        n += 1
    return n


cdef int _line(Out* o, char kind, Py_ssize_t count) except -1:
    _reserve(o, 24)
    o.p[o.n] = kind
    o.n += 1 + _decimal(o.p + o.n + 1, count)
    o.p[o.n] = 13
    o.p[o.n + 1] = 10
    o.n += 2
    return 0


cdef int _bulk(Out* o, const char* s, Py_ssize_t n) except -1:
    _line(o, b"$", n)
    _reserve(o, n + 2)
    memcpy(o.p + o.n, s, n)
    o.n += n
    o.p[o.n] = 13
    o.p[o.n + 1] = 10
    o.n += 2
    return 0


cdef inline bytes _arg(object a):
    if type(a) is bytes:
        return <bytes>a
    if type(a) is str:
        return (<str>a).encode()
    if type(a) is int or type(a) is bool:
        return str(int(a)).encode()
    if isinstance(a, (bytes, bytearray, memoryview)):
        return bytes(a)
    if isinstance(a, float):
        return repr(a).encode()
    raise TypeError(f"cannot send {type(a).__name__} to Redis")


cdef int _word(Out* o, object a) except -1:
    cdef const char* s
    cdef Py_ssize_t n
    cdef char num[24]
    cdef long long v
    cdef int overflow = 0
    if type(a) is bytes:
        return _bulk(o, PyBytes_AS_STRING(a), PyBytes_GET_SIZE(a))
    if type(a) is str:
        s = PyUnicode_AsUTF8AndSize(a, &n)
        return _bulk(o, s, n)
    if type(a) is int:
        v = PyLong_AsLongLongAndOverflow(a, &overflow)
        if not overflow:
            return _bulk(o, num, _decimal(num, v))
    b = _arg(a)  # bool, a big int, bytearray, memoryview, float; TypeError for the rest
    return _bulk(o, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


def pack_calls(bytes sha, list calls):
    """RESP encoding of one ``EVALSHA sha len(keys) *keys *args *fields`` for each
    ``(keys, args, items)`` of *calls*, one after the other: the fields are those of
    every item (a sequence) in *items*, in order, as if flattened into the arguments."""
    cdef Out o = Out(NULL, 0, 0)
    cdef Py_ssize_t count
    cdef list keys, args
    try:
        for keys, args, items in calls:
            count = 3 + len(keys) + len(args)
            for item in items:
                count += len(item)
            _line(&o, b"*", count)
            _bulk(&o, b"EVALSHA", 7)
            _bulk(&o, PyBytes_AS_STRING(sha), PyBytes_GET_SIZE(sha))
            _word(&o, len(keys))
            for a in keys:
                _word(&o, a)
            for a in args:
                _word(&o, a)
            for item in items:
                for a in item:
                    _word(&o, a)
        return PyBytes_FromStringAndSize(o.p, o.n)
    finally:
        PyMem_Free(o.p)


# ---------------------------------------------------------------------------
# Order ids (dispatch/engine.py)
# ---------------------------------------------------------------------------

from libc.stdint cimport uint64_t
from os import urandom as _urandom
from time import time_ns as _time_ns

cdef const char* _CROCKFORD = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
cdef bytes _pool = b""
cdef Py_ssize_t _pool_at = 0


cdef inline unsigned _bits5(uint64_t hi, uint64_t lo, int s) noexcept:
    if s >= 64:
        return (hi >> (s - 64)) & 31
    if s <= 59:
        return (lo >> s) & 31
    return ((lo >> s) | (hi << (64 - s))) & 31


cdef str _ulid(uint64_t hi, uint64_t lo):
    cdef char out[26]
    cdef int k
    for k in range(26):
        out[k] = _CROCKFORD[_bits5(hi, lo, 125 - 5 * k)]
    return PyBytes_FromStringAndSize(out, 26).decode("ascii")


def ulid_at(long long ms, bytes rnd):
    """The ULID of *ms* (48 bits) and 10 random bytes: 26 Crockford base-32 characters."""
    if len(rnd) != 10:
        raise ValueError("ulid_at needs 10 random bytes")
    cdef const unsigned char* r = <const unsigned char*>PyBytes_AS_STRING(rnd)
    cdef uint64_t hi = (<uint64_t>ms << 16) | (<uint64_t>r[0] << 8) | r[1]
    cdef uint64_t lo = 0
    cdef int k
    for k in range(2, 10):
        lo = (lo << 8) | r[k]
    return _ulid(hi, lo)


cdef uint64_t _last_hi = 0
cdef uint64_t _last_lo = 0


def new_ulid():
    """A fresh ULID: now in milliseconds, then 80 random bits (drawn from the OS in bulk).
    Monotonic within the process: in the same millisecond as the last one (or if the
    clock stepped back), the last one's random part plus one, so a process's ids sort
    in the order it made them."""
    global _pool, _pool_at, _last_hi, _last_lo
    cdef uint64_t ms = _time_ns() // 1_000_000
    cdef const unsigned char* r
    cdef int k
    if ms <= (_last_hi >> 16):
        _last_lo += 1
        if _last_lo == 0:
            _last_hi += 1  # carry into the random part's top 16 bits
        return _ulid(_last_hi, _last_lo)
    if _pool_at + 10 > len(_pool):
        _pool, _pool_at = _urandom(10 * 4096), 0
    r = <const unsigned char*>PyBytes_AS_STRING(_pool) + _pool_at
    _pool_at += 10
    _last_hi = (ms << 16) | (<uint64_t>r[0] << 8) | r[1]
    _last_lo = 0
    for k in range(2, 10):
        _last_lo = (_last_lo << 8) | r[k]
    return _ulid(_last_hi, _last_lo)


# ---------------------------------------------------------------------------
# Imports: fingerprints, their claims, sealing (dispatch/vault.py, dispatch/inventory.py)
# ---------------------------------------------------------------------------

include "_imports.pxi"
