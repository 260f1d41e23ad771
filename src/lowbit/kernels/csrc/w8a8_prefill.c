/* W8A8's activation codes for many rows in one pass (AVX2 + OpenMP): the prefill side of
 * kernels/int8_dynamic.py, whose quantize_per_token / quantize_per_tensor it matches bit
 * for bit on the same input.
 *
 * Each row r = x[m, :], first rotated by the Kronecker product of nf factors where nf > 0
 * (lowbit_rotate_vector: QuaRot's online Hadamard rotation, Ashkboos et al., 2024, sec. 3),
 * becomes codes round(r / s) (half to even) clamped to [-127, 127], with s = act_scale
 * (static, > 0) or max(max_k |r_k|, 1e-12) / 127 (dynamic, per token). The rows sharing an
 * input (q/k/v, gate/up) are quantized once and their integer GEMMs read the same codes.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "lowbit_native.h"

static float row_scale(const float *r, int64_t K) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 top = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(r + k)));
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, top);
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
    for (; k < K; k++) {
        const float a = r[k] < 0.0f ? -r[k] : r[k];
        amax = a > amax ? a : amax;
    }
    return (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
}

static inline __m256i codes8(const float *r, __m256 s) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(r), s),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    return _mm256_cvtps_epi32(v);
}

static void row_codes(const float *r, int64_t K, float s, int8_t *out) {
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) { /* 4 x 8 int32 -> 32 int8, lanes put back in order */
        const __m256i ab = _mm256_packs_epi32(codes8(r + k, vs), codes8(r + k + 8, vs));
        const __m256i cd = _mm256_packs_epi32(codes8(r + k + 16, vs), codes8(r + k + 24, vs));
        const __m256i bytes = _mm256_packs_epi16(ab, cd);
        _mm256_storeu_si256((__m256i *)(out + k), _mm256_permutevar8x32_epi32(bytes, order));
    }
    for (; k < K; k++) {
        const float c = nearbyintf(r[k] / s);
        out[k] = (int8_t)(c > 127.0f ? 127.0f : (c < -127.0f ? -127.0f : c));
    }
}

/* codes [M, K] int8 and scales [M] (act_scale when static) of x [M, K]; 0, or -2 when a
 * thread's rotation buffer could not be allocated. */
int lowbit_w8a8_quantize_rows(const float *x, int64_t M, int64_t K, int64_t nf,
                              const int64_t *sizes, const float *factors, float act_scale,
                              int8_t *codes, float *scales) {
    int failed = 0;
#pragma omp parallel if (M * K >= 32768)
    {
        float *buf = nf ? malloc(2 * K * sizeof(float)) : NULL;
        if (nf && buf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const float *r = x + m * K;
            if (nf) {
                if (buf == NULL) continue;
                r = lowbit_rotate_vector(r, K, nf, sizes, factors, buf, buf + K);
            }
            const float s = act_scale > 0.0f ? act_scale : row_scale(r, K);
            row_codes(r, K, s, codes + m * K);
            scales[m] = s;
        }
        free(buf);
    }
    return failed ? -2 : 0;
}

/* In place: acc [M, N] int32 becomes float32 (acc * xscale[m]) * wscale[n], rounded after
 * each product as torch.mul(acc, xscale).mul_(wscale) rounds; xscale NULL: acc * wscale[n]
 * (the static scale folded into wscale). Bias is left to the caller. */
void lowbit_w8a8_dequant(int32_t *acc, int64_t M, int64_t N, const float *xscale,
                         const float *wscale) {
#pragma omp parallel for schedule(static) if (M * N >= 65536)
    for (int64_t m = 0; m < M; m++) {
        int32_t *row = acc + m * N;
        float *out = (float *)row;
        const __m256 xs = _mm256_set1_ps(xscale ? xscale[m] : 1.0f);
        int64_t n = 0;
        for (; n + 8 <= N; n += 8) {
            __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(row + n)));
            if (xscale) v = _mm256_mul_ps(v, xs);
            _mm256_storeu_ps(out + n, _mm256_mul_ps(v, _mm256_loadu_ps(wscale + n)));
        }
        for (; n < N; n++) {
            float v = (float)row[n];
            if (xscale) v = v * xscale[m];
            out[n] = v * wscale[n];
        }
    }
}
