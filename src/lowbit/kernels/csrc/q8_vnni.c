/* Dot products of int8 activations (blocks of 32, as llama.cpp's Q8_0) with lowbit's int8
 * and 4-bit weights on AVX512-VNNI, for csrc/decode_loop.c.
 *
 * Activations: Q8_0's quantization (quantize_row_q8_0_ref, round-half-even): per block of
 * 32 the scale d = max|x| / 127 and codes round(x / d); padded with zeros to a multiple of 64.
 * Weights (lowbit_native.h): LB_I8 int8 with one scale per row, LB_I8G int8 with a float
 * scale per 32 inputs (Q8_0), LB_Q4R unsigned 4-bit codes u with bf16 (s, z) per 32 inputs,
 * w = (u - 8) s + z.
 *
 * vpdpbusd multiplies unsigned by signed bytes and sums 4 products per int32 lane: per 64
 * inputs one instruction gives 16 lanes, lanes 0-7 of the first 32-input block and 8-15 of
 * the second. int8 weights are offset by +128 (one XOR) and 4-bit codes are unsigned
 * already; the offsets (128 or 8 times each lane's code sum) are the accumulator's start
 * value, precomputed once per activation vector. Lane sums times their block's scales
 * accumulate in float32. Four rows share every activation load; per 512 inputs a row's 16
 * block scales are loaded once and each 64-input chunk picks its pair with one permute.
 * Built with target attributes: callers run it only where the CPU has AVX512-VNNI.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "lowbit_native.h"

#define LB_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define LB_INLINE static inline __attribute__((always_inline))

static int64_t up64(int64_t k) { return (k + 63) / 64 * 64; }

int64_t lowbit_q8_floats(int64_t k) { return 5 * up64(k) / 4 + up64(k) / 8 + 16; }

lb_q8 lowbit_q8_carve(float *p, int64_t k) {
    const int64_t kp = up64(k), b = 5 * kp / 4;
    lb_q8 a = {(int8_t *)p, p + kp / 4, p + kp / 2, (int32_t *)(p + 3 * kp / 4),
               (int32_t *)(p + kp), p + b, p + b + kp / 32, (int32_t *)(p + b + kp / 16),
               (int32_t *)(p + b + 3 * kp / 32)};
    return a;
}

/* Q8_0's quantization of x[0..K) into a: whole blocks 8 lanes at a time (cvtps rounds to
 * nearest even, as nearbyintf), the rest scalar; then the per-lane sums and offsets. */
void lowbit_q8_fill(const float *x, int64_t K, const lb_q8 *a) {
    lowbit_q8_fill_blocks(x, K, a, 0, up64(K) / 32);
}

/* lowbit_q8_fill of blocks [b0, b1) only (32 inputs each, up64(K) / 32 in all). */
void lowbit_q8_fill_blocks(const float *x, int64_t K, const lb_q8 *a, int64_t b0, int64_t b1) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 32 * b0; b < 32 * b1; b += 32) {
        float d;
        if (b + 32 <= K) {
            __m256 v[4], m = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_loadu_ps(x + b + 8 * i);
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            d = _mm_cvtss_f32(h) / 127.0f;
            const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
            __m256i c[4];
            for (int i = 0; i < 4; i++) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
            const __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]),
                                                 _mm256_packs_epi32(c[2], c[3]));
            _mm256_storeu_si256((__m256i *)(a->xq + b), _mm256_permutevar8x32_epi32(q, order));
        } else {
            float amax = 0.0f;
            for (int64_t k = b; k < b + 32 && k < K; k++) amax = fmaxf(amax, fabsf(x[k]));
            d = amax / 127.0f;
            const float inv = d > 0.0f ? 1.0f / d : 0.0f;
            for (int64_t k = b; k < b + 32; k++)
                a->xq[k] = k < K ? (int8_t)nearbyintf(x[k] * inv) : 0;
        }
        int32_t sum = 0;
        for (int64_t l = b / 4; l < (b + 32) / 4; l++) {
            const int32_t s = a->xq[4 * l] + a->xq[4 * l + 1] + a->xq[4 * l + 2] + a->xq[4 * l + 3];
            a->dl[l] = d;
            a->dls[l] = d * (float)s;
            a->n8[l] = -8 * s;
            a->n128[l] = -128 * s;
            sum += s;
        }
        a->bd[b / 32] = d;
        a->bds[b / 32] = d * (float)sum;
        a->bn8[b / 32] = -8 * sum;
        a->bn128[b / 32] = -128 * sum;
    }
}

/* lowbit_q8_fill into a buffer of lowbit_q8_floats(K) floats laid out as lowbit_q8_carve. */
void lowbit_q8_quantize(const float *x, int64_t K, float *buf) {
    const lb_q8 a = lowbit_q8_carve(buf, K);
    lowbit_q8_fill(x, K, &a);
}

/* PICK[j]: lanes 0-7 take block 2j of 16 loaded scales, lanes 8-15 block 2j + 1 */
static const int32_t PICK[8][16] = {
#define LB_P(j) {2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, \
                 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1}
    LB_P(0), LB_P(1), LB_P(2), LB_P(3), LB_P(4), LB_P(5), LB_P(6), LB_P(7)
#undef LB_P
};

/* Scales of 8 chunks (16 blocks) of one row as floats: bf16 (Q4R) or float (I8G), the
 * blocks past `blocks` zero. */
LB_VNNI LB_INLINE __m512 scales16(const void *p, int kind, int64_t blocks) {
    const __mmask16 m = blocks >= 16 ? 0xFFFF : (__mmask16)((1u << blocks) - 1);
    if (kind == LB_I8G) return _mm512_maskz_loadu_ps(m, p);
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* R rows (n .. n + R) of one weight: y[r] = sum over inputs, before the per-row scale. */
LB_VNNI LB_INLINE void rows_q8(const lb_linear *L, const lb_q8 *a, int64_t n, const int R,
                               const int kind, float *out) {
    const int64_t K = L->k, kv = kind == LB_Q4R ? up64(K) : K / 64 * 64;
    const int64_t G = kind == LB_Q4R ? kv / 32 : K / 32;
    const __m512i flip = _mm512_set1_epi8((char)0x80), low4 = _mm512_set1_epi8(0x0F);
    const int32_t *off = kind == LB_Q4R ? a->n8 : a->n128;
    __m512 f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
    __m512 sc[4] = {0}, zc[4] = {0};
    for (int64_t c = 0; c < kv / 64; c++) {
        const __m512i xv = _mm512_loadu_si512(a->xq + 64 * c);
        const __m512i o = _mm512_loadu_si512(off + 16 * c);
        const __m512 dl = _mm512_loadu_ps(a->dl + 16 * c);
        const __m512i pick = _mm512_loadu_si512(PICK[c & 7]);
        for (int r = 0; r < R; r++) {
            __m512i acc;
            if (kind == LB_Q4R) {
                const uint8_t *w = (const uint8_t *)L->w + n * L->ld + 128 * c + 32 * r;
                const __m256i b = _mm256_loadu_si256((const __m256i *)w);
                const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(b),
                                                        _mm256_srli_epi16(b, 4), 1);
                acc = _mm512_dpbusd_epi32(o, _mm512_and_si512(both, low4), xv);
            } else {
                const int8_t *w = (const int8_t *)L->w + (n + r) * L->ld + 64 * c;
                acc = _mm512_dpbusd_epi32(o, _mm512_xor_si512(_mm512_loadu_si512(w), flip), xv);
            }
            if (kind == LB_I8) {
                f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), dl, f[r]);
                continue;
            }
            if ((c & 7) == 0 && kind == LB_I8G)
                sc[r] = scales16((const float *)L->s + (n + r) * G + 2 * c, kind, G - 2 * c);
            if ((c & 7) == 0 && kind == LB_Q4R) { /* [n / 4, G / 16, 4, 16] */
                const int64_t at = (n * ((G + 15) / 16) + 4 * (c / 8) + r) * 16;
                sc[r] = scales16((const uint16_t *)L->s + at, kind, 16);
                if (L->z) zc[r] = scales16((const uint16_t *)L->z + at, kind, 16);
            }
            if (kind == LB_Q4R && L->z) /* z x: z d (code sum), before the scaled sum */
                f[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pick, zc[r]),
                                       _mm512_loadu_ps(a->dls + 16 * c), f[r]);
            const __m512 s = _mm512_permutexvar_ps(pick, sc[r]);
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(dl, s), f[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        float t = _mm512_reduce_add_ps(f[r]);
        if (kind != LB_Q4R) { /* inputs past the last 64: scalar */
            const int8_t *w = (const int8_t *)L->w + (n + r) * L->ld;
            for (int64_t k = kv; k < K; k++)
                t += a->dl[k / 4] * (float)(w[k] * a->xq[k]) *
                     (kind == LB_I8G ? ((const float *)L->s)[(n + r) * G + k / 32] : 1.0f);
        }
        out[r] = t;
    }
}

LB_VNNI static void rows_of(const lb_linear *L, const lb_q8 *a, float *y, int64_t n0,
                            int64_t n1, const int kind) {
    float t[4];
    if (kind == LB_Q4R) { /* groups of four rows; n0 is a multiple of 4 */
        for (int64_t n = n0; n < n1; n += 4) {
            rows_q8(L, a, n, 4, kind, t);
            for (int r = 0; r < 4 && n + r < n1; r++) y[n + r] = t[r];
        }
        return;
    }
    for (int64_t n = n0; n < n1; n++) { /* row by row: one sequential stream */
        rows_q8(L, a, n, 1, kind, t);
        y[n] = t[0];
    }
}

/* Rows [n0, n1) of an LB_I8 / LB_I8G / LB_Q4R linear on int8 activations a. */
LB_VNNI void lowbit_q8_rows(const lb_linear *L, const lb_q8 *a, float *y, int64_t n0,
                            int64_t n1) {
    if (L->kind == LB_Q4R) rows_of(L, a, y, n0, n1, LB_Q4R);
    else if (L->kind == LB_I8G) rows_of(L, a, y, n0, n1, LB_I8G);
    else rows_of(L, a, y, n0, n1, LB_I8);
    for (int64_t n = n0; n < n1; n++) {
        if (L->kind == LB_I8) y[n] *= ((const float *)L->s)[n];
        if (L->bias) y[n] += L->bias[n];
    }
}

/* y[n] = sum_k w[n, k] xq[k] as a float for rows [n0, n1) of an LB_W8A8 weight (int8
 * [n, ld]) and int8 codes xq (zero past k, to a multiple of 64; codesum their sum): the
 * integer sum in int32 lanes, exact, the weights offset by +128 and 128 codesum removed. */
LB_VNNI void lowbit_w8a8_dot(const lb_linear *L, const int8_t *xq, int32_t codesum, float *y,
                             int64_t n0, int64_t n1) {
    const int64_t K = L->k, chunks = up64(K) / 64;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __mmask64 last = K % 64 ? ((__mmask64)1 << (K % 64)) - 1 : ~(__mmask64)0;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *w = (const int8_t *)L->w + n * L->ld;
        __m512i acc = _mm512_setzero_si512();
        for (int64_t c = 0; c < chunks; c++) {
            const __m512i wv = c + 1 < chunks ? _mm512_loadu_si512(w + 64 * c)
                                              : _mm512_maskz_loadu_epi8(last, w + 64 * c);
            acc = _mm512_dpbusd_epi32(acc, _mm512_xor_si512(wv, flip),
                                      _mm512_loadu_si512(xq + 64 * c));
        }
        y[n] = (float)(_mm512_reduce_add_epi32(acc) - 128 * codesum);
    }
}
