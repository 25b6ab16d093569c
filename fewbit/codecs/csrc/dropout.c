/* fewbit CPU codecs: dropout with a 1-bit keep-mask, one pass per direction.
 *
 * Plain C (no torch headers), compiled at first use by fewbit/codecs/native.py together with
 * the other csrc files and called through ctypes on contiguous tensors' data pointers.
 *
 * Keep-mask: element e (its index in the flattened tensor, 64-bit) is kept when
 *     (drop_hash(e, k0, k1) >> 8) >= thr,
 * drop_hash(e) = mix32(mix32(lo + k0) ^ k1 ^ mix32(hi)), lo/hi the low/high 32 bits of e,
 * mix32 a bijective 32-bit integer hash (xorshift-multiply), k0/k1 two 32-bit keys drawn per
 * call from torch's generator and thr = round(p * 2^24). For fixed keys and hi, lo -> hash is
 * a bijection of the 32-bit integers, so over every aligned run of 2^32 elements exactly
 * 2^32 - thr * 2^8 elements are kept: keep probability 1 - thr / 2^24, within 2^-25 of 1 - p.
 * fewbit/functional/dropout.py computes the same hash with torch int64 ops (eager path).
 *
 * Forward:  out = x * (keep ? scale : 0) and the mask packed (bit e of the stream, little-endian
 *           bytes: fewbit's 1-bit BitPacker layout, ceil(n/8) bytes, unused high bits 0).
 * Backward: out = grad * (bit ? scale : 0) from the packed mask.
 * scale is torch's 1/(1-p) in the tensor's dtype; the product is torch's: float32/float64
 * multiply, and for bf16/fp16 the float32 product of the two values (exact, except where
 * float32 itself rounds: overflow, subnormals) rounded to nearest even (NaN: bf16 0xFFFF as
 * torch's vectorized conversion, fp16 sign | 0x7E00). A dropped element is x * 0: +-0, or NaN
 * for NaN/inf x (torch multiplies by the 0 of its noise tensor as well).
 *
 * Work is split into CHUNK-element chunks (a multiple of 64: every packed byte belongs to one
 * chunk) run in parallel with OpenMP when built with it; each element's result depends only on
 * its index, so the bytes are the same whatever the thread count. Inside a chunk, blocks of 64
 * elements go through an L1 buffer of keep bytes (hash loop, multiply loop: vectorized) and
 * 8 bytes of mask packed/unpacked by 64-bit multiply tricks.
 */
#include "float_bits.h"

#define DROP_BLOCK 64      /* elements per inner block: 8 mask bytes */
#ifndef DROP_CHUNK
#define DROP_CHUNK 16384 /* elements per parallel chunk (multiple of DROP_BLOCK) */
#endif
#ifndef DROP_PAR_MIN
/* parallel from this many elements on (measured, 2 threads, fp32 forward+backward, loaded
 * machine: 64K elements 32 -> 20 us, 1M 760 -> 450 us) */
#define DROP_PAR_MIN 65536
#endif
/* mask bytes of an m-element block (m <= DROP_BLOCK; the bound is spelled out for GCC) */
#define DROP_GROUPS(m) ((m) >= DROP_BLOCK ? DROP_BLOCK / 8 : ((m) + 7) / 8)

#ifdef _OPENMP
#define DROP_PARALLEL_FOR _Pragma("omp parallel for schedule(static) if (n >= DROP_PAR_MIN)")
#else
#define DROP_PARALLEL_FOR
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DROP_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define DROP_CLONES
#endif

static inline uint32_t drop_mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    return h ^ (h >> 16);
}

/* float_bits.h's fp16 conversions written with bit masks instead of branches, so that the
 * element loops vectorize (the float operations run for every element, so GCC need not
 * speculate them); same results for every input, checked exhaustively against float_bits.h
 * (NaN -> sign | 0x7E00). */
static inline uint32_t drop_select(uint32_t cond_mask, uint32_t a, uint32_t b) {
    return (a & cond_mask) | (b & ~cond_mask);
}

static inline float drop_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7fffu;
    float sub = (float)(int32_t)em * 5.9604644775390625e-8f; /* subnormal: em * 2^-24, exact */
    uint32_t nrm = (em << 13) + 0x38000000u;                  /* exponent rebiased by 112 */
    uint32_t special = (em << 13) | 0x7f800000u;              /* inf / NaN */
    uint32_t is_special = -(uint32_t)(em >= 0x7c00u), is_sub = -(uint32_t)(em < 0x400u);
    uint32_t mag = drop_select(is_special, special, drop_select(is_sub, f32_to_bits(sub), nrm));
    return bits_to_f32(sign | mag);
}

static inline uint16_t drop_f32_to_f16(float f) {
    uint32_t u = f32_to_bits(f), sign = (u >> 16) & 0x8000u, mag = u & 0x7fffffffu;
    /* normal half: the 13 dropped bits rounded to nearest even (a carry runs into the
     * exponent, up to inf from 65520 on) */
    uint32_t nrm = (mag - 0x38000000u + 0xfffu + ((mag >> 13) & 1u)) >> 13;
    /* below 2^-14: adding 0.5f rounds |f| to a multiple of 2^-24 (nearest even), the
     * subnormal half's step; the sum's low bits are the half's bits */
    uint32_t sub = f32_to_bits(bits_to_f32(mag) + 0.5f) - 0x3f000000u;
    uint32_t is_nan = -(uint32_t)(mag > 0x7f800000u);
    uint32_t special = drop_select(is_nan, 0x7e00u, 0x7c00u);
    uint32_t is_special = -(uint32_t)(mag >= 0x47800000u), is_sub = -(uint32_t)(mag < 0x38800000u);
    uint32_t h = drop_select(is_special, special, drop_select(is_sub, sub, nrm));
    return (uint16_t)(sign | h);
}

/* keep[j] = 1 if element e0 + j is kept, else 0, for j < m; 0 for m <= j < DROP_BLOCK.
 * e0 is a multiple of DROP_BLOCK, so the block's elements share hi = e0 >> 32. */
static inline void drop_keep_block(int64_t e0, int m, uint32_t k0, uint32_t k1, uint32_t thr,
                                   uint8_t *keep) {
    uint32_t lo = (uint32_t)e0 + k0;
    uint32_t kb = k1 ^ drop_mix32((uint32_t)((uint64_t)e0 >> 32));
    for (int j = 0; j < DROP_BLOCK; j++) {
        uint32_t h = drop_mix32(drop_mix32(lo + (uint32_t)j) ^ kb);
        keep[j] = (uint8_t)((h >> 8) >= thr);
    }
    for (int j = m; j < DROP_BLOCK; j++) keep[j] = 0;
}

/* 8 keep bytes (0/1, little-endian word) -> 1 byte, byte k at bit k: the product puts byte k's
 * bit at bit 56 + k, and no two partial products share a bit position (no carries). */
static inline uint8_t drop_pack8(const uint8_t *keep) {
    uint64_t w;
    memcpy(&w, keep, 8);
    return (uint8_t)((w * 0x0102040810204080ull) >> 56);
}

/* 1 byte -> 8 keep bytes (0/1): byte k of the broadcast masked by 1 << k, then normalized. */
static inline void drop_unpack8(uint8_t b, uint8_t *keep) {
    uint64_t w = ((uint64_t)b * 0x0101010101010101ull) & 0x8040201008040201ull;
    w = ((w + 0x7f7f7f7f7f7f7f7full) >> 7) & 0x0101010101010101ull;
    memcpy(keep, &w, 8);
}

/* Forward over elements [a, b) (a a multiple of DROP_BLOCK): full blocks with the constant
 * block length (constant trip counts: the loops vectorize), then the tail block. */
#define DROP_FWD_FN(NAME, T, CT, LOAD, STORE)                                                 \
    static inline void NAME##_block(const T *x, int64_t e0, int m, uint32_t k0, uint32_t k1, \
                                    uint32_t thr, CT s, T *out, uint8_t *packed) {           \
        uint8_t keep[DROP_BLOCK];                                                             \
        drop_keep_block(e0, m, k0, k1, thr, keep);                                            \
        for (int j = 0; j < m; j++) {                                                         \
            CT noise = keep[j] ? s : (CT)0;                                                   \
            out[e0 + j] = STORE(LOAD(x[e0 + j]) * noise);                                     \
        }                                                                                     \
        for (int g = 0; g < DROP_GROUPS(m); g++) packed[e0 / 8 + g] = drop_pack8(keep + 8 * g);   \
    }                                                                                         \
    static inline void NAME##_range(const T *x, int64_t a, int64_t b, uint32_t k0,           \
                                    uint32_t k1, uint32_t thr, CT s, T *out,                 \
                                    uint8_t *packed) {                                       \
        int64_t e0 = a;                                                                       \
        for (; e0 + DROP_BLOCK <= b; e0 += DROP_BLOCK)                                        \
            NAME##_block(x, e0, DROP_BLOCK, k0, k1, thr, s, out, packed);                     \
        if (e0 < b) NAME##_block(x, e0, (int)(b - e0), k0, k1, thr, s, out, packed);          \
    }                                                                                         \
    DROP_CLONES void NAME(const T *x, int64_t n, uint32_t k0, uint32_t k1, uint32_t thr,     \
                          double scale, T *out, uint8_t *packed) {                           \
        int64_t nchunks = (n + DROP_CHUNK - 1) / DROP_CHUNK;                                  \
        CT s = (CT)scale;                                                                     \
        DROP_PARALLEL_FOR                                                                     \
        for (int64_t c = 0; c < nchunks; c++) {                                               \
            int64_t a = c * DROP_CHUNK, b = a + DROP_CHUNK < n ? a + DROP_CHUNK : n;          \
            NAME##_range(x, a, b, k0, k1, thr, s, out, packed);                               \
        }                                                                                     \
    }

/* Backward over elements [a, b), blocked as the forward. */
#define DROP_BWD_FN(NAME, T, CT, LOAD, STORE)                                                 \
    static inline void NAME##_block(const uint8_t *packed, int64_t e0, int m, const T *grad, \
                                    CT s, T *out) {                                          \
        uint8_t keep[DROP_BLOCK];                                                             \
        for (int g = 0; g < DROP_GROUPS(m); g++) drop_unpack8(packed[e0 / 8 + g], keep + 8 * g);  \
        for (int j = 0; j < m; j++) {                                                         \
            CT noise = keep[j] ? s : (CT)0;                                                   \
            out[e0 + j] = STORE(LOAD(grad[e0 + j]) * noise);                                  \
        }                                                                                     \
    }                                                                                         \
    static inline void NAME##_range(const uint8_t *packed, int64_t a, int64_t b,             \
                                    const T *grad, CT s, T *out) {                           \
        int64_t e0 = a;                                                                       \
        for (; e0 + DROP_BLOCK <= b; e0 += DROP_BLOCK)                                        \
            NAME##_block(packed, e0, DROP_BLOCK, grad, s, out);                               \
        if (e0 < b) NAME##_block(packed, e0, (int)(b - e0), grad, s, out);                    \
    }                                                                                         \
    DROP_CLONES void NAME(const uint8_t *packed, int64_t n, const T *grad, double scale,     \
                          T *out) {                                                          \
        int64_t nchunks = (n + DROP_CHUNK - 1) / DROP_CHUNK;                                  \
        CT s = (CT)scale;                                                                     \
        DROP_PARALLEL_FOR                                                                     \
        for (int64_t c = 0; c < nchunks; c++) {                                               \
            int64_t a = c * DROP_CHUNK, b = a + DROP_CHUNK < n ? a + DROP_CHUNK : n;          \
            NAME##_range(packed, a, b, grad, s, out);                                         \
        }                                                                                     \
    }

DROP_FWD_FN(fewbit_dropout_fwd_f32, float, float, ID, ID)
DROP_FWD_FN(fewbit_dropout_fwd_f64, double, double, ID, ID)
DROP_FWD_FN(fewbit_dropout_fwd_bf16, uint16_t, float, bf16_to_f32, f32_to_bf16)
DROP_FWD_FN(fewbit_dropout_fwd_f16, uint16_t, float, drop_f16_to_f32, drop_f32_to_f16)

DROP_BWD_FN(fewbit_dropout_bwd_f32, float, float, ID, ID)
DROP_BWD_FN(fewbit_dropout_bwd_f64, double, double, ID, ID)
DROP_BWD_FN(fewbit_dropout_bwd_bf16, uint16_t, float, bf16_to_f32, f32_to_bf16)
DROP_BWD_FN(fewbit_dropout_bwd_f16, uint16_t, float, drop_f16_to_f32, drop_f32_to_f16)
