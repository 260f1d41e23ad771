/* The int8-activation dot products of q8_vnni.c for CPUs with AVX2 but no AVX512-VNNI
 * (AVX2-only Zen 3, older Xeons): the same activations (Q8_0 blocks of 32), weights and
 * numbers, with vpmaddubsw + vpmaddwd in place of vpdpbusd, as llama.cpp's AVX2 Q4_0 x Q8_0
 * and Q8_0 x Q8_0 dot products (ggml-cpu/arch/x86/quants.c).
 *
 * vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16 with saturation:
 * 4-bit codes (0..15) times int8 codes (|x| <= 127) stay below 2 * 15 * 127; int8 weights go
 * through the sign trick, |w| (unsigned: -128 reads as 128) times x with w's sign (codes
 * are within 127), below 2 * 128 * 127. vpmaddwd against ones then gives 8 int32 lanes of
 * 4 inputs each,
 * the same lanes as the VNNI kernel, so the offsets (-8 x lane sums) and scales apply alike.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "lowbit_native.h"
#include "simd_avx2.h"

/* 8 int32 lanes of 4-input sums of u * x (u unsigned bytes, x signed). */
static inline __m256i dot_u8(__m256i u, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
}

/* The four rows of the LB_Q4R group starting at row n on int8 activations a, into t[0..4):
 * each block's activations, offsets and scales loaded once for the four, the rows' bf16
 * scales (and zeros) widened 16 at a time into f32 tables; per row the same operations in
 * the same order as one row alone. */
static void q4r_rows4(const lb_linear *L, const lb_q8 *a, int64_t n, float t[4]) {
    const int64_t kp = 2 * L->ld, G16 = (kp / 32 + 15) / 16;
    const uint16_t *s = L->s, *z = L->z;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
    float sf[4][16], zf[4][16];
    for (int64_t c = 0; c < kp / 64; c++) {
        if (c % 8 == 0) { /* blocks 2c .. 2c + 15: the group's next 16 scales per row */
            const int64_t at = (n * G16 + 4 * (c / 8)) * 16;
            for (int r = 0; r < 4; r++)
                for (int h = 0; h < 16; h += 8) {
                    _mm256_storeu_ps(sf[r] + h, load_bf16x8(s + at + 16 * r + h));
                    if (z) _mm256_storeu_ps(zf[r] + h, load_bf16x8(z + at + 16 * r + h));
                }
        }
        const uint8_t *wc = (const uint8_t *)L->w + n * L->ld + 128 * c;
        for (int h = 0; h < 2; h++) { /* blocks 2c (inputs 64c..) and 2c + 1 (64c + 32..) */
            const int64_t blk = 2 * c + h, lane = 8 * blk, j = blk % 16;
            const __m256i x = _mm256_loadu_si256((const __m256i *)(a->xq + 32 * blk));
            const __m256i off = _mm256_loadu_si256((const __m256i *)(a->n8 + lane));
            const __m256 dl = _mm256_loadu_ps(a->dl + lane);
            for (int r = 0; r < 4; r++) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(wc + 32 * r));
                const __m256i u = h ? _mm256_and_si256(_mm256_srli_epi16(b, 4), low4)
                                    : _mm256_and_si256(b, low4);
                const __m256i sum = _mm256_add_epi32(dot_u8(u, x), off);
                if (z) /* z x: z d (code sum), before the scaled sum (as q8_vnni.c) */
                    f[r] = _mm256_fmadd_ps(_mm256_set1_ps(zf[r][j]),
                                           _mm256_loadu_ps(a->dls + lane), f[r]);
                f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum),
                                       _mm256_mul_ps(dl, _mm256_set1_ps(sf[r][j])), f[r]);
            }
        }
    }
    for (int r = 0; r < 4; r++) t[r] = hsum8(f[r]);
}

/* One LB_I8 / LB_I8G row: whole blocks of 32 by SIMD, the inputs past them scalar. */
static float i8_row(const lb_linear *L, const lb_q8 *a, int64_t n) {
    const int64_t K = L->k, G = K / 32;
    const int8_t *w = (const int8_t *)L->w + n * L->ld;
    const float *s = L->kind == LB_I8G ? (const float *)L->s + n * G : NULL;
    __m256 f = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < K / 32; blk++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(a->xq + 32 * blk));
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 32 * blk));
        const __m256i sum = dot_u8(_mm256_abs_epi8(wv), _mm256_sign_epi8(x, wv));
        __m256 dl = _mm256_loadu_ps(a->dl + 8 * blk);
        if (s) dl = _mm256_mul_ps(dl, _mm256_set1_ps(s[blk]));
        f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), dl, f);
    }
    float t = hsum8(f);
    for (int64_t k = K / 32 * 32; k < K; k++)
        t += a->dl[k / 4] * (float)(w[k] * a->xq[k]) * (s ? s[k / 32] : 1.0f);
    return t;
}

/* Rows [n0, n1) of an LB_I8 / LB_I8G / LB_Q4R linear on int8 activations a (AVX2). */
void lowbit_q8_rows_avx2(const lb_linear *L, const lb_q8 *a, float *y, int64_t n0,
                         int64_t n1) {
    if (L->kind == LB_Q4R) { /* groups of four rows; n0 is a multiple of 4 */
        for (int64_t n = n0; n < n1; n += 4) {
            float t[4];
            q4r_rows4(L, a, n, t);
            for (int64_t r = n; r < n + 4 && r < n1; r++)
                y[r] = t[r - n] + (L->bias ? L->bias[r] : 0.0f);
        }
        return;
    }
    for (int64_t n = n0; n < n1; n++) {
        float t = i8_row(L, a, n);
        if (L->kind == LB_I8) t *= ((const float *)L->s)[n];
        y[n] = t + (L->bias ? L->bias[n] : 0.0f);
    }
}
