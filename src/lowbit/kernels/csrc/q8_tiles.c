/* int8 activations (Q8_0 blocks of 32, q8_vnni.c) times 4-bit or int8 weights stored in
 * tiles of 16 rows (LB_Q4C, LB_I8C in lowbit_native.h), for csrc/decode_loop.c.
 *
 * The row-major kernels of q8_vnni.c sum each row's 64-input chunk in 16 lanes and pay per
 * chunk a permute, a conversion and two float operations per row. Here the 16 lanes are 16
 * rows: one vpdpbusd takes 4 inputs of each of the 16 rows (one dword per row) against the
 * same 4 activation codes broadcast from memory, so a block of 32 inputs costs 8 vpdpbusd
 * per 16 rows, and the block's int32 sums meet their float scales once, 16 rows at a time,
 * with no horizontal reduction (the layout llama.cpp's x86 repacked and AMX paths use for
 * small batches, ggml-cpu/amx/mmq.cpp). The unsigned weight offsets (8 for 4-bit codes,
 * 128 for int8 stored as w + 128) start each block's accumulator: -8 or -128 times the
 * block's code sum.
 *
 * Per block b of row r, with d the activations' block scale and S their code sum:
 *   Q4C: y += d s[r,b] (sum_k u x - 8 S) + d S z[r,b]       (w = (u - 8) s + z)
 *   L4C: y += d s[r,b] (sum_k (T[u] + 128) x - 128 S)       (w = T[u] s, T int8: IQ4_NL;
 *        vpshufb turns 64 codes into T[u] + 128 at once)
 *   I8C: y += d s[r,b] (sum_k (w + 128) x - 128 S)          (kg 32; kg 0: s[r] at the end)
 * tiles_ref computes the same integers and the same float operations in the same order
 * (scalar C: the reference, and the path where the CPU lacks AVX512-VNNI).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "lowbit_native.h"

/* bytes ahead of the current block that each block prefetches into L1: the hardware
 * prefetchers alone left the loads waiting (Intel Xeon, AMX generation: SmolLM2 gguf:q4_0
 * decode 209 tok/s without, 233-249 at 512 bytes ahead, 292-303 at 2048, 263-271 at 4096) */
#define PREFETCH 2048
#define LB_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

static float bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* steps of 4 inputs per block: 4 bytes (8 codes) each for Q4C / L4C, 8 for I8C */
static int steps_of(const lb_linear *L) { return L->kind == LB_I8C ? 8 : 4; }

__attribute__((target("f16c"))) static float half(uint16_t h) { return _cvtsh_ss(h); }

static void tiles_ref(const lb_linear *L, const lb_q8 *a, float *y, int64_t t0, int64_t t1) {
    const int64_t G = L->ld, S = steps_of(L), tile = G * S * 64;
    for (int64_t t = t0; t < t1; t++)
        for (int r = 0; r < 16 && 16 * t + r < L->n; r++) {
            const int64_t row = 16 * t + r;
            float f = 0.0f;
            for (int64_t b = 0; b < G; b++) {
                const uint8_t *w = (const uint8_t *)L->w + t * tile + b * S * 64 + 4 * r;
                const int8_t *x = a->xq + 32 * b;
                const uint8_t *T = (const uint8_t *)L->z; /* L4C: T + 128 per code */
                int32_t acc = L->kind == LB_Q4C ? a->bn8[b] : a->bn128[b];
                for (int m = 0; m < S; m++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t c = w[64 * m + j];
                        if (L->kind == LB_Q4C)
                            acc += (c & 15) * x[4 * m + j] + (c >> 4) * x[16 + 4 * m + j];
                        else if (L->kind == LB_L4C)
                            acc += T[c & 15] * x[4 * m + j] + T[c >> 4] * x[16 + 4 * m + j];
                        else
                            acc += c * x[4 * m + j];
                    }
                const int64_t at = (t * G + b) * 16 + r;
                if (L->kind == LB_L4C) {
                    f = fmaf((float)acc, half(((const uint16_t *)L->s)[at]) * a->bd[b], f);
                } else if (L->kind == LB_Q4C) {
                    f = fmaf((float)acc, bf16(((const uint16_t *)L->s)[at]) * a->bd[b], f);
                    if (L->z) f = fmaf(bf16(((const uint16_t *)L->z)[at]), a->bds[b], f);
                } else {
                    f = fmaf((float)acc, L->kg ? ((const float *)L->s)[at] * a->bd[b] : a->bd[b],
                             f);
                }
            }
            if (L->kind == LB_I8C && !L->kg) f *= ((const float *)L->s)[row];
            y[row] = f + (L->bias ? L->bias[row] : 0.0f);
        }
}

LB_VNNI static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

LB_VNNI static void tiles_vnni(const lb_linear *L, const lb_q8 *a, float *y, int64_t t0,
                               int64_t t1) {
    const int64_t G = L->ld, S = steps_of(L), tile = G * S * 64;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i table = L->kind == LB_L4C
        ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)L->z)) : low4;
    const int32_t *x4 = (const int32_t *)a->xq;
    for (int64_t t = t0; t < t1; t++) {
        const uint8_t *w = (const uint8_t *)L->w + t * tile;
        __m512 f = _mm512_setzero_ps();
        for (int64_t b = 0; b < G; b++, w += S * 64) {
            const int32_t *xb = x4 + 8 * b;
            __m512i acc0, acc1 = _mm512_setzero_si512();
            for (int m = 0; m < S; m++)
                _mm_prefetch((const char *)w + PREFETCH + 64 * m, _MM_HINT_T0);
            if (L->kind == LB_L4C) { /* codes -> T + 128 by vpshufb, then as int8 */
                acc0 = _mm512_set1_epi32(a->bn128[b]);
                for (int m = 0; m < 4; m++) {
                    const __m512i v = _mm512_loadu_si512(w + 64 * m);
                    const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(v, low4));
                    const __m512i hi = _mm512_shuffle_epi8(
                        table, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
                    acc0 = _mm512_dpbusd_epi32(acc0, lo, _mm512_set1_epi32(xb[m]));
                    acc1 = _mm512_dpbusd_epi32(acc1, hi, _mm512_set1_epi32(xb[4 + m]));
                }
            } else if (L->kind == LB_Q4C) {
                acc0 = _mm512_set1_epi32(a->bn8[b]);
                for (int m = 0; m < 4; m++) {
                    const __m512i v = _mm512_loadu_si512(w + 64 * m);
                    acc0 = _mm512_dpbusd_epi32(acc0, _mm512_and_si512(v, low4),
                                               _mm512_set1_epi32(xb[m]));
                    acc1 = _mm512_dpbusd_epi32(acc1,
                                               _mm512_and_si512(_mm512_srli_epi16(v, 4), low4),
                                               _mm512_set1_epi32(xb[4 + m]));
                }
            } else {
                acc0 = _mm512_set1_epi32(a->bn128[b]);
                for (int m = 0; m < 8; m += 2) {
                    acc0 = _mm512_dpbusd_epi32(acc0, _mm512_loadu_si512(w + 64 * m),
                                               _mm512_set1_epi32(xb[m]));
                    acc1 = _mm512_dpbusd_epi32(acc1, _mm512_loadu_si512(w + 64 * m + 64),
                                               _mm512_set1_epi32(xb[m + 1]));
                }
            }
            const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1));
            const __m512 d = _mm512_set1_ps(a->bd[b]);
            const int64_t at = (t * G + b) * 16;
            if (L->kind == LB_L4C) {
                const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)L->s + at));
                f = _mm512_fmadd_ps(sum, _mm512_mul_ps(_mm512_cvtph_ps(h), d), f);
            } else if (L->kind == LB_Q4C) {
                f = _mm512_fmadd_ps(sum, _mm512_mul_ps(bf16x16((const uint16_t *)L->s + at), d),
                                    f);
                if (L->z)
                    f = _mm512_fmadd_ps(bf16x16((const uint16_t *)L->z + at),
                                        _mm512_set1_ps(a->bds[b]), f);
            } else {
                f = _mm512_fmadd_ps(sum, L->kg ? _mm512_mul_ps(
                                                     _mm512_loadu_ps((const float *)L->s + at), d)
                                               : d,
                                    f);
            }
        }
        if (L->kind == LB_I8C && !L->kg)
            f = _mm512_mul_ps(f, _mm512_loadu_ps((const float *)L->s + 16 * t));
        const int64_t left = L->n - 16 * t;
        const __mmask16 keep = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
        if (L->bias) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(keep, L->bias + 16 * t));
        _mm512_mask_storeu_ps(y + 16 * t, keep, f);
    }
}

void lowbit_q8_tiles(const lb_linear *L, const lb_q8 *a, float *y, int64_t t0, int64_t t1) {
    if (lowbit_loop_has_vnni()) tiles_vnni(L, a, y, t0, t1);
    else tiles_ref(L, a, y, t0, t1);
}
