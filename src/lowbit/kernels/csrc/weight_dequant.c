/* Float weights for prefill's GEMM, the torch paths' numbers exactly.
 *
 * int8 codes with a float scale per group of kg inputs (symmetric, e.g. the Q8_0 head of the
 * gguf recipes): w[n, k] = q * s, one float32 product, as formats.scaling.dequantize.
 *
 * torch's int4 CPU layout (kernels/int4_weight.py): w[n, k] = u * s + (z - 8 s) with (s, z) the bf16 pair of row n's group of kg inputs, in
 * float32: one product, then one sum (as int4_weight._dequantize_padded's mul_ and add_;
 * ISO C mode contracts nothing into an FMA), written as float32 or rounded to bfloat16
 * (nearest, ties to even, as torch's .to(torch.bfloat16) of finite numbers).
 *
 * Layout (int4_weight._layout): rows in blocks of B; for each input k a block holds B / 2
 * bytes. An interleaved full block keeps row j in the low nibble of byte j and row j + B / 2
 * in the high nibble; a pair block (a short last block, or every block when not interleaved)
 * keeps rows 2j, 2j + 1 in byte j. The output is [np, kp], padding included. Threads split
 * the row blocks; each block is read from cache while its rows are written: 8 rows x 8
 * inputs per step, turned from input-major to row-major in registers (AVX2).
 */
#include <stdint.h>
#include <string.h>

#include "simd_avx2.h"


/* The codes of rows r .. r + 7 at one input (col: that input's B / 2 bytes) as floats. */
static inline __m256 codes8(const uint8_t *col, int64_t r, int64_t half, int interleaved) {
    const __m128i m = _mm_set1_epi8(15);
    __m128i b;
    if (interleaved) {  /* rows r .. r + 7 share one nibble of 8 bytes */
        const int high = r >= half;
        b = _mm_loadl_epi64((const __m128i *)(col + (high ? r - half : r)));
        b = _mm_and_si128(high ? _mm_srli_epi16(b, 4) : b, m);
    } else {  /* rows 2j, 2j + 1 in byte j: 4 bytes, low nibble first */
        int32_t w;
        memcpy(&w, col + r / 2, 4);
        const __m128i v = _mm_cvtsi32_si128(w);
        b = _mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}

/* v[i] (input i, lane j = row j) -> v[j] (row j, lane i = input i). */
static inline void transpose8(__m256 v[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        v[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* Rows n .. n + 7 (block rows r .. r + 7): per group their 8 scales and shifts, then 8 x 8
 * tiles of (input, row) turned into rows in registers and stored 8 inputs at a time. */
static void dequant_rows8(const uint8_t *blk, int64_t r, int64_t half, int interleaved,
                          int64_t n, int64_t np, int64_t kp, const uint16_t *sz, int64_t kg,
                          int64_t bf16, void *out) {
    float *of = (float *)out;
    uint16_t *oh = (uint16_t *)out;
    for (int64_t g = 0; g < kp / kg; g++) {
        float sv[8], hv[8];
        for (int j = 0; j < 8; j++) {
            sv[j] = bf16_to_f32(sz[2 * (g * np + n + j)]);
            hv[j] = bf16_to_f32(sz[2 * (g * np + n + j) + 1]) - 8.0f * sv[j];
        }
        const __m256 vs = _mm256_loadu_ps(sv), vh = _mm256_loadu_ps(hv);
        for (int64_t k = g * kg; k < (g + 1) * kg; k += 8) {
            __m256 v[8];
            for (int i = 0; i < 8; i++)
                v[i] = _mm256_add_ps(_mm256_mul_ps(codes8(blk + (k + i) * half, r, half,
                                                          interleaved), vs), vh);
            transpose8(v);
            for (int j = 0; j < 8; j++) put8(of + (n + j) * kp, oh + (n + j) * kp, k, v[j], bf16);
        }
    }
}

/* Rows r0 .. r0 + R of one block at blk (kp * R / 2 bytes): 8 rows at a time, the rest
 * one by one. */
static void dequant_block(const uint8_t *blk, int64_t R, int interleaved, int64_t r0,
                          int64_t np, int64_t kp, const uint16_t *sz, int64_t kg, int bf16,
                          void *out, float *row) {
    const int64_t half = R / 2;
    int64_t r = 0;
    if (kg % 8 == 0)
        for (; r + 8 <= R; r += 8)
            dequant_rows8(blk, r, half, interleaved, r0 + r, np, kp, sz, kg, bf16, out);
    for (; r < R; r++) {
        const int64_t byte = interleaved ? r % half : r / 2;
        const int high = interleaved ? r >= half : r & 1;
        const int64_t n = r0 + r;
        for (int64_t g = 0; g < kp / kg; g++) {
            const float s = bf16_to_f32(sz[2 * (g * np + n)]);
            const float shift = bf16_to_f32(sz[2 * (g * np + n) + 1]) - 8.0f * s;
            for (int64_t k = g * kg; k < (g + 1) * kg; k++) {
                const uint8_t b = blk[k * half + byte];
                const float u = (float)(high ? b >> 4 : b & 15);
                const float p = u * s;
                row[k] = p + shift;
            }
        }
        if (bf16) {
            uint16_t *o = (uint16_t *)out + n * kp;
            for (int64_t k = 0; k < kp; k++) o[k] = to_bf16(row[k]);
        } else {
            memcpy((float *)out + n * kp, row, kp * sizeof(float));
        }
    }
}

/* packed: uint8 [np, kp / 2] in the layout above (B rows per block, interleaved or not);
 * sz: bf16 [kp / kg, np, 2]; out: [np, kp] float32 (bf16 = 0) or bfloat16 (bf16 = 1). */
void lowbit_int4_dequant(const uint8_t *packed, int64_t np, int64_t kp, int64_t B,
                         int64_t interleaved, const uint16_t *sz, int64_t kg, int64_t bf16,
                         void *out) {
    const int64_t blocks = (np + B - 1) / B;
#pragma omp parallel
    {
        float row[kp];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t R = np - b * B < B ? np - b * B : B;
            dequant_block(packed + b * B * kp / 2, R, interleaved && R == B, b * B, np, kp,
                          sz, kg, (int)bf16, out, row);
        }
    }
}

/* w [N, K] (float32, or bf16 rounded to nearest even) of int8 codes q [N, ldq] and scales
 * [N, ceil(K / kg)]. */
void lowbit_int8_dequant(const int8_t *q, int64_t N, int64_t K, int64_t ldq,
                         const float *scales, int64_t kg, int64_t bf16, void *out) {
    const int64_t G = (K + kg - 1) / kg;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *qn = q + n * ldq;
        float *of = (float *)out + n * K;
        uint16_t *oh = (uint16_t *)out + n * K;
        for (int64_t g = 0; g < G; g++) {
            const float s = scales[n * G + g];
            const __m256 vs = _mm256_set1_ps(s);
            const int64_t end = (g + 1) * kg < K ? (g + 1) * kg : K;
            int64_t k = g * kg;
            for (; k + 8 <= end; k += 8)
                put8(of, oh, k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                    _mm_loadl_epi64((const __m128i *)(qn + k)))), vs), bf16);
            for (; k < end; k++) put1(of, oh, k, (float)qn[k] * s, bf16);
        }
    }
}
