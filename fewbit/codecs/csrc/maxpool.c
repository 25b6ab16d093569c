/* fewbit CPU codecs: max-pool window offsets, one pass per direction.
 *
 * Plain C (no torch headers), compiled at first use by fewbit/codecs/native.py together with
 * the other csrc files and called through ctypes on contiguous tensors' data pointers.
 *
 * Geometry (int64 g[18], spatial dims padded in front to 3: depth 1, kernel 1, stride 1,
 * padding 0, dilation 1 for 2-d pooling): out[3], in[3], kernel[3], stride[3], padding[3],
 * dilation[3]. Element e of the flattened (contiguous) output has spatial output coordinates
 * (o0, o1, o2) = position of e inside its plane of out0*out1*out2 elements; its window
 * starts at o*stride - padding.
 *
 * Encode: idx (torch's max_pool*_with_indices indices: flat index inside the input plane) ->
 *   code = (off0 * k1 + off1) * k2 + off2, off = (coordinate - window start) / dilation,
 *   packed at `bits` bits per code (code e at stream bits [e*bits, (e+1)*bits), little-endian
 *   bytes: fewbit's bitpack layout). Decode is the inverse: codes -> int64 input indices.
 * The same codes as fewbit/functional/pooling.py's torch ops. Work is split into chunks of
 * MP_CHUNK codes (a multiple of 8: a chunk owns whole bytes), in parallel with OpenMP when
 * built with it; every code depends only on its element, so the bytes do not depend on the
 * thread count. Input planes must hold fewer than 2^31 elements (callers check).
 */
#include "float_bits.h"

#ifndef MP_CHUNK
#define MP_CHUNK 8192 /* codes per parallel chunk (multiple of 8) */
#endif
#ifndef MP_PAR_MIN
#define MP_PAR_MIN 65536 /* parallel from this many codes on */
#endif

#ifdef _OPENMP
#define MP_PARALLEL_FOR _Pragma("omp parallel for schedule(static) if (n >= MP_PAR_MIN)")
#else
#define MP_PARALLEL_FOR
#endif

/* output coordinates of element e (counters advanced per element by mp_next) */
typedef struct {
    int64_t o0, o1, o2;
} mp_pos;

static inline mp_pos mp_start(const int64_t *g, int64_t e) {
    const int64_t *out = g;
    int64_t q = e % (out[0] * out[1] * out[2]);
    mp_pos p = {q / (out[1] * out[2]), (q / out[2]) % out[1], q % out[2]};
    return p;
}

static inline void mp_next(const int64_t *g, mp_pos *p) {
    if (++p->o2 < g[2]) return;
    p->o2 = 0;
    if (++p->o1 < g[1]) return;
    p->o1 = 0;
    if (++p->o0 < g[0]) return;
    p->o0 = 0;
}

static inline int64_t mp_div(int64_t a, int64_t d) { return d == 1 ? a : a / d; }

/* v / d for v < 2^31, d >= 1, from a double reciprocal (inv = 1.0 / d) and one correction
 * step: the estimate is off by at most one, so the result is exact (an integer division
 * costs several times more). */
static inline uint32_t mp_udiv(uint32_t v, uint32_t d, double inv) {
    uint32_t q = (uint32_t)((double)v * inv);
    if ((uint64_t)q * d > v) q--;
    else if ((uint64_t)(q + 1) * d <= v) q++;
    return q;
}

static void mp_encode_range(const int64_t *idx, const int64_t *g, int64_t a, int64_t b,
                            int bits, uint8_t *packed) {
    const int64_t *in = g + 3, *k = g + 6, *s = g + 9, *pd = g + 12, *dl = g + 15;
    const uint32_t in2 = (uint32_t)in[2], in12 = (uint32_t)(in[1] * in[2]);
    const double inv2 = 1.0 / in2, inv12 = 1.0 / in12;
    mp_pos p = mp_start(g, a);
    for (int64_t e0 = a; e0 < b; e0 += 8) {
        int m = (int)(b - e0 < 8 ? b - e0 : 8);
        uint64_t acc = 0;
        for (int j = 0; j < m; j++) {
            uint32_t v = (uint32_t)idx[e0 + j];
            uint32_t c0 = mp_udiv(v, in12, inv12), r = v - c0 * in12;
            uint32_t c1 = mp_udiv(r, in2, inv2), c2 = r - c1 * in2;
            int64_t off0 = mp_div((int64_t)c0 - (p.o0 * s[0] - pd[0]), dl[0]);
            int64_t off1 = mp_div((int64_t)c1 - (p.o1 * s[1] - pd[1]), dl[1]);
            int64_t off2 = mp_div((int64_t)c2 - (p.o2 * s[2] - pd[2]), dl[2]);
            uint64_t code = (uint64_t)((off0 * k[1] + off1) * k[2] + off2);
            acc |= code << (j * bits);
            mp_next(g, &p);
        }
        memcpy(packed + (e0 / 8) * bits, &acc, (size_t)((m * bits + 7) / 8));
    }
}

static void mp_decode_range(const uint8_t *packed, int64_t total_bytes, const int64_t *g,
                            int64_t a, int64_t b, int bits, int64_t *idx) {
    const int64_t *in = g + 3, *k = g + 6, *s = g + 9, *pd = g + 12, *dl = g + 15;
    const uint32_t k1 = (uint32_t)k[1], k2 = (uint32_t)k[2];
    const double inv1 = 1.0 / k1, inv2 = 1.0 / k2;
    const uint64_t mask = (1ull << bits) - 1u;
    mp_pos p = mp_start(g, a);
    for (int64_t e0 = a; e0 < b; e0 += 8) {
        int m = (int)(b - e0 < 8 ? b - e0 : 8);
        int64_t at = (e0 / 8) * bits, avail = total_bytes - at;
        uint64_t acc = 0;
        memcpy(&acc, packed + at, (size_t)(avail < bits ? avail : bits));
        for (int j = 0; j < m; j++) {
            uint32_t code = (uint32_t)((acc >> (j * bits)) & mask);
            uint32_t t = mp_udiv(code, k2, inv2), off2 = code - t * k2;
            uint32_t off0 = mp_udiv(t, k1, inv1), off1 = t - off0 * k1;
            int64_t c0 = p.o0 * s[0] - pd[0] + (int64_t)off0 * dl[0];
            int64_t c1 = p.o1 * s[1] - pd[1] + (int64_t)off1 * dl[1];
            int64_t c2 = p.o2 * s[2] - pd[2] + (int64_t)off2 * dl[2];
            idx[e0 + j] = (c0 * in[1] + c1) * in[2] + c2;
            mp_next(g, &p);
        }
    }
}

/* idx: n int64 indices (contiguous output order) -> ceil(n * bits / 8) packed bytes */
void fewbit_maxpool_encode(const int64_t *idx, int64_t n, const int64_t *g, int bits,
                           uint8_t *packed) {
    int64_t nchunks = (n + MP_CHUNK - 1) / MP_CHUNK;
    MP_PARALLEL_FOR
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t a = c * MP_CHUNK, b = a + MP_CHUNK < n ? a + MP_CHUNK : n;
        mp_encode_range(idx, g, a, b, bits, packed);
    }
}

/* packed codes of n elements -> n int64 input indices */
void fewbit_maxpool_decode(const uint8_t *packed, int64_t n, const int64_t *g, int bits,
                           int64_t *idx) {
    int64_t nchunks = (n + MP_CHUNK - 1) / MP_CHUNK;
    int64_t total_bytes = (n * bits + 7) / 8;
    MP_PARALLEL_FOR
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t a = c * MP_CHUNK, b = a + MP_CHUNK < n ? a + MP_CHUNK : n;
        mp_decode_range(packed, total_bytes, g, a, b, bits, idx);
    }
}
