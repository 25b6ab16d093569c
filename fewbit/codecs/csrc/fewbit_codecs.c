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
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#define BLOCK 512 /* elements per inner block: a multiple of 8 */

/* ---- packing helpers: b is a compile-time constant at every inlined call site ---- */

static inline void put_group(uint8_t *out, const uint8_t *codes, int b, int64_t nbytes) {
    uint64_t acc = 0;
    for (int k = 0; k < 8; k++) acc |= (uint64_t)codes[k] << (k * b);
    if (nbytes >= b) {
        memcpy(out, &acc, (size_t)b);
    } else {
        memcpy(out, &acc, (size_t)nbytes);
    }
}

static inline uint64_t get_group(const uint8_t *in, int b, int64_t nbytes) {
    uint64_t acc = 0;
    if (nbytes >= b) {
        memcpy(&acc, in, (size_t)b);
    } else {
        memcpy(&acc, in, (size_t)nbytes);
    }
    return acc;
}

#define PACK_CASE(B)                                                                  \
    case B:                                                                           \
        for (int64_t g = 0; g < groups; g++) {                                        \
            int64_t left = nbytes - g * B;                                            \
            put_group(out + g * B, codes + 8 * g, B, left);                           \
        }                                                                             \
        break;

/* pack m codes (m a multiple of 8 except possibly at the very end) into out; nbytes is the
 * number of bytes from out to the end of the stream (a bound for the last group). */
static void pack_block(const uint8_t *codes, int64_t m, int bits, uint8_t *out, int64_t nbytes) {
    int64_t groups = (m + 7) / 8;
    switch (bits) {
        PACK_CASE(1)
        PACK_CASE(2)
        PACK_CASE(3)
        PACK_CASE(4)
        PACK_CASE(5)
        PACK_CASE(6)
        PACK_CASE(7)
        case 8:
            memcpy(out, codes, (size_t)m);
            break;
        default:
            break;
    }
}

/* ---- encode ---- */

/* Codes of m elements: keys first (NaN -> nan_key, which sits below or above every
 * boundary), then one vectorizable comparison sweep per boundary. Returns the number of
 * non-finite elements. */
#define ENCODE_FN(NAME, UT, KT, SIGNSHIFT, MAGMASK)                                         \
    int64_t NAME(const UT *x, int64_t n, UT inf_bits, int symmetric, const KT *bkeys, int nb,  \
                 int nan_code, int bits, uint8_t *out, int64_t chunk, int64_t *counts) {       \
        KT keys[BLOCK];                                                                        \
        KT codes[BLOCK];                                                                       \
        uint8_t small[BLOCK];                                                                  \
        /* below every boundary key (> -MAGMASK - 1) or above every one (< MAGMASK) */       \
        KT nan_key = nan_code ? (KT)MAGMASK : (KT)(-(KT)MAGMASK - 1);                          \
        int64_t total_bytes = (n * bits + 7) / 8;                                              \
        int64_t bad_total = 0;                                                                 \
        for (int64_t c0 = 0; c0 < n; c0 += chunk) {                                            \
            int64_t c1 = c0 + chunk < n ? c0 + chunk : n;                                      \
            int64_t bad = 0;                                                                   \
            for (int64_t s = c0; s < c1; s += BLOCK) {                                         \
                int m = (int)(c1 - s < BLOCK ? c1 - s : BLOCK);                                \
                const UT *xs = x + s;                                                          \
                KT nbad = 0;                                                                   \
                if (symmetric) {                                                               \
                    for (int i = 0; i < m; i++) {                                              \
                        UT mag = xs[i] & (UT)MAGMASK;                                          \
                        nbad += mag >= inf_bits;                                               \
                        keys[i] = mag > inf_bits ? nan_key : (KT)mag;                          \
                    }                                                                          \
                } else {                                                                       \
                    for (int i = 0; i < m; i++) {                                              \
                        UT u = xs[i];                                                          \
                        UT mag = u & (UT)MAGMASK;                                              \
                        KT neg = (KT)(u >> SIGNSHIFT); /* 0 or 1 */                            \
                        KT key = ((KT)mag ^ -neg) + neg;                                       \
                        nbad += mag >= inf_bits;                                               \
                        keys[i] = mag > inf_bits ? nan_key : key;                              \
                    }                                                                          \
                }                                                                              \
                bad += nbad;                                                                   \
                for (int i = 0; i < m; i++) codes[i] = 0;                                      \
                for (int j = 0; j < nb; j++) {                                                 \
                    KT b = bkeys[j];                                                           \
                    for (int i = 0; i < m; i++) codes[i] += keys[i] > b;                       \
                }                                                                              \
                for (int i = 0; i < m; i++) small[i] = (uint8_t)codes[i];                      \
                for (int i = m; i < BLOCK && (i & 7); i++) small[i] = 0; /* stream padding */ \
                int64_t off = s * bits / 8; /* s is a multiple of 8 */                         \
                pack_block(small, m, bits, out + off, total_bytes - off);                      \
            }                                                                                  \
            counts[c0 / chunk] = bad;                                                          \
            bad_total += bad;                                                                  \
        }                                                                                      \
        return bad_total;                                                                      \
    }

ENCODE_FN(fewbit_encode_pack_16, uint16_t, int16_t, 15, 0x7fffu)
ENCODE_FN(fewbit_encode_pack_32, uint32_t, int32_t, 31, 0x7fffffffu)
ENCODE_FN(fewbit_encode_pack_64, uint64_t, int64_t, 63, 0x7fffffffffffffffull)

/* ---- float conversions (IEEE, round to nearest even; NaN as torch's scalar conversion) ---- */

static inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffu; /* torch's vectorized NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return bits_to_f32(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-8f; /* m * 2^-24, exact */
        return bits_to_f32(sign | f32_to_bits(v));
    }
    return bits_to_f32(sign | ((e + 112u) << 23) | (m << 13));
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f32_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return sign | 0x7e00u;  /* NaN */
    if (mag >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520 (incl. inf): inf */
    uint32_t q, r, half;
    if (mag < 0x38800000u) { /* below 2^-14: subnormal half or zero */
        uint32_t e = mag >> 23;
        if (e < 102) return sign; /* below 2^-25 (or exactly zero): +-0 */
        uint32_t mant = (mag & 0x7fffffu) | 0x800000u;
        uint32_t s = 126 - e; /* 14..24 */
        q = mant >> s;
        r = mant & ((1u << s) - 1u);
        half = 1u << (s - 1);
    } else {
        uint32_t base = mag - 0x38000000u;
        q = base >> 13;
        r = base & 0x1fffu;
        half = 0x1000u;
    }
    q += (r > half) || (r == half && (q & 1u));
    return sign | (uint16_t)q;
}

/* ---- decode: unpack + lookup + multiply ---- */

/* Groups of 8 elements with a constant bit width B (inlined per B). keep[c] is all ones,
 * or 0 where the level is zero and zero_exact applies: ANDed into the product's bits (no
 * branch on the data). */
#define DECODE_GROUPS(B, GT, CT, UC, LOAD, STORE)                                           \
    case B: {                                                                               \
        const uint64_t mask = (1u << B) - 1u;                                               \
        for (int64_t g = 0; g < groups; g++) {                                              \
            int64_t e = start + 8 * g;                                                      \
            uint64_t acc = get_group(packed + e / 8 * B, B, total_bytes - e / 8 * B);       \
            int kmax = stop - e < 8 ? (int)(stop - e) : 8;                                  \
            const GT *gs = grad + 8 * g;                                                    \
            GT *os = out + 8 * g;                                                           \
            CT r[8];                                                                        \
            for (int k = 0; k < 8; k++) {                                                   \
                unsigned c = (unsigned)((acc >> (k * B)) & mask);                           \
                CT v = (k < kmax ? (CT)LOAD(gs[k]) : (CT)0) * table[c];                     \
                UC bitsv;                                                                   \
                memcpy(&bitsv, &v, sizeof v);                                               \
                bitsv &= keep[c];                                                           \
                memcpy(&r[k], &bitsv, sizeof v);                                            \
            }                                                                               \
            if (kmax == 8) {                                                                \
                for (int k = 0; k < 8; k++) os[k] = STORE(r[k]);                            \
            } else {                                                                        \
                for (int k = 0; k < kmax; k++) os[k] = STORE(r[k]);                         \
            }                                                                               \
        }                                                                                   \
        break;                                                                              \
    }

/* grad, out: element pointers at element `start`; packed: the whole stream of `n` codes.
 * Elements [start, stop) are processed; start is a multiple of 8. */
#define DECODE_FN(NAME, GT, CT, UC, LOAD, STORE)                                            \
    void NAME(const uint8_t *packed, int64_t n, int bits, const GT *grad, GT *out,         \
              int64_t start, int64_t stop, const CT *lut, int zero_exact) {                 \
        int64_t total_bytes = (n * bits + 7) / 8;                                           \
        int64_t groups = (stop - start + 7) / 8;                                            \
        CT table[256];                                                                      \
        UC keep[256];                                                                       \
        for (int c = 0; c < (1 << bits); c++) {                                             \
            table[c] = lut[c];                                                              \
            keep[c] = (zero_exact && lut[c] == (CT)0) ? (UC)0 : (UC)~(UC)0;                 \
        }                                                                                   \
        switch (bits) {                                                                     \
            DECODE_GROUPS(1, GT, CT, UC, LOAD, STORE)                                       \
            DECODE_GROUPS(2, GT, CT, UC, LOAD, STORE)                                       \
            DECODE_GROUPS(3, GT, CT, UC, LOAD, STORE)                                       \
            DECODE_GROUPS(4, GT, CT, UC, LOAD, STORE)                                       \
            DECODE_GROUPS(5, GT, CT, UC, LOAD, STORE)                                       \
            DECODE_GROUPS(6, GT, CT, UC, LOAD, STORE)                                       \
            DECODE_GROUPS(7, GT, CT, UC, LOAD, STORE)                                       \
            DECODE_GROUPS(8, GT, CT, UC, LOAD, STORE)                                       \
            default:                                                                        \
                break;                                                                      \
        }                                                                                   \
    }

#define ID(v) (v)
DECODE_FN(fewbit_decode_mul_f32, float, float, uint32_t, ID, ID)
DECODE_FN(fewbit_decode_mul_f64, double, double, uint64_t, ID, ID)
DECODE_FN(fewbit_decode_mul_bf16, uint16_t, float, uint32_t, bf16_to_f32, f32_to_bf16)
DECODE_FN(fewbit_decode_mul_f16, uint16_t, float, uint32_t, f16_to_f32, f32_to_f16)

/* ---- 1-bit masks computed by torch: pack + non-finite counts ---- */

/* Pack n bytes (0 or 1) into ceil(n/8) bytes of the 1-bit stream. */
void fewbit_pack_mask(const uint8_t *mask, int64_t n, uint8_t *out) {
    int64_t full = n / 8;
    for (int64_t g = 0; g < full; g++) {
        const uint8_t *m = mask + 8 * g;
        out[g] = (uint8_t)((m[0] & 1) | (m[1] & 1) << 1 | (m[2] & 1) << 2 | (m[3] & 1) << 3 |
                           (m[4] & 1) << 4 | (m[5] & 1) << 5 | (m[6] & 1) << 6 | (m[7] & 1) << 7);
    }
    if (full * 8 < n) {
        uint8_t acc = 0;
        for (int64_t i = full * 8; i < n; i++) acc |= (uint8_t)((mask[i] & 1) << (i - full * 8));
        out[full] = acc;
    }
}

/* counts[c] = non-finite elements of chunk c (chunks of `chunk` elements); returns the sum. */
#define COUNT_FN(NAME, UT, MAGMASK)                                                          \
    int64_t NAME(const UT *x, int64_t n, UT inf_bits, int64_t chunk, int64_t *counts) {       \
        int64_t total = 0;                                                                    \
        for (int64_t c0 = 0; c0 < n; c0 += chunk) {                                           \
            int64_t c1 = c0 + chunk < n ? c0 + chunk : n;                                     \
            int64_t bad = 0;                                                                  \
            for (int64_t i = c0; i < c1; i++) bad += (x[i] & (UT)MAGMASK) >= inf_bits;        \
            counts[c0 / chunk] = bad;                                                         \
            total += bad;                                                                     \
        }                                                                                     \
        return total;                                                                         \
    }

COUNT_FN(fewbit_count_nonfinite_16, uint16_t, 0x7fffu)
COUNT_FN(fewbit_count_nonfinite_32, uint32_t, 0x7fffffffu)
COUNT_FN(fewbit_count_nonfinite_64, uint64_t, 0x7fffffffffffffffull)

/* ---- group quantizer (fewbit/codecs/quantize.py): one pass each way ----
 *
 * Same arithmetic as the eager torch path, in float32: per group min/max, lo rounded down
 * to bf16 (bit ops) or fp16 (exact: fp16 inputs), step = (max/L - lo/L) * (1 + 2^-20)
 * rounded up to bf16, non-finite groups -> NaN lo/scale (codes from x itself, as eager),
 * code = clamp(floor((x - lo) / scale + u), 0, L) with u = (mix32(e + key) >> 8) * 2^-24.
 * Codes are ORed into a zeroed packed stream (code e at bit e * bits). */

#define QMAX_GROUP 4096

/* AVX2 and baseline versions of the quantizer passes, picked at load time (same results:
 * no FMA contraction, IEEE float32 arithmetic in both). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FB_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FB_CLONES
#endif

static inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    return h ^ (h >> 16);
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

static inline void pack_or(const uint8_t *codes, int64_t m, int64_t e0, int bits,
                           uint8_t *packed) {
    if (bits == 8) {
        memcpy(packed + e0, codes, (size_t)m);
        return;
    }
    int per = 8 / bits;
    int64_t k = 0;
    for (; k < m && ((e0 + k) % per); k++) {
        int64_t e = e0 + k;
        packed[e * bits / 8] |= (uint8_t)(codes[k] << ((e * bits) & 7));
    }
    uint8_t *out = packed + (e0 + k) * bits / 8;
    int64_t full = (m - k) / per;
    for (int64_t j = 0; j < full; j++) {
        const uint8_t *c = codes + k + j * per;
        uint8_t acc = 0;
        for (int t = 0; t < per; t++) acc |= (uint8_t)(c[t] << (t * bits));
        out[j] |= acc;
    }
    for (k += full * per; k < m; k++) {
        int64_t e = e0 + k;
        packed[e * bits / 8] |= (uint8_t)(codes[k] << ((e * bits) & 7));
    }
}

/* min and max of m >= 1 floats (lane-wise in 8 lanes, then across: vectorizable); returns
 * whether all are finite. Which zero a {+0, -0} minimum returns depends on the lanes (as in
 * torch's vectorized amin, whose choice depends on its own lanes). */
typedef float fb_v8f __attribute__((vector_size(32)));
typedef int32_t fb_v8i __attribute__((vector_size(32)));

/* one 8-lane step of the running min / max / all-finite of group_range */
static inline void range_step(const float *p, fb_v8f *mn8, fb_v8f *mx8, fb_v8i *ok8) {
    const fb_v8i absmask = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff,
                            0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
    const fb_v8i maxfin = {0x7f7fffff, 0x7f7fffff, 0x7f7fffff, 0x7f7fffff,
                           0x7f7fffff, 0x7f7fffff, 0x7f7fffff, 0x7f7fffff};
    fb_v8f v;
    memcpy(&v, p, sizeof v);
    fb_v8i vi = (fb_v8i)v;
    fb_v8i lt = v < *mn8, gt = v > *mx8;
    *mn8 = (fb_v8f)((vi & lt) | ((fb_v8i)*mn8 & ~lt));
    *mx8 = (fb_v8f)((vi & gt) | ((fb_v8i)*mx8 & ~gt));
    *ok8 &= (vi & absmask) <= maxfin;
}

/* min and max of m >= 1 floats (lane-wise: 4 independent sets of 8 lanes, then across;
 * vectorizable); returns whether all are finite. Which zero a {+0, -0} minimum returns
 * depends on the lanes (as in torch's vectorized amin, whose choice depends on its own). */
static inline int group_range(const float *buf, int64_t m, float *mn_out, float *mx_out) {
    fb_v8f mn8[4], mx8[4];
    fb_v8i ok8[4];
    for (int j = 0; j < 4; j++) {
        for (int t = 0; t < 8; t++) {
            mn8[j][t] = buf[0];
            mx8[j][t] = buf[0];
            ok8[j][t] = -1;
        }
    }
    int64_t full32 = m & ~(int64_t)31, full8 = m & ~(int64_t)7;
    for (int64_t k = 0; k < full32; k += 32) {
        for (int j = 0; j < 4; j++) range_step(buf + k + 8 * j, &mn8[j], &mx8[j], &ok8[j]);
    }
    for (int64_t k = full32; k < full8; k += 8) range_step(buf + k, &mn8[0], &mx8[0], &ok8[0]);
    float mn = buf[0], mx = buf[0];
    int ok = 1;
    for (int j = 0; j < 4; j++) {
        for (int t = 0; t < 8; t++) {
            mn = mn8[j][t] < mn ? mn8[j][t] : mn;
            mx = mx8[j][t] > mx ? mx8[j][t] : mx;
            ok &= ok8[j][t] != 0;
        }
    }
    for (int64_t k = full8; k < m; k++) {
        float v = buf[k];
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
        ok &= fabsf(v) <= 3.4028234663852886e38f;
    }
    *mn_out = mn;
    *mx_out = mx;
    return ok;
}

/* codes of m elements: clamp(floor((x - lo) / safe + u), 0, L), NaN quotients as 0;
 * t >= 0 after the clamp, so truncation is floor. */
static inline void group_codes(const float *buf, int m, float lo32, float safe, uint32_t k0,
                               float L, uint8_t *codes) {
    for (int k = 0; k < m; k++) {
        float v = (buf[k] - lo32) / safe;
        v = v != v ? 0.0f : v;
        uint32_t h = mix32(k0 + (uint32_t)k);
        float u = (float)(int32_t)(h >> 8) * 5.9604644775390625e-08f;
        float t = v + u;
        t = t > 0.0f ? t : 0.0f;
        t = t < L ? t : L;
        codes[k] = (uint8_t)(int32_t)t;
    }
}

static inline void pack_any(const uint8_t *codes, int64_t m, int64_t e0, int bits,
                            uint8_t *packed) {
    switch (bits) { /* constant bit width at each inlined call: unrolled byte loops */
        case 1: pack_or(codes, m, e0, 1, packed); break;
        case 2: pack_or(codes, m, e0, 2, packed); break;
        case 4: pack_or(codes, m, e0, 4, packed); break;
        default: pack_or(codes, m, e0, 8, packed); break;
    }
}

#define QUANT_FN(NAME, T, LOAD)                                                              \
    FB_CLONES void NAME(const T *x, int64_t row_len, int64_t gs, int64_t g0, int64_t g1, uint32_t key,  \
              int bits, int lo_f16, uint8_t *packed, uint16_t *lo_out, uint16_t *scale_out) { \
        int64_t gpr = (row_len + gs - 1) / gs;                                                \
        const float L = (float)((1 << bits) - 1);                                             \
        const float margin = 1.0f + 9.5367431640625e-07f; /* 1 + 2^-20 */                    \
        float buf[QMAX_GROUP];                                                                \
        uint8_t codes[QMAX_GROUP];                                                            \
        for (int64_t g = g0; g < g1; g++) {                                                   \
            int64_t r = g / gpr, c = g % gpr;                                                 \
            int64_t e0 = r * row_len + c * gs;                                                \
            int64_t m = row_len - c * gs < gs ? row_len - c * gs : gs;                        \
            const T *xs = x + e0;                                                             \
            for (int64_t k = 0; k < m; k++) buf[k] = LOAD(xs[k]);                             \
            float mn, mx;                                                                     \
            int bad = !group_range(buf, m, &mn, &mx);                                         \
            uint16_t lo_bits = 0, scale_bits = 0x7fc0u;                                       \
            float lo32 = 0.0f, scale32 = 0.0f;                                                \
            if (!bad) {                                                                       \
                lo_bits = lo_f16 ? f32_to_f16(mn) : bf16_directed(mn, 0);                     \
                lo32 = lo_f16 ? f16_to_f32(lo_bits) : bf16_to_f32(lo_bits);                   \
                float step = (mx / L - lo32 / L) * margin;                                    \
                scale_bits = bf16_directed(step, 1);                                          \
                scale32 = bf16_to_f32(scale_bits);                                            \
                bad = !(fabsf(lo32) <= 3.4028234663852886e38f) ||                             \
                      !(fabsf(scale32) <= 3.4028234663852886e38f);                            \
            }                                                                                 \
            if (bad) {                                                                        \
                lo_bits = lo_f16 ? 0x7e00u : 0x7fc0u;                                         \
                scale_bits = 0x7fc0u;                                                         \
                lo32 = 0.0f;                                                                  \
                scale32 = 0.0f;                                                               \
            }                                                                                 \
            lo_out[g] = lo_bits;                                                              \
            scale_out[g] = scale_bits;                                                        \
            float safe = scale32 > 0.0f ? scale32 : 1.0f;                                     \
            group_codes(buf, (int)m, lo32, safe, key + (uint32_t)e0, L, codes);               \
            pack_any(codes, m, e0, bits, packed);                                              \
        }                                                                                     \
    }

QUANT_FN(fewbit_quantize_f32, float, ID)
QUANT_FN(fewbit_quantize_f64, double, f64_load)
QUANT_FN(fewbit_quantize_bf16, uint16_t, bf16_to_f32)
QUANT_FN(fewbit_quantize_f16, uint16_t, f16_to_f32)

/* codes of elements [e0, e0 + m) of the packed stream */
static inline void unpack_codes(const uint8_t *packed, int64_t e0, int64_t m, int bits,
                                uint8_t *codes) {
    const unsigned mask = (1u << bits) - 1u;
    if (bits == 8) {
        memcpy(codes, packed + e0, (size_t)m);
        return;
    }
    int per = 8 / bits;
    int64_t k = 0;
    for (; k < m && ((e0 + k) % per); k++) {
        int64_t e = e0 + k;
        codes[k] = (uint8_t)((packed[e * bits / 8] >> ((e * bits) & 7)) & mask);
    }
    const uint8_t *in = packed + (e0 + k) * bits / 8;
    int64_t full = (m - k) / per;
    for (int64_t j = 0; j < full; j++) {
        unsigned b = in[j];
        for (int t = 0; t < per; t++) codes[k + j * per + t] = (uint8_t)((b >> (t * bits)) & mask);
    }
    for (k += full * per; k < m; k++) {
        int64_t e = e0 + k;
        codes[k] = (uint8_t)((packed[e * bits / 8] >> ((e * bits) & 7)) & mask);
    }
}

static inline void unpack_any(const uint8_t *packed, int64_t e0, int64_t m, int bits,
                              uint8_t *codes) {
    switch (bits) { /* constant bit width at each inlined call: unrolled byte loops */
        case 1: unpack_codes(packed, e0, m, 1, codes); break;
        case 2: unpack_codes(packed, e0, m, 2, codes); break;
        case 4: unpack_codes(packed, e0, m, 4, codes); break;
        default: unpack_codes(packed, e0, m, 8, codes); break;
    }
}

/* out = lo + code * scale (float32, the product exact), rounded to the output dtype;
 * groups [g0, g1). */
#define DEQUANT_FN(NAME, T, STORE)                                                           \
    FB_CLONES void NAME(const uint8_t *packed, int64_t row_len, int64_t gs, int64_t g0, int64_t g1,     \
              int bits, const uint16_t *lo, int lo_f16, const uint16_t *scale, T *out) {      \
        int64_t gpr = (row_len + gs - 1) / gs;                                                \
        uint8_t codes[QMAX_GROUP];                                                            \
        for (int64_t g = g0; g < g1; g++) {                                                   \
            int64_t r = g / gpr, c = g % gpr;                                                 \
            int64_t e0 = r * row_len + c * gs;                                                \
            int m = (int)(row_len - c * gs < gs ? row_len - c * gs : gs);                     \
            float lo32 = lo_f16 ? f16_to_f32(lo[g]) : bf16_to_f32(lo[g]);                     \
            float s32 = bf16_to_f32(scale[g]);                                                \
            unpack_any(packed, e0, m, bits, codes);                                           \
            T *os = out + e0;                                                                 \
            for (int k = 0; k < m; k++) os[k] = STORE(lo32 + (float)codes[k] * s32);         \
        }                                                                                     \
    }

static inline double f32_to_f64(float v) { return (double)v; }

DEQUANT_FN(fewbit_dequantize_f32, float, ID)
DEQUANT_FN(fewbit_dequantize_f64, double, f32_to_f64)
DEQUANT_FN(fewbit_dequantize_bf16, uint16_t, f32_to_bf16)
DEQUANT_FN(fewbit_dequantize_f16, uint16_t, f32_to_f16)
