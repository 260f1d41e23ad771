/* Lookup-table GEMV rows for 4-bit (or fewer) lookup formats, AVX2 + FMA, for
 * csrc/decode_loop.c's LB_LUT4 (lowbit_native.h):
 *
 *   NF4 / log4 / codebook(values) (QLoRA's NormalFloat, Dettmers et al., 2023): one shared
 *   table T of 16 values and a float scale per group, w[n, k] = T[u] * s[n, k / kg];
 *   per-row k-means codebooks (Deep Compression, Han et al., 2016; SqueezeLLM): a table per
 *   row and group, w[n, k] = T[n, k / kg][u], no scale.
 *
 * AVX2: the 16 table values sit in two registers; eight 4-bit indices pick their values
 * with two vpermps and one blend on the index's bit 3, then one FMA with the float32
 * activations. AVX-512: one register holds the table, one vpermps picks 16 values.
 * Per group the sum is scaled once. Codes: per 32 inputs 16 bytes, byte j holding input j
 * (low nibble) and j + 16; inputs past K meet zero activations (masked loads).
 *
 * LB_LUT4Q (int8 activations, Q8_0 blocks of 32): each table rounded to int16 (T16, with a
 * float unit folded into the per-group scale) and held as two byte planes; vpshufb picks the
 * low and high bytes of 32 values at once, two unpacks make them int16, and vpmaddwd with
 * the sign-extended activation codes sums them exactly in int32; per block of 32 one FMA
 * applies the activation scale times the group's scale. About twice the float kernel's rate
 * on AVX2, where vpermps + blend per 8 values is its cost.
 */
#include <immintrin.h>
#include <stdint.h>

#include "lowbit_native.h"
#include "simd_avx2.h"

/* x[k0 .. k0 + 8) with the inputs past K read as zero. */
static inline __m256 load8(const float *x, int64_t k0, int64_t K) {
    if (k0 + 8 <= K) return _mm256_loadu_ps(x + k0);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(K - k0)), lane);
    return k0 < K ? _mm256_maskload_ps(x + k0, live) : _mm256_setzero_ps();
}

static void rows_avx2(const lb_linear *L, const float *x, float *y, int64_t n0, int64_t n1);

/* T[idx] for eight indices 0..15 (lo: T[0..8), hi: T[8..16)). */
static inline __m256 pick(__m256 lo, __m256 hi, __m256i idx) {
    const __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

#define LB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

/* x[k0 .. k0 + 16) with the inputs past K read as zero. */
LB_AVX512 static inline __m512 load16(const float *x, int64_t k0, int64_t K) {
    if (k0 + 16 <= K) return _mm512_loadu_ps(x + k0);
    return k0 < K ? _mm512_maskz_loadu_ps((__mmask16)((1u << (K - k0)) - 1), x + k0)
                  : _mm512_setzero_ps();
}

/* As rows_avx2 below with the 16 values in one register: one vpermps per 16 weights. */
LB_AVX512 static void rows_avx512(const lb_linear *L, const float *x, float *y, int64_t n0,
                                  int64_t n1) {
    const int64_t K = L->k, kp = (K + 31) / 32 * 32, kg = L->kg, G = (kp + kg - 1) / kg;
    const float *tables = (const float *)L->z, *scales = (const float *)L->s;
    const __m512i low4 = _mm512_set1_epi32(15);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = (const uint8_t *)L->w + n * L->ld;
        __m512 total = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            const __m512 t = _mm512_loadu_ps(tables + (L->block ? (n * G + g) * 16 : 0));
            __m512 acc = _mm512_setzero_ps();
            const int64_t end = (g + 1) * kg < kp ? (g + 1) * kg : kp;
            for (int64_t k = g * kg; k < end; k += 32) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + k / 2)));
                acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, low4), t),
                                      load16(x, k, K), acc);
                acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t),
                                      load16(x, k + 16, K), acc);
            }
            total = scales ? _mm512_fmadd_ps(acc, _mm512_set1_ps(scales[n * G + g]), total)
                           : _mm512_add_ps(total, acc);
        }
        y[n] = _mm512_reduce_add_ps(total) + (L->bias ? L->bias[n] : 0.0f);
    }
}

/* Rows [n0, n1) of an LB_LUT4 linear on float32 activations x: AVX-512 where the loop's
 * int8 kernels run on it (lowbit_loop_has_vnni), else AVX2. */
void lowbit_lut4_rows(const lb_linear *L, const float *x, float *y, int64_t n0, int64_t n1) {
    if (lowbit_loop_has_vnni()) rows_avx512(L, x, y, n0, n1);
    else rows_avx2(L, x, y, n0, n1);
}

static void rows_avx2(const lb_linear *L, const float *x, float *y, int64_t n0, int64_t n1) {
    const int64_t K = L->k, kp = (K + 31) / 32 * 32, kg = L->kg, G = (kp + kg - 1) / kg;
    const float *tables = (const float *)L->z, *scales = (const float *)L->s;
    const __m256i low4 = _mm256_set1_epi32(15);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = (const uint8_t *)L->w + n * L->ld;
        __m256 total = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            const float *t = tables + (L->block ? (n * G + g) * 16 : 0);
            const __m256 lo = _mm256_loadu_ps(t), hi = _mm256_loadu_ps(t + 8);
            __m256 acc = _mm256_setzero_ps();
            const int64_t end = (g + 1) * kg < kp ? (g + 1) * kg : kp;
            for (int64_t k = g * kg; k < end; k += 32) {
                const uint8_t *b = w + k / 2;
                const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b));
                const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 8)));
                acc = _mm256_fmadd_ps(pick(lo, hi, _mm256_and_si256(v0, low4)), load8(x, k, K), acc);
                acc = _mm256_fmadd_ps(pick(lo, hi, _mm256_and_si256(v1, low4)), load8(x, k + 8, K), acc);
                acc = _mm256_fmadd_ps(pick(lo, hi, _mm256_srli_epi32(v0, 4)), load8(x, k + 16, K), acc);
                acc = _mm256_fmadd_ps(pick(lo, hi, _mm256_srli_epi32(v1, 4)), load8(x, k + 24, K), acc);
            }
            total = scales ? _mm256_fmadd_ps(acc, _mm256_set1_ps(scales[n * G + g]), total)
                           : _mm256_add_ps(total, acc);
        }
        y[n] = hsum8(total) + (L->bias ? L->bias[n] : 0.0f);
    }
}

/* The weight [N, K] of a 4-bit lookup layer for a prefill's GEMM, from lowbit's canonical
 * packing (formats/packing.py: byte j of a row holds input 2j in its low nibble, 2j + 1 in
 * its high one; ldp bytes per row): w[n, k] = T[u] * s[n, k / kg] with one shared table T
 * and per-group scales, or w[n, k] = T[n, k / kg][u] with per_row tables [N, G, 16] and no
 * scales. Each product is the float32 one formats.scaling.dequantize forms, then stored as
 * float32 or (bf16) rounded to bfloat16: the same numbers as the torch path. */
void lowbit_lut4_dequant(const uint8_t *packed, int64_t N, int64_t K, int64_t ldp,
                         const float *tables, int64_t per_row, const float *scales,
                         int64_t kg, int64_t bf16, void *out) {
    const int64_t G = (K + kg - 1) / kg;
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *p = packed + n * ldp;
        float *of = (float *)out + n * K;
        uint16_t *oh = (uint16_t *)out + n * K;
        for (int64_t g = 0; g < G; g++) {
            const float *t = tables + (per_row ? (n * G + g) * 16 : 0);
            const float s = scales ? scales[n * G + g] : 1.0f; /* x * 1.0f is exact */
            float tv[16];
            for (int i = 0; i < 16; i++) tv[i] = t[i] * s;
            const __m256 lo = _mm256_loadu_ps(tv), hi = _mm256_loadu_ps(tv + 8);
            const int64_t end = (g + 1) * kg < K ? (g + 1) * kg : K;
            int64_t k = g * kg;
            for (; k + 8 <= end && k % 2 == 0; k += 8) {
                int32_t word;
                memcpy(&word, p + k / 2, 4);
                const __m256i idx = _mm256_and_si256(
                    _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), _mm256_set1_epi32(15));
                put8(of, oh, k, pick(lo, hi, idx), bf16);
            }
            for (; k < end; k++) put1(of, oh, k, tv[(p[k / 2] >> (4 * (k % 2))) & 15], bf16);
        }
    }
}

/* int32 lanes of sum_j T16[u_j] * x_j over one block of 32 inputs: codes c16 (16 bytes, as
 * LB_LUT4), table byte planes tl / th in both lanes, xa / xb the block's int8 codes
 * sign-extended to int16 in unpack order (inputs 0-7 | 16-23 and 8-15 | 24-31). */
static inline __m256i lut16_dot(const uint8_t *c16, __m256i tl, __m256i th, __m256i xa,
                                __m256i xb) {
    const __m128i c = _mm_loadu_si128((const __m128i *)c16);
    const __m256i idx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(c, 4), c),
                                         _mm256_set1_epi8(15)); /* inputs 0-15 | 16-31 */
    const __m256i lo = _mm256_shuffle_epi8(tl, idx), hi = _mm256_shuffle_epi8(th, idx);
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpacklo_epi8(lo, hi), xa),
                            _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, hi), xb));
}

static inline __m256i plane(const uint8_t *p) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
}

/* R (1..4, a constant where inlined) rows from n of an LB_LUT4Q linear: they share each
 * block's activation codes. */
static inline __attribute__((always_inline)) void lut4q_rows(const lb_linear *L, const lb_q8 *a,
                                                             float *y, int64_t n, const int R) {
    const int64_t kp = (L->k + 31) / 32 * 32, kg = L->kg, G = (kp + kg - 1) / kg;
    const uint8_t *planes = (const uint8_t *)L->z, *w = (const uint8_t *)L->w;
    const float *sc = (const float *)L->s;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    for (int64_t b = 0; b < kp / 32; b++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(a->xq + 32 * b));
        const __m256i sign = _mm256_cmpgt_epi8(_mm256_setzero_si256(), xv);
        const __m256i xa = _mm256_unpacklo_epi8(xv, sign), xb = _mm256_unpackhi_epi8(xv, sign);
        const __m256 d = _mm256_loadu_ps(a->dl + 8 * b);
        const int64_t g = 32 * b / kg;
        for (int r = 0; r < R; r++) {
            const uint8_t *t = planes + (L->block ? ((n + r) * G + g) * 32 : 0);
            const __m256i sum = lut16_dot(w + (n + r) * L->ld + 16 * b, plane(t), plane(t + 16),
                                          xa, xb);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum),
                                     _mm256_mul_ps(d, _mm256_set1_ps(sc[(n + r) * G + g])), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[n + r] = hsum8(acc[r]) + (L->bias ? L->bias[n + r] : 0.0f);
}

/* Rows [n0, n1) of an LB_LUT4Q linear on the int8 activations a (AVX2). */
void lowbit_lut4_q8_rows(const lb_linear *L, const lb_q8 *a, float *y, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) lut4q_rows(L, a, y, n, 4);
    for (; n < n1; n++) lut4q_rows(L, a, y, n, 1);
}
