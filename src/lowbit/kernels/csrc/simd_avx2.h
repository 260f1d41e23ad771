/* Helpers shared by lowbit's AVX2 sources (built together by lowbit/kernels/native.py). */
#ifndef LOWBIT_SIMD_AVX2_H
#define LOWBIT_SIMD_AVX2_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* The float of a bfloat16 bit pattern (its upper 16 bits). */
static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* f rounded to bfloat16 (nearest, ties to even: torch's .to(torch.bfloat16) of a finite
 * number), as its bit pattern. */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* 8 bfloat16 values at p widened to float32 (exact). */
static inline __m256 load_bf16x8(const uint16_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

/* 8 floats rounded to bfloat16 (nearest, ties to even: as torch's .to(torch.bfloat16) for
 * finite values), stored at out. */
static inline void store_bf16x8(uint16_t *out, __m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r),
                                            _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128((__m128i *)out, packed);
}

/* Weights widened for a GEMM: 8 (put8) or 1 (put1) at index k of a float32 row (of) or,
 * with bf16, of a bfloat16 row (oh) over the same memory. */
static inline void put8(float *of, uint16_t *oh, int64_t k, __m256 v, int64_t bf16) {
    if (bf16) store_bf16x8(oh + k, v);
    else _mm256_storeu_ps(of + k, v);
}

static inline void put1(float *of, uint16_t *oh, int64_t k, float v, int64_t bf16) {
    if (bf16) oh[k] = to_bf16(v);
    else of[k] = v;
}

/* The sum of the 8 float lanes of v. */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp(x) for 8 floats: Cephes' expf (2^n e^r, degree-6 polynomial on |r| <= ln2 / 2,
 * about 1 ulp; below -87.3 about 1e-38, not 0); a libm call per element costs more than the
 * rest of a decode block's small operations together. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* out = g / (1 + exp(-g)) * u (SwiGLU, Shazeer, 2020), 8 at a time; out may be g. */
static inline void silu_mul8(const float *g, const float *u, int64_t count, float *out) {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i), one = _mm256_set1_ps(1.0f);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)),
                                              _mm256_loadu_ps(u + i)));
    }
    for (; i < count; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
#endif
