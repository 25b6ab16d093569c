/* fewbit CPU codecs: the group quantizer (fewbit/codecs/quantize.py), one pass each way.
 * Compiled with activations.c into one library by fewbit/codecs/native.py. */
#include "float_bits.h"

/* ---- group quantizer (fewbit/codecs/quantize.py): one pass each way ----
 *
 * Same arithmetic as the eager torch path, in float32: per group min/max, lo rounded down
 * to bf16 (bit ops) or fp16 (exact: fp16 inputs), step = (max/L - lo/L) * (1 + 2^-20)
 * rounded up to bf16, non-finite groups -> NaN lo/scale (codes from x itself, as eager),
 * code = clamp(floor((x - lo) / scale + u), 0, L) with u = (mix32(e + key) >> 8) * 2^-24.
 * Codes are ORed into a zeroed packed stream (code e at bit e * bits). */

#define QMAX_GROUP 4096


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
