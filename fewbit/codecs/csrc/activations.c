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
#include "float_bits.h"

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

