/* fewbit CPU codecs: the group quantizer (fewbit/codecs/quantize.py), one pass each way.
 * Compiled with activations.c into one library by fewbit/codecs/native.py. */
#define _DEFAULT_SOURCE /* madvise */
#include "float_bits.h"
#if defined(__linux__)
#include <sys/mman.h>
#endif

/* ---- group quantizer (fewbit/codecs/quantize.py): one pass each way ----
 *
 * Same arithmetic as the eager torch path, in float32: per group min/max, lo rounded down
 * to bf16 (bit ops) or fp16 (exact: fp16 inputs), step = (max/L - lo/L) * (1 + 2^-20)
 * rounded up to bf16, non-finite groups -> NaN lo/scale (codes from x itself, as eager),
 * a positive step at least 2^-126, code = clamp(floor((x - lo) * inv + u), 0, L) with
 * inv = 1 / scale (1 for scale 0) rounded to float32 and u = (mix32(e + key) >> 8) * 2^-24.
 *
 * Codes are written into the packed stream (code e at bit e * bits): a byte is set (=) by
 * the first code it holds and ORed by the others, so the stream needs no zeroing as long as
 * each byte's codes are written in order by one caller (callers split at multiples of 8
 * elements). Hot loops work on 16-lane vectors (GCC vector extensions: one AVX-512 register,
 * two AVX2 or four SSE2 ones, picked at load time by Q_CLONES; quantize's min/max and codes
 * also as AVX-512 intrinsics, picked at run time); every lane does the scalar float32
 * operations of the eager path (IEEE; the AVX-512 path's one fused multiply-add has an exact
 * product), so all versions give the same bytes. Large calls split their groups across
 * OpenMP threads (Q_FOR_RUNS); fresh output buffers get a huge-page hint from the caller
 * (fewbit_advise_hugepages). */

#define QMAX_GROUP 4096

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define Q_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
/* quantize: AVX-512 intrinsics for min/max and codes (one instruction per min, max and clamp
 * where the vector code above needs a compare and a blend), picked at run time */
#define Q_HAVE_512 1
#include <immintrin.h>
#define Q_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define Q_CLONES
#define Q_HAVE_512 0
#endif
#define Q_INLINE static inline __attribute__((always_inline))

typedef float q_vf __attribute__((vector_size(64)));
typedef int32_t q_vi __attribute__((vector_size(64)));
typedef uint32_t q_vu __attribute__((vector_size(64)));
typedef uint64_t q_vq __attribute__((vector_size(64)));
typedef uint8_t q_vb __attribute__((vector_size(16)));
typedef uint8_t q_vb8 __attribute__((vector_size(8)));
typedef uint16_t q_vh __attribute__((vector_size(32)));

static inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    return h ^ (h >> 16);
}

Q_INLINE void mix32_v(q_vu *hp) { /* mix32 in each lane */
    q_vu h = *hp;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    *hp = h ^ (h >> 16);
}

/* nearest bf16 at or above (up) / at or below v, as bf16 bits (v finite or inf) */
static inline uint16_t bf16_directed(float v, int up) {
    uint32_t u = f32_to_bits(v);
    int inexact = (u & 0xffffu) != 0;
    int neg = (u >> 31) != 0;
    int away = inexact && (up ? !neg : neg);
    return (uint16_t)(((u & 0xffff0000u) + (away ? 0x10000u : 0u)) >> 16);
}

static inline float f64_load(double v) { return (float)v; }

/* ---- packing: code e of the stream at bit e * bits of byte e * bits / 8 ---- */

/* one code, scalar: sets the byte for the first code of a byte, ORs the others */
Q_INLINE void put_code(uint8_t *packed, int64_t e, int bits, unsigned code) {
    int64_t at = e * bits;
    uint8_t v = (uint8_t)(code << (at & 7));
    if ((at & 7) == 0)
        packed[at >> 3] = v;
    else
        packed[at >> 3] |= v;
}

/* 64 codes (bytes, each below 2**bits) -> 8 * bits packed bytes. Lane trick: a 32-bit word
 * holds 4 codes at bits 0/8/16/24; shifting them down by 8 - bits per step lines them up. */
Q_INLINE void pack64(const uint8_t *c, int bits, uint8_t *out) {
    if (bits == 2) { /* byte = c0 | c1 << 2 | c2 << 4 | c3 << 6 */
        q_vu w;
        memcpy(&w, c, 64);
        w = w | (w >> 6) | (w >> 12) | (w >> 18);
        q_vb b = __builtin_convertvector(w, q_vb);
        memcpy(out, &b, 16);
    } else if (bits == 4) { /* bytes (c0 | c1 << 4), (c2 | c3 << 4) */
        q_vu w;
        memcpy(&w, c, 64);
        w = w | (w >> 4);
        w = (w & 0xffu) | ((w >> 8) & 0xff00u);
        q_vh h = __builtin_convertvector(w, q_vh);
        memcpy(out, &h, 32);
    } else { /* bits == 1: a 64-bit word holds 8 codes */
        q_vq w;
        memcpy(&w, c, 64);
        w = w | (w >> 7) | (w >> 14) | (w >> 21) | (w >> 28) | (w >> 35) | (w >> 42) | (w >> 49);
        q_vb8 b = __builtin_convertvector(w, q_vb8);
        memcpy(out, &b, 8);
    }
}

/* codes[0, m) of elements [e0, e0 + m) into the stream */
Q_INLINE void pack_codes(const uint8_t *codes, int64_t m, int64_t e0, int bits,
                         uint8_t *packed) {
    if (bits == 8) {
        memcpy(packed + e0, codes, (size_t)m);
        return;
    }
    int64_t k = 0;
    if ((e0 * bits) % 8 == 0) { /* whole bytes from the start: 64 codes at a time */
        for (; k + 64 <= m; k += 64) pack64(codes + k, bits, packed + (e0 + k) * bits / 8);
    }
    for (; k < m; k++) put_code(packed, e0 + k, bits, codes[k]);
}

/* lane-wise a < b ? a : b and a > b ? a : b (what the scalar loop does per element) */
Q_INLINE void min_max_step(const q_vf *vp, q_vf *mn, q_vf *mx) {
    q_vf v = *vp;
    q_vi lt = v < *mn, gt = v > *mx;
    *mn = (q_vf)(((q_vi)v & lt) | ((q_vi)*mn & ~lt));
    *mx = (q_vf)(((q_vi)v & gt) | ((q_vi)*mx & ~gt));
}

/* The end of group_range (both versions): across the 16 lanes' min / max / non-finite bits
 * (a pairwise tree: 4 dependent steps instead of 16), then elements [k, m) one by one;
 * returns whether all were finite. */
static inline int range_finish(const float *mnl, const float *mxl, const int32_t *nfl,
                               const float *buf, int64_t k, int64_t m, float *mn_out,
                               float *mx_out) {
    float a[16], b[16];
    int32_t f[16];
    memcpy(a, mnl, sizeof a);
    memcpy(b, mxl, sizeof b);
    memcpy(f, nfl, sizeof f);
    for (int w = 8; w >= 1; w /= 2) {
        for (int t = 0; t < w; t++) {
            a[t] = a[t + w] < a[t] ? a[t + w] : a[t];
            b[t] = b[t + w] > b[t] ? b[t + w] : b[t];
            f[t] |= f[t + w];
        }
    }
    float mn = a[0] < buf[0] ? a[0] : buf[0], mx = b[0] > buf[0] ? b[0] : buf[0];
    int32_t nf = f[0];
    for (; k < m; k++) {
        float v = buf[k];
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
        nf |= !(fabsf(v) <= 3.4028234663852886e38f);
    }
    *mn_out = mn;
    *mx_out = mx;
    return nf == 0;
}

/* min and max of m >= 1 floats (lane-wise in 2 x 16 lanes, then across); returns whether
 * all are finite (x - x is +0 exactly for finite x, NaN for inf and NaN: the OR of their bits
 * is zero iff all are finite). Which zero a {+0, -0} minimum returns depends on the lanes (as
 * in torch's vectorized amin, whose choice depends on its own). */
Q_INLINE int group_range(const float *buf, int64_t m, float *mn_out, float *mx_out) {
    q_vf mn0, mx0, mn1, mx1;
    q_vi nf0 = {0}, nf1 = {0};
    for (int t = 0; t < 16; t++) mn0[t] = buf[0];
    mx0 = mn1 = mx1 = mn0;
    int64_t k = 0;
    for (; k + 32 <= m; k += 32) {
        q_vf a, b;
        memcpy(&a, buf + k, sizeof a);
        memcpy(&b, buf + k + 16, sizeof b);
        min_max_step(&a, &mn0, &mx0);
        min_max_step(&b, &mn1, &mx1);
        nf0 |= (q_vi)(a - a);
        nf1 |= (q_vi)(b - b);
    }
    for (; k + 16 <= m; k += 16) {
        q_vf a;
        memcpy(&a, buf + k, sizeof a);
        min_max_step(&a, &mn0, &mx0);
        nf0 |= (q_vi)(a - a);
    }
    min_max_step(&mn1, &mn0, &mx0); /* mn0 = lanewise min of both sets; mx0 likewise */
    min_max_step(&mx1, &mn0, &mx0);
    nf0 |= nf1;
    float mnl[16], mxl[16];
    int32_t nfl[16];
    memcpy(mnl, &mn0, sizeof mnl);
    memcpy(mxl, &mx0, sizeof mxl);
    memcpy(nfl, &nf0, sizeof nfl);
    return range_finish(mnl, mxl, nfl, buf, k, m, mn_out, mx_out);
}

/* code of one element: clamp(floor((x - lo) * inv + u), 0, L), NaN products as 0 (NaN
 * fails t > 0: no separate test); t >= 0 after the clamp, so truncation is floor. */
static inline uint8_t code_of(float x, float lo32, float inv, uint32_t hin, float L) {
    float v = (x - lo32) * inv;
    uint32_t h = mix32(hin);
    float u = (float)(int32_t)(h >> 8) * 5.9604644775390625e-08f;
    float t = v + u;
    t = t > 0.0f ? t : 0.0f;
    t = t < L ? t : L;
    return (uint8_t)(int32_t)t;
}

/* codes of m elements, 16 lanes at a time (the lanes do code_of's operations) */
Q_INLINE void group_codes(const float *buf, int m, float lo32, float inv, uint32_t k0,
                          float L, uint8_t *codes) {
    const q_vu iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const q_vf Lv = {L, L, L, L, L, L, L, L, L, L, L, L, L, L, L, L};
    int k = 0;
    for (; k + 16 <= m; k += 16) {
        q_vf x;
        memcpy(&x, buf + k, sizeof x);
        q_vf v = (x - lo32) * inv;
        q_vu h = iota + (k0 + (uint32_t)k);
        mix32_v(&h);
        q_vf u = __builtin_convertvector((q_vi)(h >> 8), q_vf) * 5.9604644775390625e-08f;
        q_vf t = v + u;
        t = (q_vf)((q_vi)t & (t > 0.0f));
        q_vi below = t < L;
        t = (q_vf)(((q_vi)t & below) | ((q_vi)Lv & ~below));
        q_vb c = __builtin_convertvector(__builtin_convertvector(t, q_vi), q_vb);
        memcpy(codes + k, &c, sizeof c);
    }
    for (; k < m; k++) codes[k] = code_of(buf[k], lo32, inv, k0 + (uint32_t)k, L);
}

#if Q_HAVE_512
/* group_range with AVX-512 min/max: _mm512_min_ps(v, mn) is v < mn ? v : mn per lane, as in
 * min_max_step, so the lanes and the result are those of group_range */
Q_T512 static inline int group_range512(const float *buf, int64_t m, float *mn_out,
                                        float *mx_out) {
    __m512 mn0 = _mm512_set1_ps(buf[0]), mx0 = mn0, mn1 = mn0, mx1 = mn0;
    __m512i nf0 = _mm512_setzero_si512(), nf1 = nf0;
    int64_t k = 0;
    for (; k + 32 <= m; k += 32) {
        __m512 a = _mm512_loadu_ps(buf + k), b = _mm512_loadu_ps(buf + k + 16);
        mn0 = _mm512_min_ps(a, mn0);
        mx0 = _mm512_max_ps(a, mx0);
        mn1 = _mm512_min_ps(b, mn1);
        mx1 = _mm512_max_ps(b, mx1);
        nf0 = _mm512_or_si512(nf0, _mm512_castps_si512(_mm512_sub_ps(a, a)));
        nf1 = _mm512_or_si512(nf1, _mm512_castps_si512(_mm512_sub_ps(b, b)));
    }
    for (; k + 16 <= m; k += 16) {
        __m512 a = _mm512_loadu_ps(buf + k);
        mn0 = _mm512_min_ps(a, mn0);
        mx0 = _mm512_max_ps(a, mx0);
        nf0 = _mm512_or_si512(nf0, _mm512_castps_si512(_mm512_sub_ps(a, a)));
    }
    /* as min_max_step(&mn1, ...) then min_max_step(&mx1, ...) */
    mn0 = _mm512_min_ps(mn1, mn0);
    mx0 = _mm512_max_ps(mn1, mx0);
    mn0 = _mm512_min_ps(mx1, mn0);
    mx0 = _mm512_max_ps(mx1, mx0);
    nf0 = _mm512_or_si512(nf0, nf1);
    float mnl[16], mxl[16];
    int32_t nfl[16];
    _mm512_storeu_ps(mnl, mn0);
    _mm512_storeu_ps(mxl, mx0);
    _mm512_storeu_si512(nfl, nf0);
    return range_finish(mnl, mxl, nfl, buf, k, m, mn_out, mx_out);
}

/* group_codes with AVX-512: max_ps(t, 0) is t > 0 ? t : 0 (NaN -> 0) and min_ps(t, L) is
 * t < L ? t : L, the clamps of code_of */
Q_T512 static inline void group_codes512(const float *buf, int m, float lo32, float inv,
                                         uint32_t k0, float L, uint8_t *codes) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 lo = _mm512_set1_ps(lo32), iv = _mm512_set1_ps(inv), Lv = _mm512_set1_ps(L);
    const __m512 zero = _mm512_setzero_ps(), step = _mm512_set1_ps(5.9604644775390625e-08f);
    const __m512i c1 = _mm512_set1_epi32(0x7feb352d), c2 = _mm512_set1_epi32((int)0x846ca68bu);
    __m512i idx = _mm512_add_epi32(iota, _mm512_set1_epi32((int)k0));
    const __m512i sixteen = _mm512_set1_epi32(16);
    int k = 0;
    for (; k + 16 <= m; k += 16) {
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf + k), lo), iv);
        __m512i h = idx;
        idx = _mm512_add_epi32(idx, sixteen);
        h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
        h = _mm512_mullo_epi32(h, c1);
        h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
        h = _mm512_mullo_epi32(h, c2);
        h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
        /* v + (h >> 8) * 2^-24 in one fused multiply-add: the product is exact (a 24-bit
         * integer times a power of two), so this is the rounded sum v + u of code_of */
        __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)), step, v);
        t = _mm512_min_ps(_mm512_max_ps(t, zero), Lv);
        _mm_storeu_si128((__m128i *)(codes + k), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(t)));
    }
    for (; k < m; k++) codes[k] = code_of(buf[k], lo32, inv, k0 + (uint32_t)k, L);
}
#endif

/* group inputs as float32: a copy into buf, or the input itself for float32 */
Q_INLINE const float *load_f32(const float *x, int64_t m, float *buf) {
    (void)m;
    (void)buf;
    return x;
}

Q_INLINE const float *load_bf16(const uint16_t *x, int64_t m, float *buf) {
    int64_t k = 0;
    for (; k + 16 <= m; k += 16) {
        q_vh h;
        memcpy(&h, x + k, sizeof h);
        q_vu w = __builtin_convertvector(h, q_vu) << 16;
        memcpy(buf + k, &w, sizeof w);
    }
    for (; k < m; k++) buf[k] = bf16_to_f32(x[k]);
    return buf;
}

Q_INLINE const float *load_f16(const uint16_t *x, int64_t m, float *buf) {
    for (int64_t k = 0; k < m; k++) buf[k] = f16_to_f32(x[k]);
    return buf;
}

Q_INLINE const float *load_f64(const double *x, int64_t m, float *buf) {
    for (int64_t k = 0; k < m; k++) buf[k] = (float)x[k];
    return buf;
}

/* lo/scale of a group from its range (NaN pair and zeros for a non-finite group) */
Q_INLINE void group_meta(int bad, float mn, float mx, float L, int lo_f16, uint16_t *lo_bits,
                         uint16_t *scale_bits, float *lo32, float *scale32) {
    const float margin = 1.0f + 9.5367431640625e-07f; /* 1 + 2^-20 */
    if (!bad) {
        *lo_bits = lo_f16 ? f32_to_f16(mn) : bf16_directed(mn, 0);
        *lo32 = lo_f16 ? f16_to_f32(*lo_bits) : bf16_to_f32(*lo_bits);
        float step = (mx / L - *lo32 / L) * margin;
        step = step > 0.0f && step < 0x1p-126f ? 0x1p-126f : step; /* 1 / scale finite */
        *scale_bits = bf16_directed(step, 1);
        *scale32 = bf16_to_f32(*scale_bits);
        bad = !(fabsf(*lo32) <= 3.4028234663852886e38f) ||
              !(fabsf(*scale32) <= 3.4028234663852886e38f);
    }
    if (bad) {
        *lo_bits = lo_f16 ? 0x7e00u : 0x7fc0u;
        *scale_bits = 0x7fc0u;
        *lo32 = 0.0f;
        *scale32 = 0.0f;
    }
}

/* ---- calls: groups [g0, g1), element e0 of group g = row * row_len + col * gs ----
 *
 * flags: bit 0 = lo is float16 (else bfloat16); bit 2 = quantize (and bfloat16 dequantize)
 * with the portable vector code even on AVX-512 machines (tests compare both); bit 1 = the
 * caller allows splitting the groups across OpenMP threads (torch's pool when the library is built with -fopenmp): it
 * sets it only when every group starts on a multiple of 8 elements (no two threads share a
 * packed byte). Each thread takes one contiguous run of groups; results do not depend on the
 * split. */
#define Q_LO_F16 1
#define Q_SPLIT 2
#define Q_PORTABLE 4 /* the vector-extension code even where AVX-512 (BF16) code is present */

#ifdef _OPENMP
#include <omp.h>
#define Q_FOR_RUNS(flags, g0, g1, CALL)                                                      \
    do {                                                                                     \
        if (!((flags) & Q_SPLIT) || omp_get_max_threads() == 1) {                            \
            int64_t a_ = (g0), b_ = (g1);                                                    \
            CALL;                                                                            \
            break;                                                                           \
        }                                                                                    \
        _Pragma("omp parallel") {                                                            \
            int64_t nt_ = omp_get_num_threads(), t_ = omp_get_thread_num();                  \
            int64_t step_ = ((g1) - (g0) + nt_ - 1) / nt_;                                   \
            int64_t a_ = (g0) + t_ * step_;                                                  \
            int64_t b_ = a_ + step_ < (g1) ? a_ + step_ : (g1);                              \
            if (a_ < b_) CALL;                                                               \
        }                                                                                    \
    } while (0)
#else
#define Q_FOR_RUNS(flags, g0, g1, CALL)                                                      \
    do {                                                                                     \
        (void)(flags);                                                                       \
        int64_t a_ = (g0), b_ = (g1);                                                        \
        CALL;                                                                                \
    } while (0)
#endif

/* first element of group g and its length (*len): rows of row_len elements, each cut into
 * gpr groups of gs (the last one of a row possibly shorter) */
static inline int64_t group_span(int64_t g, int64_t gpr, int64_t row_len, int64_t gs,
                                 int64_t *len) {
    int64_t r = g / gpr, c = g % gpr, rest = row_len - c * gs;
    *len = rest < gs ? rest : gs;
    return r * row_len + c * gs;
}

/* Software prefetch of the group Q_PREFETCH_GROUPS ahead, one cache line at a time: the
 * min/max pass otherwise waits on memory while the codes pass leaves the bus idle. */
#ifndef Q_PREFETCH_GROUPS
#define Q_PREFETCH_GROUPS 2
#endif
static inline void prefetch_bytes(const void *p, int64_t nbytes) {
    for (int64_t o = 0; o < nbytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 3);
}

/* the group loop of one run, with the given range and codes functions */
#define QUANT_GROUPS(T, LOADER, RANGE, CODES)                                                \
    int64_t gpr = (row_len + gs - 1) / gs;                                                   \
    const float L = (float)((1 << bits) - 1);                                                \
    float buf[QMAX_GROUP] __attribute__((aligned(64)));                                      \
    uint8_t codes[QMAX_GROUP] __attribute__((aligned(64)));                                  \
    for (int64_t g = g0; g < g1; g++) {                                                      \
        int64_t m, e0 = group_span(g, gpr, row_len, gs, &m);                                 \
        if (g + Q_PREFETCH_GROUPS < g1) {                                                    \
            int64_t pm, pe = group_span(g + Q_PREFETCH_GROUPS, gpr, row_len, gs, &pm);      \
            prefetch_bytes(x + pe, pm * (int64_t)sizeof(*x));                                \
        }                                                                                    \
        const float *v = LOADER(x + e0, m, buf);                                             \
        float mn, mx, lo32, scale32;                                                         \
        int bad = !RANGE(v, m, &mn, &mx);                                                    \
        group_meta(bad, mn, mx, L, lo_f16, &lo_out[g], &scale_out[g], &lo32, &scale32);     \
        float inv = 1.0f / (scale32 > 0.0f ? scale32 : 1.0f);                                \
        CODES(v, (int)m, lo32, inv, key + (uint32_t)e0, L, codes);                           \
        switch (bits) { /* constant bit width in each inlined copy */                        \
            case 1: pack_codes(codes, m, e0, 1, packed); break;                              \
            case 2: pack_codes(codes, m, e0, 2, packed); break;                              \
            case 4: pack_codes(codes, m, e0, 4, packed); break;                              \
            default: pack_codes(codes, m, e0, 8, packed); break;                             \
        }                                                                                    \
    }

#define QUANT_ARGS(T)                                                                        \
    const T *x, int64_t row_len, int64_t gs, int64_t g0, int64_t g1, uint32_t key, int bits, \
        int lo_f16, uint8_t *packed, uint16_t *lo_out, uint16_t *scale_out

#if Q_HAVE_512
#define QUANT_RUN512(NAME, T, LOADER)                                                        \
    Q_T512 static void NAME##_run512(QUANT_ARGS(T)) {                                        \
        QUANT_GROUPS(T, LOADER, group_range512, group_codes512)                              \
    }                                                                                        \
    typedef void (*NAME##_fn)(QUANT_ARGS(T));                                                \
    static NAME##_fn NAME##_pick(int flags) {                                                \
        int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && \
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");  \
        return avx512 && !(flags & Q_PORTABLE) ? NAME##_run512 : NAME##_run;                 \
    }
#else
#define QUANT_RUN512(NAME, T, LOADER)                                                        \
    typedef void (*NAME##_fn)(QUANT_ARGS(T));                                                \
    static NAME##_fn NAME##_pick(int flags) {                                                \
        (void)flags;                                                                         \
        return NAME##_run;                                                                   \
    }
#endif

#define QUANT_FN(NAME, T, LOADER)                                                            \
    Q_CLONES static void NAME##_run(QUANT_ARGS(T)) {                                         \
        QUANT_GROUPS(T, LOADER, group_range, group_codes)                                    \
    }                                                                                        \
    QUANT_RUN512(NAME, T, LOADER)                                                            \
    void NAME(const T *x, int64_t row_len, int64_t gs, int64_t g0, int64_t g1, uint32_t key, \
              int bits, int flags, uint8_t *packed, uint16_t *lo_out, uint16_t *scale_out) { \
        int lo_f16 = flags & Q_LO_F16;                                                       \
        NAME##_fn run = NAME##_pick(flags);                                                  \
        Q_FOR_RUNS(flags, g0, g1,                                                            \
                   run(x, row_len, gs, a_, b_, key, bits, lo_f16, packed, lo_out, scale_out)); \
    }

QUANT_FN(fewbit_quantize_f32, float, load_f32)
QUANT_FN(fewbit_quantize_f64, double, load_f64)
QUANT_FN(fewbit_quantize_bf16, uint16_t, load_bf16)
QUANT_FN(fewbit_quantize_f16, uint16_t, load_f16)

/* ---- unpacking ---- */

/* codes of 16 consecutive elements, the first at bit 0 of src (2 * bits bytes), in int32
 * lanes: the word holding lane i's code is broadcast into the lane, then shifted and masked */
Q_INLINE void codes16(const uint8_t *src, int bits, q_vi *out) {
    q_vu w = {0};
    memcpy(&w, src, (size_t)(2 * bits));
    const q_vu word8 = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
    const q_vu word4 = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
    const q_vu word2 = {0};
    const q_vu iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    q_vu v = __builtin_shuffle(w, bits == 8 ? word8 : bits == 4 ? word4 : word2);
    q_vu shift = (iota * (uint32_t)bits) & 31u;
    *out = (q_vi)((v >> shift) & ((1u << bits) - 1u));
}

/* lo + code * scale in float32 (the product is exact) for 16 elements from the stream */
Q_INLINE void dequant16(const uint8_t *src, int bits, float lo32, float s32, q_vf *out) {
    q_vi c;
    codes16(src, bits, &c);
    *out = lo32 + __builtin_convertvector(c, q_vf) * s32;
}

/* f32_to_bf16 in 16 lanes: round to nearest even, NaN -> 0xffff */
Q_INLINE void bf16_round16(const q_vf *v, uint16_t *dst) {
    q_vu u = (q_vu)*v;
    q_vi nan = (q_vi)(u & 0x7fffffffu) > 0x7f800000;
    q_vu r = ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) | (q_vu)nan;
    q_vh h = __builtin_convertvector(r, q_vh);
    memcpy(dst, &h, sizeof h);
}

/* out[0, m) of the group starting at element e0 of the stream; 16 lanes at a time when the
 * group starts on a byte (then every 16-element block does) */
#define STORE_GROUP(NAME, T, VEC_STORE, SCALAR)                                              \
    Q_INLINE void NAME(T *os, const uint8_t *packed, int64_t e0, int m, int bits,           \
                       float lo32, float s32) {                                              \
        int k = 0;                                                                           \
        if ((e0 * bits) % 8 == 0) {                                                          \
            for (; k + 16 <= m; k += 16) {                                                   \
                q_vf v;                                                                      \
                dequant16(packed + (e0 + k) * bits / 8, bits, lo32, s32, &v);                \
                VEC_STORE;                                                                   \
            }                                                                                \
        }                                                                                    \
        const unsigned mask = (1u << bits) - 1u;                                             \
        for (; k < m; k++) {                                                                 \
            int64_t at = (e0 + k) * bits;                                                    \
            float c = (float)((packed[at >> 3] >> (at & 7)) & mask);                         \
            os[k] = SCALAR(lo32 + c * s32);                                                  \
        }                                                                                    \
    }

STORE_GROUP(store_f32, float, memcpy(os + k, &v, sizeof v), ID)
STORE_GROUP(store_bf16, uint16_t, bf16_round16(&v, os + k), f32_to_bf16)

static inline double f32_to_f64(float v) { return (double)v; }

/* float16 and float64 outputs: the 16 lanes converted one at a time */
STORE_GROUP(store_f16, uint16_t, for (int t = 0; t < 16; t++) os[k + t] = f32_to_f16(v[t]),
            f32_to_f16)
STORE_GROUP(store_f64, double, for (int t = 0; t < 16; t++) os[k + t] = f32_to_f64(v[t]),
            f32_to_f64)

/* the group loop of a dequantize run over groups [g0, g1): out = lo + code * scale (float32,
 * the product exact), rounded to the output type by STORER */
#define DEQUANT_GROUPS(STORER)                                                               \
    int64_t gpr = (row_len + gs - 1) / gs;                                                   \
    for (int64_t g = g0; g < g1; g++) {                                                      \
        int64_t len, e0 = group_span(g, gpr, row_len, gs, &len);                             \
        int m = (int)len;                                                                    \
        float lo32 = lo_f16 ? f16_to_f32(lo[g]) : bf16_to_f32(lo[g]);                        \
        float s32 = bf16_to_f32(scale[g]);                                                   \
        switch (bits) { /* constant bit width in each inlined copy */                        \
            case 1: STORER(out + e0, packed, e0, m, 1, lo32, s32); break;                    \
            case 2: STORER(out + e0, packed, e0, m, 2, lo32, s32); break;                    \
            case 4: STORER(out + e0, packed, e0, m, 4, lo32, s32); break;                    \
            default: STORER(out + e0, packed, e0, m, 8, lo32, s32); break;                   \
        }                                                                                    \
    }

#define DEQUANT_ARGS(T)                                                                      \
    const uint8_t *packed, int64_t row_len, int64_t gs, int64_t g0, int64_t g1, int bits,    \
        const uint16_t *lo, int lo_f16, const uint16_t *scale, T *out

/* the exported call: groups [g0, g1), split across OpenMP threads when flags allow, with the
 * run function PICK(flags) returns */
#define DEQUANT_EXPORT(NAME, T, PICK)                                                        \
    void NAME(const uint8_t *packed, int64_t row_len, int64_t gs, int64_t g0, int64_t g1,    \
              int bits, const uint16_t *lo, int flags, const uint16_t *scale, T *out) {      \
        int lo_f16 = flags & Q_LO_F16;                                                       \
        void (*run)(DEQUANT_ARGS(T)) = PICK(flags);                                          \
        Q_FOR_RUNS(flags, g0, g1, run(packed, row_len, gs, a_, b_, bits, lo, lo_f16, scale, out)); \
    }

#define DEQUANT_FN(NAME, T, STORER)                                                          \
    Q_CLONES static void NAME##_run(DEQUANT_ARGS(T)) { DEQUANT_GROUPS(STORER) }              \
    typedef void (*NAME##_fn)(DEQUANT_ARGS(T));                                              \
    static NAME##_fn NAME##_pick(int flags) {                                                \
        (void)flags;                                                                         \
        return NAME##_run;                                                                   \
    }                                                                                        \
    DEQUANT_EXPORT(NAME, T, NAME##_pick)

DEQUANT_FN(fewbit_dequantize_f32, float, store_f32)
DEQUANT_FN(fewbit_dequantize_f64, double, store_f64)
DEQUANT_FN(fewbit_dequantize_f16, uint16_t, store_f16)

/* bfloat16 output: where the CPU has AVX512-BF16, groups whose values are all finite and
 * zero or normal round with its conversion instruction (round to nearest even, as
 * f32_to_bf16; it reads float32 subnormals as zero, so other groups keep the vector code).
 * A group qualifies when lo and scale are finite, each 0 or at least 2^-100 in magnitude:
 * lo + code * scale is then 0 or a multiple of an ulp of at least 2^-115, never subnormal. */
#if Q_HAVE_512 && defined(__GNUC__) && __GNUC__ >= 10
#define Q_TBF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

static inline int bf16_hw_group(float lo32, float s32) {
    float a = fabsf(lo32);
    return (a == 0.0f || (a >= 0x1p-100f && a <= 3.4028234663852886e38f)) &&
           (s32 == 0.0f || (s32 >= 0x1p-100f && s32 <= 3.4028234663852886e38f));
}

Q_TBF16 static inline void store_bf16_hw(uint16_t *os, const uint8_t *packed, int64_t e0, int m,
                                         int bits, float lo32, float s32) {
    if (!bf16_hw_group(lo32, s32) || (e0 * bits) % 8 != 0) {
        store_bf16(os, packed, e0, m, bits, lo32, s32);
        return;
    }
    int k = 0;
    for (; k + 16 <= m; k += 16) {
        q_vf v;
        dequant16(packed + (e0 + k) * bits / 8, bits, lo32, s32, &v);
        __m512 w;
        memcpy(&w, &v, sizeof w);
        __m256bh h = _mm512_cvtneps_pbh(w);
        memcpy(os + k, &h, sizeof h);
    }
    if (k < m) store_bf16(os + k, packed, e0 + k, m - k, bits, lo32, s32);
}

Q_TBF16 static void dequant_bf16_run_hw(DEQUANT_ARGS(uint16_t)) { DEQUANT_GROUPS(store_bf16_hw) }
#define Q_HAVE_BF16 1
#else
#define Q_HAVE_BF16 0
#endif

Q_CLONES static void dequant_bf16_run(DEQUANT_ARGS(uint16_t)) { DEQUANT_GROUPS(store_bf16) }

/* Q_PORTABLE in flags: the vector code even where AVX512-BF16 is present (tests) */
static void (*dequant_bf16_pick(int flags))(DEQUANT_ARGS(uint16_t)) {
#if Q_HAVE_BF16
    if (!(flags & Q_PORTABLE) && __builtin_cpu_supports("avx512bf16")) return dequant_bf16_run_hw;
#endif
    (void)flags;
    return dequant_bf16_run;
}

DEQUANT_EXPORT(fewbit_dequantize_bf16, uint16_t, dequant_bf16_pick)

/* Ask the kernel for transparent huge pages on the 2 MiB-aligned interior of a freshly
 * allocated buffer of nbytes (a hint: contents and semantics are unchanged). Writing a fresh
 * 64 MiB buffer otherwise takes 16384 page faults, which cost more than the codec itself. */
void fewbit_advise_hugepages(void *p, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t b = ((uintptr_t)p + (uintptr_t)nbytes) & ~(huge - 1);
    if (nbytes > 0 && b > a) (void)madvise((void *)a, b - a, MADV_HUGEPAGE);
#else
    (void)p;
    (void)nbytes;
#endif
}
