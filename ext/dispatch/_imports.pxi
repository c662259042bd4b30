# Included by _core.pyx: the import path's fingerprints, claims and seals
# (dispatch/vault.py, dispatch/inventory.py, dispatch/store/inventory.py).
#
# An import handles a million codes in seconds, so nothing here makes a Python
# object per code except the ciphertexts that go to Redis: fingerprints, secrets
# and claim entries travel as packed bytes.

from cpython.bytes cimport PyBytes_Check
from libc.stdint cimport UINT32_MAX, uint8_t, uint32_t
from libc.stdlib cimport calloc, free, malloc, realloc
from hashlib import blake2b as _blake2b


cdef extern from *:
    """
    /* BLAKE2b (RFC 7693), keyed. The state after the key block is the same for every
       message, so it is computed once; a short message then costs one compression. */
    #include <stdint.h>
    #include <string.h>

    typedef struct { uint64_t init[8]; uint64_t keyed[8]; uint8_t block[128]; size_t outlen; } dp_b2;

    static const uint64_t dp_b2_iv[8] = {
        0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
        0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

    static const uint8_t dp_b2_sigma[12][16] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
        {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
        {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
        {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
        {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
        {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
        {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
        {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
        {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

    static inline uint64_t dp_load64(const uint8_t* p) {
        uint64_t w;
        memcpy(&w, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
    #endif
        return w;
    }

    #define DP_ROTR(w, c) (((w) >> (c)) | ((w) << (64 - (c))))
    #define DP_G(a, b, c, d, x, y) do { \
        v[a] = v[a] + v[b] + (x); v[d] = DP_ROTR(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];       v[b] = DP_ROTR(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y); v[d] = DP_ROTR(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];       v[b] = DP_ROTR(v[b] ^ v[c], 63); } while (0)
    #define DP_ROUND(r) do { \
        DP_G(0, 4, 8, 12, m[dp_b2_sigma[r][0]], m[dp_b2_sigma[r][1]]); \
        DP_G(1, 5, 9, 13, m[dp_b2_sigma[r][2]], m[dp_b2_sigma[r][3]]); \
        DP_G(2, 6, 10, 14, m[dp_b2_sigma[r][4]], m[dp_b2_sigma[r][5]]); \
        DP_G(3, 7, 11, 15, m[dp_b2_sigma[r][6]], m[dp_b2_sigma[r][7]]); \
        DP_G(0, 5, 10, 15, m[dp_b2_sigma[r][8]], m[dp_b2_sigma[r][9]]); \
        DP_G(1, 6, 11, 12, m[dp_b2_sigma[r][10]], m[dp_b2_sigma[r][11]]); \
        DP_G(2, 7, 8, 13, m[dp_b2_sigma[r][12]], m[dp_b2_sigma[r][13]]); \
        DP_G(3, 4, 9, 14, m[dp_b2_sigma[r][14]], m[dp_b2_sigma[r][15]]); } while (0)

    static void dp_b2_compress(uint64_t h[8], const uint8_t* block, uint64_t t, int last) {
        uint64_t v[16], m[16];
        int i;
        for (i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = dp_b2_iv[i]; }
        v[12] ^= t;  /* the high word of the counter stays 0: messages are far below 2^64 bytes */
        if (last) v[14] = ~v[14];
        for (i = 0; i < 16; i++) m[i] = dp_load64(block + 8 * i);
        /* spelled out, so that every message word index is a constant */
        DP_ROUND(0); DP_ROUND(1); DP_ROUND(2); DP_ROUND(3); DP_ROUND(4); DP_ROUND(5);
        DP_ROUND(6); DP_ROUND(7); DP_ROUND(8); DP_ROUND(9); DP_ROUND(10); DP_ROUND(11);
        for (i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
    }

    /* key: 1..64 bytes; outlen: 1..64 */
    static void dp_b2_setup(dp_b2* s, const uint8_t* key, size_t keylen, size_t outlen) {
        memcpy(s->init, dp_b2_iv, sizeof s->init);
        s->init[0] ^= 0x01010000ULL ^ ((uint64_t)keylen << 8) ^ (uint64_t)outlen;
        memset(s->block, 0, sizeof s->block);
        memcpy(s->block, key, keylen);
        memcpy(s->keyed, s->init, sizeof s->keyed);
        dp_b2_compress(s->keyed, s->block, 128, 0);
        s->outlen = outlen;
    }

    static void dp_b2_digest(const dp_b2* s, const uint8_t* msg, size_t n, uint8_t* out) {
        uint64_t h[8], t = 128;
        uint8_t last[128];
        size_t i;
        if (n == 0) {  /* the key block is the last block */
            memcpy(h, s->init, sizeof h);
            dp_b2_compress(h, s->block, 128, 1);
        } else {
            memcpy(h, s->keyed, sizeof h);
            while (n > 128) {
                t += 128;
                dp_b2_compress(h, msg, t, 0);
                msg += 128;
                n -= 128;
            }
            memset(last, 0, sizeof last);
            memcpy(last, msg, n);
            dp_b2_compress(h, last, t + n, 1);
        }
        for (i = 0; i < s->outlen; i++) out[i] = (uint8_t)(h[i / 8] >> (8 * (i % 8)));
    }

    /* A set of 16-byte fingerprints: open addressing, linear probing, kept at most three
       quarters full. Fingerprints are uniform, so their first 8 bytes are the hash; an all-zero
       slot is empty (the all-zero fingerprint itself is a flag). */
    typedef struct { uint8_t* slots; size_t mask; size_t count; int has_zero; } dp_fpset;

    static int dp_fpset_init(dp_fpset* s, size_t cap) {
        s->slots = (uint8_t*)calloc(cap, 16);
        s->mask = cap - 1;
        s->count = 0;
        s->has_zero = 0;
        return s->slots ? 0 : -1;
    }

    static void dp_fpset_place(uint8_t* slots, size_t mask, const uint8_t* fp) {
        static const uint8_t zero[16] = {0};
        size_t i = (size_t)dp_load64(fp) & mask;
        while (memcmp(slots + 16 * i, zero, 16) != 0) i = (i + 1) & mask;
        memcpy(slots + 16 * i, fp, 16);
    }

    /* Asks for the slot a fingerprint starts probing at, ahead of dp_fpset_add: the set
       is large and read at random, so each add would otherwise wait on memory. */
    static inline void dp_fpset_prefetch(const dp_fpset* s, const uint8_t* fp) {
    #if defined(__GNUC__)
        __builtin_prefetch(s->slots + 16 * ((size_t)dp_load64(fp) & s->mask));
    #endif
    }

    /* 1: added, 0: already there, -1: out of memory */
    static int dp_fpset_add(dp_fpset* s, const uint8_t* fp) {
        static const uint8_t zero[16] = {0};
        size_t i, j, cap;
        uint8_t* grown;
        if (memcmp(fp, zero, 16) == 0) {
            if (s->has_zero) return 0;
            s->has_zero = 1;
            return 1;
        }
        i = (size_t)dp_load64(fp) & s->mask;
        while (memcmp(s->slots + 16 * i, zero, 16) != 0) {
            if (memcmp(s->slots + 16 * i, fp, 16) == 0) return 0;
            i = (i + 1) & s->mask;
        }
        if (4 * (s->count + 1) > 3 * (s->mask + 1)) {
            cap = 2 * (s->mask + 1);
            grown = (uint8_t*)calloc(cap, 16);
            if (!grown) return -1;
            for (j = 0; j <= s->mask; j++)
                if (memcmp(s->slots + 16 * j, zero, 16) != 0) dp_fpset_place(grown, cap - 1, s->slots + 16 * j);
            free(s->slots);
            s->slots = grown;
            s->mask = cap - 1;
            dp_fpset_place(s->slots, s->mask, fp);
        } else {
            memcpy(s->slots + 16 * i, fp, 16);
        }
        s->count++;
        return 1;
    }
    """
    ctypedef struct dp_b2:
        pass
    ctypedef struct dp_fpset:
        uint8_t* slots
        size_t count
        int has_zero
    void dp_b2_setup(dp_b2* s, const uint8_t* key, size_t keylen, size_t outlen) noexcept nogil
    void dp_b2_digest(const dp_b2* s, const uint8_t* msg, size_t n, uint8_t* out) noexcept nogil
    int dp_fpset_init(dp_fpset* s, size_t cap) noexcept nogil
    int dp_fpset_add(dp_fpset* s, const uint8_t* fp) noexcept nogil
    void dp_fpset_prefetch(const dp_fpset* s, const uint8_t* fp) noexcept nogil


cdef inline const uint8_t* _bytes_of(object b, str what) except NULL:
    if not PyBytes_Check(b):
        raise TypeError(f"{what} must be bytes, got {type(b).__name__}")
    return <const uint8_t*>PyBytes_AS_STRING(b)


cdef int _put(Out* o, const void* p, Py_ssize_t n) except -1:
    _reserve(o, n)
    memcpy(o.p + o.n, p, n)
    o.n += n
    return 0


cdef struct _Buf:  # a growing buffer that needs no GIL (libc's realloc, not PyMem's)
    char* p
    size_t n
    size_t cap


cdef int _buf_put(_Buf* b, const void* src, size_t n) noexcept nogil:
    cdef size_t cap
    cdef char* p
    if b.n + n > b.cap:
        cap = 2 * b.cap if 2 * b.cap > b.n + n + 4096 else b.n + n + 4096
        p = <char*>realloc(b.p, cap)
        if p == NULL:
            return -1
        b.p, b.cap = p, cap
    memcpy(b.p + b.n, src, n)
    b.n += n
    return 0


cdef struct _Code:
    const uint8_t* code
    size_t code_n
    const char* secret
    size_t secret_n


cdef enum:
    _BATCH = 16  # codes fingerprinted before their adds (see _fresh_all)


cdef int _fresh_all(const dp_b2* b2, dp_fpset* seen, const _Code* codes, Py_ssize_t count,
                    _Buf* s, _Buf* e, _Buf* f, Py_ssize_t* repeats) noexcept nogil:
    """Fingerprints.fresh without the GIL: 0, -1 out of memory, -2 secrets over 4 GiB."""
    cdef Py_ssize_t i, start = 0, stop
    cdef uint8_t fps[_BATCH * 16]
    cdef uint8_t* fp
    cdef uint32_t end
    cdef int added
    # A batch's fingerprints first, their slots asked for, then the adds.
    while start < count:
        stop = start + _BATCH if start + _BATCH < count else count
        for i in range(start, stop):
            fp = fps + 16 * (i - start)
            dp_b2_digest(b2, codes[i].code, codes[i].code_n, fp)
            dp_fpset_prefetch(seen, fp)
        for i in range(start, stop):
            fp = fps + 16 * (i - start)
            added = dp_fpset_add(seen, fp)
            if added < 0:
                return -1
            if added == 0:
                repeats[0] += 1
                continue
            if s.n + codes[i].secret_n > UINT32_MAX:
                return -2
            end = <uint32_t>(s.n + codes[i].secret_n)
            if _buf_put(s, codes[i].secret, codes[i].secret_n) or _buf_put(e, &end, 4) or _buf_put(f, fp, 16):
                return -1
        start = stop
    return 0


cdef class Fingerprints:
    """Keyed BLAKE2b-128 of codes, and the set of those an import has seen (see _core.pyi)."""

    cdef dp_b2 _b2
    cdef dp_fpset _seen
    cdef bint _busy

    def __cinit__(self, bytes key not None):
        if not 1 <= len(key) <= 64:
            raise ValueError(f"a BLAKE2b key has 1 to 64 bytes, got {len(key)}")
        dp_b2_setup(&self._b2, <const uint8_t*>PyBytes_AS_STRING(key), len(key), 16)
        if dp_fpset_init(&self._seen, 1 << 14) != 0:
            raise MemoryError()

    def __dealloc__(self):
        free(self._seen.slots)

    def __len__(self):
        return self._seen.count + self._seen.has_zero

    def fingerprint(self, bytes code not None):
        cdef uint8_t out[16]
        dp_b2_digest(&self._b2, <const uint8_t*>PyBytes_AS_STRING(code), len(code), out)
        return PyBytes_FromStringAndSize(<const char*>out, 16)

    def fresh(self, list codes not None, list secrets not None):
        """(secrets, ends, fingerprints, repeats) of the codes not seen before; see _core.pyi."""
        if len(codes) != len(secrets):
            raise ValueError(f"{len(codes)} codes but {len(secrets)} secrets")
        if self._busy:
            raise RuntimeError("Fingerprints.fresh is already running in another thread")
        cdef Py_ssize_t i, count = len(codes), repeats = 0
        cdef _Code* items = <_Code*>malloc((count + 1) * sizeof(_Code))
        cdef _Buf s = _Buf(NULL, 0, 0), e = _Buf(NULL, 0, 0), f = _Buf(NULL, 0, 0)
        cdef int rc
        try:
            if items == NULL:
                raise MemoryError()
            for i in range(count):
                items[i].code = _bytes_of(codes[i], "a code")
                items[i].code_n = PyBytes_GET_SIZE(codes[i])
                items[i].secret = <const char*>_bytes_of(secrets[i], "a secret")
                items[i].secret_n = PyBytes_GET_SIZE(secrets[i])
            # The lists keep every code alive meanwhile; _busy keeps out a second caller.
            self._busy = True
            with nogil:
                rc = _fresh_all(&self._b2, &self._seen, items, count, &s, &e, &f, &repeats)
            self._busy = False
            if rc == -1:
                raise MemoryError()
            if rc == -2:
                raise ValueError("the secrets of one chunk exceed 4 GiB")
            return (PyBytes_FromStringAndSize(s.p, s.n), PyBytes_FromStringAndSize(e.p, e.n),
                    PyBytes_FromStringAndSize(f.p, f.n), repeats)
        finally:
            free(items)
            free(s.p)
            free(e.p)
            free(f.p)


cdef const char* _HEX = b"0123456789abcdef"


def group_claims(bytes fps not None):
    """[(shard, entries, positions)] of packed 16-byte fingerprints; see _core.pyi."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(fps) // 16
    if PyBytes_GET_SIZE(fps) % 16:
        raise ValueError("fingerprints are 16 bytes each")
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(fps)
    cdef uint32_t* start = <uint32_t*>calloc(65537, sizeof(uint32_t))
    cdef uint32_t* order = <uint32_t*>calloc(n + 1, sizeof(uint32_t))
    cdef Out ent = Out(NULL, 0, 0), pos = Out(NULL, 0, 0)
    cdef Py_ssize_t i, k, run, m, shard, bucket, lo, hi
    cdef list out = []
    cdef char head[3]
    try:
        if start == NULL or order == NULL:
            raise MemoryError()
        if n > 0xFFFFFFFF:
            raise ValueError("too many fingerprints")
        # counting sort on the first two bytes (shard, bucket), stable: file order within a bucket
        for i in range(n):
            start[((p[16 * i] << 8) | p[16 * i + 1]) + 1] += 1
        for k in range(65536):
            start[k + 1] += start[k]
        for i in range(n):
            k = (p[16 * i] << 8) | p[16 * i + 1]
            order[start[k]] = <uint32_t>i
            start[k] += 1
        # start[k] is now the end of bucket k, so bucket k is order[start[k-1]:start[k]]
        lo = 0
        for shard in range(256):
            ent.n = pos.n = 0
            for bucket in range(256):
                hi = start[(shard << 8) | bucket]
                run = lo
                while run < hi:
                    m = hi - run if hi - run < 255 else 255
                    head[0], head[1], head[2] = _HEX[bucket >> 4], _HEX[bucket & 15], <char>m
                    _put(&ent, head, 3)
                    for k in range(run, run + m):
                        _put(&ent, p + 16 * order[k] + 2, 14)
                        _put(&pos, &order[k], 4)
                    run += m
                lo = hi
            if ent.n:
                out.append((shard, PyBytes_FromStringAndSize(ent.p, ent.n), PyBytes_FromStringAndSize(pos.p, pos.n)))
        return out
    finally:
        free(start)
        free(order)
        PyMem_Free(ent.p)
        PyMem_Free(pos.p)


# ---- AES-GCM through OpenSSL (the libcrypto Python's own ssl module uses) ---------------

cdef extern from "openssl/evp.h":
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass
    EVP_CIPHER_CTX* EVP_CIPHER_CTX_new() nogil
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX* ctx) nogil
    const EVP_CIPHER* EVP_aes_128_gcm() nogil
    const EVP_CIPHER* EVP_aes_192_gcm() nogil
    const EVP_CIPHER* EVP_aes_256_gcm() nogil
    int EVP_EncryptInit_ex(EVP_CIPHER_CTX* ctx, const EVP_CIPHER* cipher, void* impl,
                           const unsigned char* key, const unsigned char* iv) nogil
    int EVP_EncryptUpdate(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl,
                          const unsigned char* inp, int inl) nogil
    int EVP_EncryptFinal_ex(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl) nogil
    int EVP_DecryptInit_ex(EVP_CIPHER_CTX* ctx, const EVP_CIPHER* cipher, void* impl,
                           const unsigned char* key, const unsigned char* iv) nogil
    int EVP_DecryptUpdate(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl,
                          const unsigned char* inp, int inl) nogil
    int EVP_DecryptFinal_ex(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl) nogil
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX* ctx, int type, int arg, void* ptr) nogil
    int EVP_CTRL_GCM_GET_TAG
    int EVP_CTRL_GCM_SET_TAG

cdef enum:
    _NONCE = 12
    _TAG = 16


cdef const EVP_CIPHER* _gcm(bytes key) except NULL:
    if len(key) == 16:
        return EVP_aes_128_gcm()
    if len(key) == 24:
        return EVP_aes_192_gcm()
    if len(key) == 32:
        return EVP_aes_256_gcm()
    raise ValueError(f"an AES key has 16, 24 or 32 bytes, got {len(key)}")


cdef int _seal_all(EVP_CIPHER_CTX* ctx, const unsigned char* aad, int aadlen, const unsigned char* s,
                   const uint32_t* e, const unsigned char* k, Py_ssize_t count, const unsigned char* nonce,
                   unsigned char** outs) noexcept nogil:
    """Fill outs[j] (already sized) for the j-th kept secret; 0, or -1 if OpenSSL fails."""
    cdef Py_ssize_t i, j = 0
    cdef uint32_t begin = 0
    cdef int size, outl, finl
    cdef unsigned char* o
    for i in range(count):
        if k != NULL and k[i] == 0:
            begin = e[i]
            continue
        size = <int>(e[i] - begin)
        o = outs[j]
        memcpy(o + 1, nonce, _NONCE)
        o += 1 + _NONCE
        if not (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce)
                and EVP_EncryptUpdate(ctx, NULL, &outl, aad, aadlen)
                and EVP_EncryptUpdate(ctx, o, &outl, s + begin, size)
                and EVP_EncryptFinal_ex(ctx, o + outl, &finl)
                and EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, _TAG, o + size)):
            return -1
        nonce += _NONCE
        begin = e[i]
        j += 1
    return 0


def seal(bytes key not None, int key_id, bytes aad not None, bytes secrets not None, bytes ends not None,
         bytes keep, bytes nonces not None):
    """``key_id || nonce || AES-GCM(secret, aad)`` of each kept secret; see _core.pyi."""
    cdef Py_ssize_t count = PyBytes_GET_SIZE(ends) // 4, i, j, kept = 0
    cdef const uint32_t* e = <const uint32_t*>PyBytes_AS_STRING(ends)
    cdef const unsigned char* k = NULL
    cdef const EVP_CIPHER* cipher
    cdef EVP_CIPHER_CTX* ctx = NULL
    cdef unsigned char** outs = NULL
    cdef uint32_t begin = 0
    cdef const unsigned char* a
    cdef const unsigned char* src
    cdef const unsigned char* nonce
    cdef int failed, alen
    cdef list out = []
    if PyBytes_GET_SIZE(ends) % 4:
        raise ValueError("ends are 4 bytes each")
    if not 0 <= key_id <= 255:
        raise ValueError(f"a key id is one byte, got {key_id}")
    cipher = _gcm(key)
    if PyBytes_GET_SIZE(aad) > 0x7FFFFFFF:
        raise ValueError("aad too long")
    if keep is not None:
        if PyBytes_GET_SIZE(keep) != count:
            raise ValueError(f"keep has {PyBytes_GET_SIZE(keep)} flags for {count} secrets")
        k = <const unsigned char*>PyBytes_AS_STRING(keep)
    for i in range(count):
        if e[i] < begin or e[i] > <size_t>PyBytes_GET_SIZE(secrets) or e[i] - begin > 0x7FFFFFFF - 64:
            raise ValueError("ends must rise and stay within the secrets")
        begin = e[i]
        kept += k == NULL or k[i] != 0
    if PyBytes_GET_SIZE(nonces) != _NONCE * kept:
        raise ValueError(f"{PyBytes_GET_SIZE(nonces)} bytes of nonces for {kept} secrets ({_NONCE} each)")
    # The results are made first, then filled without the GIL: nothing else sees them yet.
    outs = <unsigned char**>calloc(kept + 1, sizeof(unsigned char*))
    ctx = EVP_CIPHER_CTX_new()
    try:
        if outs == NULL or ctx == NULL:
            raise MemoryError()
        begin = j = 0
        for i in range(count):
            if k == NULL or k[i] != 0:
                blob = PyBytes_FromStringAndSize(NULL, 1 + _NONCE + (e[i] - begin) + _TAG)
                outs[j] = <unsigned char*>PyBytes_AS_STRING(blob)
                outs[j][0] = <unsigned char>key_id
                out.append(blob)
                j += 1
            begin = e[i]
        if not EVP_EncryptInit_ex(ctx, cipher, NULL, <const unsigned char*>PyBytes_AS_STRING(key), NULL):
            raise RuntimeError("OpenSSL refused the AES-GCM key")
        a = <const unsigned char*>PyBytes_AS_STRING(aad)
        alen = <int>PyBytes_GET_SIZE(aad)
        src = <const unsigned char*>PyBytes_AS_STRING(secrets)
        nonce = <const unsigned char*>PyBytes_AS_STRING(nonces)
        with nogil:
            failed = _seal_all(ctx, a, alen, src, e, k, count, nonce, outs)
        if failed:
            raise RuntimeError("OpenSSL failed to encrypt")
        return out
    finally:
        EVP_CIPHER_CTX_free(ctx)
        free(outs)


cdef class Opener:
    """AES-GCM decryption with one key, whose schedule is set up once; see _core.pyi."""

    cdef EVP_CIPHER_CTX* _ctx

    def __cinit__(self, bytes key not None):
        cdef const EVP_CIPHER* cipher = _gcm(key)
        self._ctx = EVP_CIPHER_CTX_new()
        if self._ctx == NULL:
            raise MemoryError()
        if not EVP_DecryptInit_ex(self._ctx, cipher, NULL, <const unsigned char*>PyBytes_AS_STRING(key), NULL):
            raise RuntimeError("OpenSSL refused the AES-GCM key")

    def __dealloc__(self):
        EVP_CIPHER_CTX_free(self._ctx)

    def open(self, bytes blob not None, Py_ssize_t at, bytes aad not None):
        """The plaintext of ``nonce || ciphertext || tag`` in *blob* from offset *at*."""
        cdef Py_ssize_t size = PyBytes_GET_SIZE(blob) - at - _NONCE - _TAG
        cdef const unsigned char* p
        cdef unsigned char* o
        cdef bytes out
        cdef int outl, finl, ok
        if at < 0 or size < 0 or size > 0x7FFFFFFF or PyBytes_GET_SIZE(aad) > 0x7FFFFFFF:
            raise ValueError(f"no sealed secret at {at} of {PyBytes_GET_SIZE(blob)} bytes "
                             f"(nonce {_NONCE} + tag {_TAG} at least)")
        p = <const unsigned char*>PyBytes_AS_STRING(blob) + at
        out = PyBytes_FromStringAndSize(NULL, size)
        o = <unsigned char*>PyBytes_AS_STRING(out)
        ok = (EVP_DecryptInit_ex(self._ctx, NULL, NULL, NULL, p)
              and EVP_DecryptUpdate(self._ctx, NULL, &outl, <const unsigned char*>PyBytes_AS_STRING(aad),
                                    <int>PyBytes_GET_SIZE(aad))
              and EVP_DecryptUpdate(self._ctx, o, &outl, p + _NONCE, <int>size)
              and EVP_CIPHER_CTX_ctrl(self._ctx, EVP_CTRL_GCM_SET_TAG, _TAG, <void*>(p + _NONCE + size))
              and EVP_DecryptFinal_ex(self._ctx, o + outl, &finl))
        if not ok:
            raise ValueError("the sealed secret failed authentication")
        return out


# ---- the per-code forms (Python objects per code) ------------------------------------


def fingerprint_chunk(bytes key, list codes, list secrets, set seen):
    """(fresh secrets, their fingerprints, duplicates): the keyed BLAKE2b-128 of each
    code, skipping the ones already in *seen* (which it adds the new ones to)."""
    cdef list fresh = [], fps = []
    cdef Py_ssize_t i, dup = 0
    cdef bytes fp
    for i in range(len(codes)):
        fp = _blake2b(codes[i], key=key, digest_size=16).digest()
        if fp in seen:
            dup += 1
        else:
            seen.add(fp)
            fresh.append(secrets[i])
            fps.append(fp)
    return fresh, fps, dup


def group_fingerprints(list fps, list bucket_keys):
    """{shard byte: (bucket keys, fields, indexes in fps)} of 16-byte fingerprints: the
    shard is fp[0], the bucket ``bucket_keys[fp[0] * 256 + fp[1]]``, the field fp[2:]."""
    cdef dict groups = {}
    cdef Py_ssize_t i
    cdef bytes fp
    cdef const unsigned char* p
    cdef tuple g
    for i in range(len(fps)):
        fp = fps[i]
        p = <const unsigned char*>PyBytes_AS_STRING(fp)
        g = groups.get(p[0])
        if g is None:
            g = groups[p[0]] = ([], [], [])
        (<list>g[0]).append(bucket_keys[(p[0] << 8) | p[1]])
        (<list>g[1]).append(PyBytes_FromStringAndSize(<const char*>p + 2, PyBytes_GET_SIZE(fp) - 2))
        (<list>g[2]).append(i)
    return groups
