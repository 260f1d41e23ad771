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
 * the row blocks; each block is read from cache while its rows are written in order.
 */
#include <stdint.h>
#include <string.h>

#include "simd_avx2.h"


/* Rows r0 .. r0 + R of one block at blk (kp * R / 2 bytes). */
static void dequant_block(const uint8_t *blk, int64_t R, int interleaved, int64_t r0,
                          int64_t np, int64_t kp, const uint16_t *sz, int64_t kg, int bf16,
                          void *out, float *row) {
    const int64_t half = R / 2;
    for (int64_t r = 0; r < R; r++) {
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
