/* fewbit CPU codecs: IEEE float <-> bit-pattern conversions shared by activations.c and
 * quantize.c (round to nearest even; NaN as torch's conversions). Header-only, static inline.
 */
#ifndef FEWBIT_FLOAT_BITS_H
#define FEWBIT_FLOAT_BITS_H
#include <stdint.h>
#include <string.h>
#include <math.h>

/* AVX2 and baseline versions of hot passes, picked at load time (same results: no FMA
 * contraction, IEEE float32 arithmetic in both). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FB_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FB_CLONES
#endif

/* AVX-512 (x86-64-v4: F/BW/DQ/VL), AVX2 and baseline versions of the activation codecs,
 * picked at load time (integer and exact float ops only: identical results in every one). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FB_CLONES_512 __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define FB_CLONES_512
#endif

#define ID(v) (v)

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

#endif
