/* Helpers shared by lowbit's AVX2 sources (built together by lowbit/kernels/native.py). */
#ifndef LOWBIT_SIMD_AVX2_H
#define LOWBIT_SIMD_AVX2_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* The float of a bfloat16 bit pattern (its upper 16 bits). */
static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The sum of the 8 float lanes of v. */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif
