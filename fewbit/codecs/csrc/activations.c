/* fewbit CPU codecs: one pass per direction for the few-bit activations.
 *
 * Plain C (no torch headers), compiled at first use by fewbit/codecs/native.py and called
 * through ctypes on contiguous tensors' data pointers.
 *
 * Encode: code = number of boundaries strictly below x (or |x|), NaN -> nan_code, packed in
 * fewbit's bit stream layout (code i at stream bits [i*b, (i+1)*b), little-endian bytes), and
 * per scan chunk the count of non-finite elements. Floats are compared through order keys
 * of their bit patterns (exact for every non-NaN value, +0 == -0), so no conversion to a
 * wider float is needed; the boundaries' keys come from the same dtype.
 *
 * Decode: out = round_to_dtype((float)grad * lut[code]) (double for float64), exact +0 where
 * zero_exact and the level is 0. bf16/fp16 are rounded to nearest even as torch does (NaN:
 * bf16 0xFFFF as torch's vectorized CPU conversion, fp16 sign | 0x7E00).
 *
 * Both directions work on blocks of BLOCK elements through small L1 buffers, in loops the
 * compiler vectorizes (SSE2 baseline; AVX2 and AVX-512 clones picked at load time, see
 * FB_CLONES_512 in float_bits.h): a key/compare loop with the boundary count fixed at compile
 * time, then SWAR (bit-field arithmetic on 64-bit words, 8 codes per word) between one code
 * per byte and b bits per code, then one scalar 8-byte copy per 8 codes.
 */
#include "float_bits.h"

#define BLOCK 512 /* elements per inner block: a multiple of 8 */

/* Run the body (the variadic arguments) over `units` work units split into contiguous ranges [LO, HI), one per thread of
 * an OpenMP team of min(threads, units) threads (torch's own OpenMP runtime: the library
 * links the libgomp that torch has loaded); in the calling thread alone without OpenMP or
 * with threads <= 1. Ranges write disjoint outputs, so results do not depend on the split. */
#ifdef _OPENMP
#include <omp.h>
#define FB_PARALLEL(threads, units, LO, HI, ...)                                             \
    do {                                                                                      \
        int64_t units_ = (units);                                                             \
        int team_ = (threads) < units_ ? (threads) : (int)units_;                             \
        if (team_ > 1) {                                                                      \
            _Pragma("omp parallel num_threads(team_)")                                        \
            {                                                                                 \
                int64_t t_ = omp_get_thread_num(), k_ = omp_get_num_threads();               \
                int64_t LO = units_ * t_ / k_, HI = units_ * (t_ + 1) / k_;                   \
                __VA_ARGS__;                                                                  \
            }                                                                                 \
        } else if (units_ > 0) {                                                              \
            int64_t LO = 0, HI = units_;                                                      \
            __VA_ARGS__;                                                                      \
        }                                                                                     \
    } while (0)
#else
#define FB_PARALLEL(threads, units, LO, HI, ...)                                             \
    do {                                                                                      \
        (void)(threads);                                                                      \
        int64_t LO = 0, HI = (units);                                                         \
        if (HI > 0) __VA_ARGS__;                                                              \
    } while (0)
#endif

/* ---- SWAR: 8 codes, one per byte of a 64-bit word <-> 8 b-bit fields (b constant) ---- */

/* byte k of w (values < 2^b) -> bits [k*b, (k+1)*b) of the result */
static inline uint64_t swar_pack8(uint64_t w, int b) {
    const uint64_t m8 = 0x00ff00ff00ff00ffull, m16 = 0x0000ffff0000ffffull;
    w = (w & m8) | ((w >> 8) & m8) << b;          /* 16-bit fields of 2b bits */
    w = (w & m16) | ((w >> 16) & m16) << (2 * b); /* 32-bit fields of 4b bits */
    return (w & 0xffffffffull) | (w >> 32) << (4 * b);
}

/* inverse: bits [k*b, (k+1)*b) of w -> byte k (bits of w above 8b are ignored) */
static inline uint64_t swar_unpack8(uint64_t w, int b) {
    const uint64_t f4 = (1ull << (4 * b)) - 1u;
    const uint64_t f2 = ((1ull << (2 * b)) - 1u) * 0x0000000100000001ull;
    const uint64_t f1 = ((1ull << b) - 1u) * 0x0001000100010001ull;
    w = (w & f4) | ((w >> (4 * b)) & f4) << 32;
    w = (w & f2) | ((w >> (2 * b)) & f2) << 16;
    return (w & f1) | ((w >> b) & f1) << 8;
}

/* Pack m codes (bytes, values < 2^b; m a multiple of 8 except possibly at the very end,
 * where codes[m..] up to the next multiple of 8 must be 0) into out; limit is the number of
 * bytes from out that this call may write. */
static inline void pack_codes(const uint8_t *codes, int m, int b, uint8_t *out, int64_t limit) {
    uint64_t words[BLOCK / 8];
    int groups = (m + 7) / 8;
    if (b == 8) {
        memcpy(out, codes, (size_t)m);
        return;
    }
    for (int g = 0; g < groups; g++) { /* vectorized: 64-bit lanes */
        uint64_t w;
        memcpy(&w, codes + 8 * g, 8);
        words[g] = swar_pack8(w, b);
    }
    int g = 0;
    /* 8-byte stores overlap the next group's bytes, which its own store rewrites */
    for (; g < groups && (int64_t)g * b + 8 <= limit; g++) memcpy(out + g * b, &words[g], 8);
    for (; g < groups; g++) {
        int64_t left = limit - (int64_t)g * b;
        memcpy(out + g * b, &words[g], (size_t)(left < b ? left : b));
    }
}

/* codes of elements [e, e + m) (e a multiple of 8) of the stream `packed` of total_bytes
 * bytes: one byte per code in codes[0 .. round_up(m, 8)) */
static inline void unpack_codes(const uint8_t *packed, int64_t total_bytes, int64_t e, int m,
                                int b, uint8_t *codes) {
    uint64_t words[BLOCK / 8];
    int groups = (m + 7) / 8;
    const uint8_t *in = packed + e / 8 * b;
    int64_t limit = total_bytes - e / 8 * b;
    if (b == 8) {
        memcpy(codes, in, (size_t)m);
        return;
    }
    int g = 0;
    for (; g < groups && (int64_t)g * b + 8 <= limit; g++) memcpy(&words[g], in + g * b, 8);
    for (; g < groups; g++) {
        int64_t left = limit - (int64_t)g * b;
        words[g] = 0;
        memcpy(&words[g], in + g * b, (size_t)(left < b ? left : b));
    }
    for (g = 0; g < groups; g++) { /* vectorized: 64-bit lanes */
        uint64_t w = swar_unpack8(words[g], b);
        memcpy(codes + 8 * g, &w, 8);
    }
}

/* ---- encode ---- */

/* Order key of a float's bit pattern u: the pattern as a signed int, negative patterns with
 * their magnitude bits flipped (x < y <=> key(x) < key(y) for all non-NaN x, y except that
 * -0 sits one below +0: boundary keys are taken of +0 for a zero boundary, so "key(x) >
 * key(b)" is "x > b" exactly). signmask: all ones, or the magnitude bits (keys of |x|). */
#define KEY(KV, KT, u, signmask, SIGNSHIFT, MAGMASK)                                          \
    ((KV)((u) & (signmask)) ^ (((KV)((u) & (signmask)) >> SIGNSHIFT) & (KT)(MAGMASK)))

/* Codes of m elements into codes[]: the key of each element (NaN -> nan_key, which sits
 * below or above every boundary) compared with NB boundary keys held in registers (NB a
 * compile-time constant; the table padded with keys no element exceeds). A plain loop that
 * the compiler vectorizes for every instruction set (including the narrowing to bytes).
 * Returns the number of non-finite elements. */
#define CODES_FN(NAME, UT, KT, SIGNSHIFT, MAGMASK, NB)                                        \
    static inline KT NAME(const UT *xs, int m, UT inf_bits, UT signmask, const KT *bk,        \
                          KT nan_key, uint8_t *codes) {                                      \
        KT wide[BLOCK]; /* codes at the key's width: narrowed in a second loop, else GCC */   \
        KT nbad = 0;    /* narrows every compare to bytes separately */                     \
        for (int i = 0; i < m; i++) {                                                         \
            UT u = xs[i];                                                                     \
            KT mag = (KT)(u & (UT)MAGMASK);                                                   \
            KT key = mag > (KT)inf_bits ? nan_key : KEY(KT, KT, u, signmask, SIGNSHIFT, MAGMASK); \
            KT c = 0;                                                                         \
            for (int j = 0; j < NB; j++) c = (KT)(c + (KT)(key > bk[j]));                     \
            nbad = (KT)(nbad + (KT)(mag >= (KT)inf_bits));                                    \
            wide[i] = c;                                                                      \
        }                                                                                     \
        for (int i = 0; i < m; i++) codes[i] = (uint8_t)wide[i];                              \
        return nbad;                                                                          \
    }

/* Codes for any boundary count (up to 255): one comparison sweep per boundary. */
#define CODES_ANY_FN(NAME, UT, KT, SIGNSHIFT, MAGMASK)                                        \
    static inline KT NAME(const UT *xs, int m, UT inf_bits, UT signmask, const KT *bk,        \
                          int nb, KT nan_key, uint8_t *codes) {                              \
        KT keys[BLOCK], acc[BLOCK];                                                           \
        KT nbad = 0;                                                                          \
        for (int i = 0; i < m; i++) {                                                         \
            UT u = xs[i];                                                                     \
            KT mag = (KT)(u & (UT)MAGMASK);                                                   \
            nbad += mag >= (KT)inf_bits;                                                      \
            keys[i] = mag > (KT)inf_bits ? nan_key : KEY(KT, KT, u, signmask, SIGNSHIFT, MAGMASK); \
            acc[i] = 0;                                                                       \
        }                                                                                     \
        for (int j = 0; j < nb; j++) {                                                        \
            KT b = bk[j];                                                                     \
            for (int i = 0; i < m; i++) acc[i] += keys[i] > b;                                \
        }                                                                                     \
        for (int i = 0; i < m; i++) codes[i] = (uint8_t)acc[i];                               \
        return nbad;                                                                          \
    }

/* Encode + pack the scan chunks [c_lo, c_hi) of the n elements of x into the whole stream
 * `out` (writing only those chunks' bytes: chunk is a multiple of 8, so chunks start on byte
 * boundaries) and store each chunk's count of non-finite elements in counts[c]. nb <= 15
 * boundaries are compared in registers (padded to 1, 3, 7 or 15), more in sweeps. */
#define ENCODE_FN(NAME, UT, KT, SIGNSHIFT, MAGMASK)                                          \
    CODES_FN(NAME##_c1, UT, KT, SIGNSHIFT, MAGMASK, 1)                                        \
    CODES_FN(NAME##_c3, UT, KT, SIGNSHIFT, MAGMASK, 3)                                        \
    CODES_FN(NAME##_c7, UT, KT, SIGNSHIFT, MAGMASK, 7)                                        \
    CODES_FN(NAME##_c15, UT, KT, SIGNSHIFT, MAGMASK, 15)                                      \
    CODES_ANY_FN(NAME##_cany, UT, KT, SIGNSHIFT, MAGMASK)                                     \
    FB_CLONES_512 static void NAME##_range(const UT *x, int64_t n, UT inf_bits, int symmetric, \
                                           const KT *bkeys, int nb, int nan_code, int bits,   \
                                           uint8_t *out, int64_t chunk, int64_t *counts,      \
                                           int64_t c_lo, int64_t c_hi) {                      \
        uint8_t codes[BLOCK];                                                                 \
        KT bk[15];                                                                            \
        /* below every boundary key (> -MAGMASK - 1) or above every one (< MAGMASK) */      \
        KT nan_key = nan_code ? (KT)MAGMASK : (KT)(-(KT)MAGMASK - 1);                         \
        UT signmask = symmetric ? (UT)MAGMASK : (UT)~(UT)0;                                   \
        int padded = nb <= 1 ? 1 : nb <= 3 ? 3 : nb <= 7 ? 7 : nb <= 15 ? 15 : nb;            \
        for (int j = 0; j < 15; j++) bk[j] = j < nb ? bkeys[j] : (KT)MAGMASK;                 \
        int64_t e_hi = c_hi * chunk < n ? c_hi * chunk : n;                                   \
        int64_t limit = (e_hi * bits + 7) / 8; /* end of this range's bytes */               \
        for (int64_t c = c_lo; c < c_hi; c++) {                                               \
            int64_t c0 = c * chunk, c1 = c0 + chunk < n ? c0 + chunk : n;                     \
            int64_t bad = 0;                                                                  \
            for (int64_t s = c0; s < c1; s += BLOCK) {                                        \
                int m = (int)(c1 - s < BLOCK ? c1 - s : BLOCK);                               \
                const UT *xs = x + s;                                                         \
                switch (padded) {                                                             \
                    case 1: bad += NAME##_c1(xs, m, inf_bits, signmask, bk, nan_key, codes); break; \
                    case 3: bad += NAME##_c3(xs, m, inf_bits, signmask, bk, nan_key, codes); break; \
                    case 7: bad += NAME##_c7(xs, m, inf_bits, signmask, bk, nan_key, codes); break; \
                    case 15: bad += NAME##_c15(xs, m, inf_bits, signmask, bk, nan_key, codes); break; \
                    default:                                                                  \
                        bad += NAME##_cany(xs, m, inf_bits, signmask, bkeys, nb, nan_key, codes); \
                }                                                                             \
                for (int i = m; i < BLOCK && (i & 7); i++) codes[i] = 0; /* stream padding */ \
                int64_t off = s * bits / 8; /* s is a multiple of 8 */                        \
                switch (bits) {                                                               \
                    ENCODE_BLOCK_CASE(1)                                                      \
                    ENCODE_BLOCK_CASE(2)                                                      \
                    ENCODE_BLOCK_CASE(3)                                                      \
                    ENCODE_BLOCK_CASE(4)                                                      \
                    ENCODE_BLOCK_CASE(5)                                                      \
                    ENCODE_BLOCK_CASE(6)                                                      \
                    ENCODE_BLOCK_CASE(7)                                                      \
                    ENCODE_BLOCK_CASE(8)                                                      \
                    default: break;                                                           \
                }                                                                             \
            }                                                                                 \
            counts[c] = bad;                                                                  \
        }                                                                                     \
    }                                                                                         \
    int64_t NAME(const UT *x, int64_t n, UT inf_bits, int symmetric, const KT *bkeys, int nb, \
                 int nan_code, int bits, uint8_t *out, int64_t chunk, int64_t *counts,        \
                 int threads) {                                                               \
        int64_t chunks = (n + chunk - 1) / chunk;                                             \
        FB_PARALLEL(threads, chunks, lo, hi,                                                  \
                    NAME##_range(x, n, inf_bits, symmetric, bkeys, nb, nan_code, bits, out,  \
                                 chunk, counts, lo, hi));                                     \
        int64_t total = 0;                                                                    \
        for (int64_t c = 0; c < chunks; c++) total += counts[c];                              \
        return total;                                                                         \
    }

#define ENCODE_BLOCK_CASE(B)                                                                  \
    case B:                                                                                   \
        pack_codes(codes, m, B, out + off, limit - off);                                      \
        break;

ENCODE_FN(fewbit_encode_pack_16, uint16_t, int16_t, 15, 0x7fffu)
ENCODE_FN(fewbit_encode_pack_32, uint32_t, int32_t, 31, 0x7fffffffu)
ENCODE_FN(fewbit_encode_pack_64, uint64_t, int64_t, 63, 0x7fffffffffffffffull)

/* ---- decode: unpack + lookup + multiply ---- */

/* Scalar form (every dtype and level count): out[i] = STORE(LOAD(grad[i]) * table[codes[i]]),
 * +0 where zero_exact and the level is +-0 (whatever the gradient: torch's piecewise-linear
 * backward selects 0): the product's bits are ANDed with a mask from the level's bits. */
#define MUL_FN(NAME, GT, CT, UC, LOAD, STORE)                                                \
    static inline void NAME(const GT *grad, GT *out, const uint8_t *codes, int i0, int m,    \
                            const CT *table, int zero_exact) {                               \
        const UC magmask = (UC)~(UC)0 >> 1;                                                   \
        const UC any = zero_exact ? 0 : (UC)1; /* zero_exact off: every product kept */      \
        for (int i = i0; i < m; i++) {                                                        \
            CT lv = table[codes[i]];                                                          \
            CT v = (CT)LOAD(grad[i]) * lv;                                                    \
            UC lb, r;                                                                         \
            memcpy(&lb, &lv, sizeof lb);                                                      \
            memcpy(&r, &v, sizeof r);                                                         \
            r &= (UC)0 - (UC)(((lb & magmask) | any) != 0);                                   \
            memcpy(&v, &r, sizeof v);                                                         \
            out[i] = STORE(v);                                                                \
        }                                                                                     \
    }

/* Vector form for float32 arithmetic (float32, bfloat16, float16 gradients) and up to 16
 * levels: 8 elements per step in GCC/Clang vector types (one AVX2 register; two SSE2
 * registers in the baseline clone). The level is picked by a variable permute of the level
 * table (GCC: vpermps / vpermt2ps), the conversions are the branch-free forms of
 * float_bits.h's (same results, tested on every 16-bit pattern). */
typedef float fb_f8 __attribute__((vector_size(32)));
typedef uint32_t fb_u8 __attribute__((vector_size(32)));
typedef int32_t fb_i8 __attribute__((vector_size(32)));
typedef uint16_t fb_h8 __attribute__((vector_size(16)));
typedef uint8_t fb_b8 __attribute__((vector_size(8)));

static inline fb_u8 vsel(fb_i8 mask, fb_u8 a, fb_u8 b) {
    return (a & (fb_u8)mask) | (b & ~(fb_u8)mask);
}

/* levels of the 8 codes of one group, the group's bits (b <= 4: at most 32) in w: each lane
 * shifts its own code down (vpsrlvd) and picks its level from the table (lo: levels 0-7, hi:
 * levels 8-15) */
static inline fb_f8 levels8(uint32_t w, int b, fb_f8 lo, fb_f8 hi) {
    const fb_u8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    fb_u8 wv = lane - lane + w;
    fb_u8 idx = (wv >> (lane * (uint32_t)b)) & ((1u << b) - 1u);
#if defined(__GNUC__) && !defined(__clang__)
    return b <= 3 ? __builtin_shuffle(lo, (fb_i8)idx) : __builtin_shuffle(lo, hi, (fb_i8)idx);
#else
    fb_f8 r;
    for (int k = 0; k < 8; k++) r[k] = idx[k] < 8 ? lo[idx[k] & 7] : hi[idx[k] & 7];
    return r;
#endif
}

static inline fb_f8 load8_f32(const float *p) {
    fb_f8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8_f32(float *p, fb_f8 v) { memcpy(p, &v, sizeof v); }

static inline fb_f8 load8_bf16(const uint16_t *p) {
    fb_h8 h;
    memcpy(&h, p, sizeof h);
    return (fb_f8)(__builtin_convertvector(h, fb_u8) << 16);
}

/* f32_to_bf16 on 8 lanes: round to nearest even, NaN -> 0xFFFF */
static inline void store8_bf16(uint16_t *p, fb_f8 v) {
    fb_u8 u = (fb_u8)v;
    fb_u8 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    fb_i8 nan = (u & 0x7fffffffu) > 0x7f800000u;
    r = vsel(nan, r - r + 0xffffu, r);
    fb_h8 h = __builtin_convertvector(r, fb_h8);
    memcpy(p, &h, sizeof h);
}

/* f16_to_f32 on 8 lanes (exact): normal and inf/NaN by exponent re-biasing, subnormals as
 * (2^-14 + m * 2^-24) - 2^-14 in float32 (exact) */
static inline fb_f8 load8_f16(const uint16_t *p) {
    fb_h8 h;
    memcpy(&h, p, sizeof h);
    fb_u8 u = __builtin_convertvector(h, fb_u8);
    fb_u8 sign = (u & 0x8000u) << 16;
    fb_u8 em = u & 0x7fffu;
    fb_u8 normal = (em << 13) + 0x38000000u;                      /* exponent + (127 - 15) */
    normal = vsel(em >= 0x7c00u, normal + 0x38000000u, normal);    /* inf/NaN: exponent 255 */
    fb_f8 sub = (fb_f8)((em << 13) + 0x38800000u) - 6.103515625e-05f; /* minus 2^-14 */
    fb_u8 mag = vsel(em < 0x0400u, (fb_u8)sub, normal);
    return (fb_f8)(sign | mag);
}

/* f32_to_f16 on 8 lanes: round to nearest even (subnormal halves through a float32 add of
 * 0.5, whose unit in the last place is the half's 2^-24), >= 65520 -> inf, NaN -> 0x7E00,
 * the sign kept */
static inline void store8_f16(uint16_t *p, fb_f8 v) {
    fb_u8 u = (fb_u8)v;
    fb_u8 sign = (u >> 16) & 0x8000u;
    fb_u8 mag = u & 0x7fffffffu;
    fb_u8 base = mag - 0x38000000u;
    fb_u8 normal = (base + 0xfffu + ((base >> 13) & 1u)) >> 13;
    fb_f8 half = (fb_f8)mag + 0.5f;
    fb_u8 sub = (fb_u8)half - 0x3f000000u;
    fb_u8 r = vsel(mag < 0x38800000u, sub, normal);
    r = vsel(mag >= 0x477ff000u, r - r + 0x7c00u, r);
    r = vsel(mag > 0x7f800000u, r - r + 0x7e00u, r);
    fb_h8 h = __builtin_convertvector(sign | r, fb_h8);
    memcpy(p, &h, sizeof h);
}

/* out = STORE8(LOAD8(grad) * level) for elements [start, stop) of the stream (b <= 4 bits
 * per code), group by group while a 4-byte load of the group stays inside the stream;
 * returns the first element not written (the scalar form does the rest). grad and out
 * point at element start. */
#define VMUL_FN(NAME, GT, LOAD8, STORE8)                                                     \
    static inline int64_t NAME(const uint8_t *packed, int64_t total_bytes, int b,            \
                               const GT *grad, GT *out, int64_t start, int64_t stop,         \
                               const float *table, int zero_exact) {                         \
        fb_f8 lo, hi;                                                                         \
        memcpy(&lo, table, sizeof lo);                                                        \
        memcpy(&hi, table + 8, sizeof hi);                                                    \
        fb_u8 keep_all = (fb_u8)(fb_i8){0} - (zero_exact ? 0u : 1u); /* all ones: no zeroing */ \
        int64_t e = start;                                                                    \
        for (; e + 8 <= stop && e / 8 * b + 4 <= total_bytes; e += 8) {                       \
            uint32_t w;                                                                       \
            memcpy(&w, packed + e / 8 * b, sizeof w);                                         \
            fb_f8 lv = levels8(w, b, lo, hi);                                                 \
            fb_f8 v = LOAD8(grad + (e - start)) * lv;                                         \
            fb_u8 keep = (fb_u8)(((fb_u8)lv & 0x7fffffffu) != 0u) | keep_all;                 \
            STORE8(out + (e - start), (fb_f8)((fb_u8)v & keep));                              \
        }                                                                                     \
        return e;                                                                             \
    }

VMUL_FN(vmul_f32, float, load8_f32, store8_f32)
VMUL_FN(vmul_bf16, uint16_t, load8_bf16, store8_bf16)
VMUL_FN(vmul_f16, uint16_t, load8_f16, store8_f16)

static inline int64_t vmul_none(const uint8_t *packed, int64_t total_bytes, int b,
                                const double *grad, double *out, int64_t start, int64_t stop,
                                const double *table, int zero_exact) {
    (void)packed, (void)total_bytes, (void)b, (void)grad, (void)out, (void)stop, (void)table;
    (void)zero_exact;
    return start;
}

/* Whether the vector decoder's permute is a single instruction here: on x86 only with AVX2
 * (SSE2 has no variable permute: the scalar form, one table load per element, is faster). */
static inline int vector_lookup_fast(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx2");
#else
    return 1;
#endif
}

#define DECODE_BLOCK_CASE(B)                                                                  \
    case B:                                                                                   \
        unpack_codes(packed, total_bytes, s, m, B, codes);                                    \
        break;

/* Elements [start, stop) of the stream `packed` of n codes (start a multiple of 8); grad and
 * out point at element `start`. */
#define DECODE_FN(NAME, GT, CT, UC, LOAD, STORE, VMUL)                                       \
    MUL_FN(NAME##_mul, GT, CT, UC, LOAD, STORE)                                               \
    FB_CLONES_512 static void NAME##_range(const uint8_t *packed, int64_t n, int bits,        \
                                           const GT *grad, GT *out, int64_t start,            \
                                           int64_t stop, const CT *lut, int zero_exact) {     \
        int64_t total_bytes = (n * bits + 7) / 8;                                             \
        uint8_t codes[BLOCK];                                                                 \
        CT table[256];                                                                        \
        for (int c = 0; c < 256; c++) table[c] = c < (1 << bits) ? lut[c] : (CT)0;           \
        int64_t first = start;                                                                \
        if (bits <= 4 && vector_lookup_fast())                                                \
            first = VMUL(packed, total_bytes, bits, grad, out, start, stop, table, zero_exact); \
        for (int64_t s = first; s < stop; s += BLOCK) {                                       \
            int m = (int)(stop - s < BLOCK ? stop - s : BLOCK);                               \
            switch (bits) {                                                                   \
                DECODE_BLOCK_CASE(1)                                                          \
                DECODE_BLOCK_CASE(2)                                                          \
                DECODE_BLOCK_CASE(3)                                                          \
                DECODE_BLOCK_CASE(4)                                                          \
                DECODE_BLOCK_CASE(5)                                                          \
                DECODE_BLOCK_CASE(6)                                                          \
                DECODE_BLOCK_CASE(7)                                                          \
                DECODE_BLOCK_CASE(8)                                                          \
                default: return;                                                              \
            }                                                                                 \
            NAME##_mul(grad + (s - start), out + (s - start), codes, 0, m, table, zero_exact); \
        }                                                                                     \
    }                                                                                         \
    void NAME(const uint8_t *packed, int64_t n, int bits, const GT *grad, GT *out,            \
              int64_t start, int64_t stop, const CT *lut, int zero_exact, int threads) {      \
        int64_t groups = (stop - start + 7) / 8; /* split on group boundaries */             \
        FB_PARALLEL(threads, groups, lo, hi, {                                                \
            int64_t e0 = start + 8 * lo, e1 = start + 8 * hi < stop ? start + 8 * hi : stop;  \
            NAME##_range(packed, n, bits, grad + (e0 - start), out + (e0 - start), e0, e1,    \
                         lut, zero_exact);                                                    \
        });                                                                                   \
    }

DECODE_FN(fewbit_decode_mul_f32, float, float, uint32_t, ID, ID, vmul_f32)
DECODE_FN(fewbit_decode_mul_f64, double, double, uint64_t, ID, ID, vmul_none)
DECODE_FN(fewbit_decode_mul_bf16, uint16_t, float, uint32_t, bf16_to_f32, f32_to_bf16, vmul_bf16)
DECODE_FN(fewbit_decode_mul_f16, uint16_t, float, uint32_t, f16_to_f32, f32_to_f16, vmul_f16)

/* ---- 1-bit masks computed by torch: pack + non-finite counts ---- */

/* Pack n bytes (0 or 1) into ceil(n/8) bytes of the 1-bit stream. */
void fewbit_pack_mask(const uint8_t *mask, int64_t n, uint8_t *out) {
    uint8_t codes[BLOCK];
    int64_t total_bytes = (n + 7) / 8;
    for (int64_t s = 0; s < n; s += BLOCK) {
        int m = (int)(n - s < BLOCK ? n - s : BLOCK);
        for (int i = 0; i < m; i++) codes[i] = mask[s + i] & 1;
        for (int i = m; i < BLOCK && (i & 7); i++) codes[i] = 0;
        pack_codes(codes, m, 1, out + s / 8, total_bytes - s / 8);
    }
}

/* counts[c] = non-finite elements of chunk c (chunks of `chunk` elements); returns the sum. */
#define COUNT_FN(NAME, UT, MAGMASK)                                                          \
    FB_CLONES_512 static void NAME##_range(const UT *x, int64_t n, UT inf_bits, int64_t chunk, \
                                           int64_t *counts, int64_t c_lo, int64_t c_hi) {     \
        for (int64_t c = c_lo; c < c_hi; c++) {                                               \
            int64_t c0 = c * chunk, c1 = c0 + chunk < n ? c0 + chunk : n;                     \
            int64_t bad = 0;                                                                  \
            for (int64_t i = c0; i < c1; i++) bad += (x[i] & (UT)MAGMASK) >= inf_bits;        \
            counts[c] = bad;                                                                  \
        }                                                                                     \
    }                                                                                         \
    int64_t NAME(const UT *x, int64_t n, UT inf_bits, int64_t chunk, int64_t *counts,         \
                 int threads) {                                                               \
        int64_t chunks = (n + chunk - 1) / chunk;                                             \
        FB_PARALLEL(threads, chunks, lo, hi, NAME##_range(x, n, inf_bits, chunk, counts, lo, hi)); \
        int64_t total = 0;                                                                    \
        for (int64_t c = 0; c < chunks; c++) total += counts[c];                              \
        return total;                                                                         \
    }

COUNT_FN(fewbit_count_nonfinite_16, uint16_t, 0x7fffu)
COUNT_FN(fewbit_count_nonfinite_32, uint32_t, 0x7fffffffu)
COUNT_FN(fewbit_count_nonfinite_64, uint64_t, 0x7fffffffffffffffull)
