/* Weight-only int8 / int4 GEMV for a few rows of float32 activations, AVX2 + FMA + OpenMP.
 *
 * Built by lowbit/kernels/native.py (gcc -O3 -mavx2 -mfma -fopenmp) and called through
 * ctypes. Decode multiplies 1..31 activation rows by a weight matrix that is read once per
 * token: the loops read 1 byte (int8) or half a byte (int4) per weight and widen it in
 * registers; int8 accumulates in float32 (bound by memory bandwidth), int4 in int32 per
 * group against int16-rounded activations (bound by the widening here). Threads split
 * the output channels (OpenMP: the runtime torch already loaded, so torch.set_num_threads
 * applies).
 *
 * int8: y[m, n] = scale[n] * sum_k x[m, k] q[n, k] + bias[n]; q is [N, ldq] row-major;
 *       scale (and bias) may be NULL: 1 (and 0).
 * w8a8: the input rotated by a Kronecker product of small factors (optional: nf = 0 for none),
 *       quantized to int8 codes per token (dynamic: s = max |x| / 127, codes round(x / s),
 *       y = sum * s * wscale[n]) or with one calibrated scale (static: act_scale > 0, codes
 *       clamped to [-127, 127], y = sum * wscale[n] with wscale = act_scale * s_w), then the
 *       int8 loop on the codes (every product and partial sum below 2^24 is exact).
 * int4: torch's _weight_int4pack_mm_for_cpu layout with interleaved row blocks of B rows
 *       (B = 32 on AVX2, 64 on AVX-512 builds): for block b and input k, B/2 bytes; byte j
 *       holds row j in its low nibble and row j + B/2 in its high nibble. A short last
 *       block of R rows packs rows 2j, 2j + 1 into byte j. The weight is
 *       w = (u - 8) * s + z with (s, z) bf16 pairs sz[g, n, 0..1], groups of kg inputs;
 *       per group we accumulate sum x u and apply s and (z - 8 s) * sum x once.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd_avx2.h"

#ifndef PREFETCH
#define PREFETCH 4096
#endif

static inline __m256 widen8_i8(const int8_t *p) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

/* Four output channels at once: each x vector is loaded once for four weight rows. */
static void int8_rows4(const float *x, int64_t K, const int8_t *q, int64_t ldq, float out[4]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if ((k & 63) == 0) { /* one prefetch per cache line and row, PREFETCH bytes ahead */
            _mm_prefetch((const char *)(q + k + PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char *)(q + ldq + k + PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char *)(q + 2 * ldq + k + PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char *)(q + 3 * ldq + k + PREFETCH), _MM_HINT_T0);
        }
        __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(xv, widen8_i8(q + k), a0);
        a1 = _mm256_fmadd_ps(xv, widen8_i8(q + ldq + k), a1);
        a2 = _mm256_fmadd_ps(xv, widen8_i8(q + 2 * ldq + k), a2);
        a3 = _mm256_fmadd_ps(xv, widen8_i8(q + 3 * ldq + k), a3);
    }
    out[0] = hsum8(a0); out[1] = hsum8(a1); out[2] = hsum8(a2); out[3] = hsum8(a3);
    for (; k < K; k++) {
        for (int r = 0; r < 4; r++) out[r] += x[k] * (float)q[r * ldq + k];
    }
}

static float int8_row(const float *x, int64_t K, const int8_t *q) {
    __m256 a = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), widen8_i8(q + k), a);
    float s = hsum8(a);
    for (; k < K; k++) s += x[k] * (float)q[k];
    return s;
}

void lowbit_int8_gemv(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t ldq,
                      const float *scale, const float *bias, float *y, int64_t N) {
    int64_t chunks = N / 4;
#pragma omp parallel for schedule(static) if (N * K >= 65536)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t n = 4 * c;
        for (int64_t m = 0; m < M; m++) {
            float acc[4];
            int8_rows4(x + m * K, K, q + n * ldq, ldq, acc);
            for (int r = 0; r < 4; r++)
                y[m * N + n + r] = acc[r] * (scale ? scale[n + r] : 1.0f) +
                                   (bias ? bias[n + r] : 0.0f);
        }
    }
    for (int64_t n = 4 * chunks; n < N; n++) {
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = int8_row(x + m * K, K, q + n * ldq) * (scale ? scale[n] : 1.0f) +
                           (bias ? bias[n] : 0.0f);
    }
}

/* fwht_axis of one contiguous s-long vector (s >= 8, a power of two) in AVX2: the passes
 * h = 1, 2, 4 inside each 8-lane vector (partner lanes by permutes, sw + v * (+-1) being
 * exactly u + v or u - v), the wider ones on whole vectors; bit for bit the scalar passes. */
static void fwht_contiguous(float *x, int64_t s, float norm) {
    const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
    const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
    const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
    for (int64_t j = 0; j < s; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        v = _mm256_fmadd_ps(v, s1, _mm256_permute_ps(v, 0xB1));
        v = _mm256_fmadd_ps(v, s2, _mm256_permute_ps(v, 0x4E));
        v = _mm256_fmadd_ps(v, s4, _mm256_permute2f128_ps(v, v, 1));
        _mm256_storeu_ps(x + j, v);
    }
    for (int64_t h = 8; h < s; h *= 2)
        for (int64_t i = 0; i < s; i += 2 * h)
            for (int64_t j = i; j < i + h; j += 8) {
                const __m256 u = _mm256_loadu_ps(x + j), v = _mm256_loadu_ps(x + j + h);
                _mm256_storeu_ps(x + j, _mm256_add_ps(u, v));
                _mm256_storeu_ps(x + j + h, _mm256_sub_ps(u, v));
            }
    const __m256 vn = _mm256_set1_ps(norm);
    for (int64_t j = 0; j < s; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), vn));
}

/* fwht_axis of the consecutive s-long blocks (s = 2 or 4) of x[0 .. total), total a
 * multiple of 8: fwht_contiguous's in-register passes h < s, bit for bit the scalar ones. */
static void fwht_small(float *x, int64_t total, int64_t s, float norm) {
    const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
    const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1), vn = _mm256_set1_ps(norm);
    for (int64_t j = 0; j < total; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        v = _mm256_fmadd_ps(v, s1, _mm256_permute_ps(v, 0xB1));
        if (s == 4) v = _mm256_fmadd_ps(v, s2, _mm256_permute_ps(v, 0x4E));
        _mm256_storeu_ps(x + j, _mm256_mul_ps(v, vn));
    }
}

/* In-place normalized Walsh-Hadamard transform (Sylvester order) of the s-long axis with
 * stride `inner` of each of the `outer` blocks: log2(s) butterfly passes instead of s
 * multiply-adds per entry. */
static void fwht_axis(float *x, int64_t outer, int64_t s, int64_t inner) {
    const float norm = 1.0f / sqrtf((float)s);
    if (inner == 1 && (s == 2 || s == 4) && (outer * s) % 8 == 0) {
        fwht_small(x, outer * s, s, norm);
        return;
    }
    for (int64_t o = 0; o < outer; o++) {
        float *xo = x + o * s * inner;
        if (inner == 1 && s >= 8) {
            fwht_contiguous(xo, s, norm);
            continue;
        }
        for (int64_t h = 1; h < s; h *= 2) {
            for (int64_t i = 0; i < s; i += 2 * h) {
                if (inner == 1) {
                    for (int64_t j = i; j < i + h; j++) {
                        const float u = xo[j], v = xo[j + h];
                        xo[j] = u + v;
                        xo[j + h] = u - v;
                    }
                    continue;
                }
                for (int64_t j = i; j < i + h; j++) {
                    float *p = xo + j * inner, *q = xo + (j + h) * inner;
                    for (int64_t r = 0; r < inner; r++) {
                        const float u = p[r], v = q[r];
                        p[r] = u + v;
                        q[r] = u - v;
                    }
                }
            }
        }
        for (int64_t k = 0; k < s * inner; k++) xo[k] *= norm;
    }
}

/* out[c0 .. c0 + 8 nv) of output j of dense_axis; nv is a constant at every call, so the
 * accumulators unroll into registers (an array indexed at run time would live in memory
 * and chain every multiply-add through a store). */
static inline __attribute__((always_inline)) void axis_lanes(
    const float *x, float *out, int64_t s, int64_t inner, const float *f, int64_t j, int64_t c0,
    const int nv) {
    __m256 acc[6];
    for (int v = 0; v < nv; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t i = 0; i < s; i++) {
        const __m256 b = _mm256_set1_ps(inner == 1 ? x[i] : f[i * s + j]);
        const float *row = inner == 1 ? f + i * s + c0 : x + i * inner + c0;
        for (int v = 0; v < nv; v++) acc[v] = _mm256_fmadd_ps(b, _mm256_loadu_ps(row + 8 * v), acc[v]);
    }
    for (int v = 0; v < nv; v++) _mm256_storeu_ps(out + c0 + 8 * v, acc[v]);
}

/* to[j, r] = sum_i f[i, j] x[i, r] for one s x inner block (f row-major s x s): with inner
 * 1 the outputs are the vector lanes, else the inner entries; each output sums i = 0..s-1
 * in order with one fused multiply-add per term, 6 vectors at a time (independent chains
 * hide the multiply-add latency). */
static void dense_axis(const float *x, float *to, int64_t s, int64_t inner, const float *f) {
    const int64_t span = inner == 1 ? s : inner, lanes = span - span % 8;
    for (int64_t j = 0; j < (inner == 1 ? 1 : s); j++) {
        float *out = inner == 1 ? to : to + j * inner;
        int64_t c0 = 0;
        for (; c0 + 48 <= lanes; c0 += 48) axis_lanes(x, out, s, inner, f, j, c0, 6);
        for (; c0 + 32 <= lanes; c0 += 32) axis_lanes(x, out, s, inner, f, j, c0, 4);
        for (; c0 + 16 <= lanes; c0 += 16) axis_lanes(x, out, s, inner, f, j, c0, 2);
        for (; c0 < lanes; c0 += 8) axis_lanes(x, out, s, inner, f, j, c0, 1);
        for (int64_t c = lanes; c < span; c++) { /* the last span % 8 outputs */
            float t = 0.0f;
            for (int64_t i = 0; i < s; i++)
                t = inner == 1 ? fmaf(x[i], f[i * s + c], t) : fmaf(f[i * s + j], x[i * inner + c], t);
            out[c] = t;
        }
    }
}

/* dense_axis for inner 2 or 4 (s a multiple of 8 / inner): a vector holds 8 / inner
 * outputs j times their inner entries; input i's entries repeated across it (one broadcast)
 * meet the matching coefficients f[i, j] (built once per call into coef). Each output sums
 * i = 0..s-1 in order, as dense_axis. */
#define NARROW_MAX 64 /* largest s of dense_axis_narrow */

static void dense_axis_narrow(const float *x, float *to, int64_t outer, int64_t s,
                              int64_t inner, const float *f) {
    /* the coefficient vectors of the last factor seen by this thread, rebuilt when the
     * factor's entries (compared by value: a freed factor's address may be reused) change */
    static __thread __m256 coef[NARROW_MAX * NARROW_MAX / 2];
    static __thread float seen[NARROW_MAX * NARROW_MAX];
    static __thread int64_t seen_s, seen_inner;
    const int64_t per = 8 / inner, nv = s / per; /* output vectors per block */
    if (seen_s != s || seen_inner != inner || memcmp(seen, f, s * s * sizeof(float))) {
        for (int64_t i = 0; i < s; i++)
            for (int64_t v = 0; v < nv; v++) {
                float lanes[8];
                for (int l = 0; l < 8; l++) lanes[l] = f[i * s + v * per + l / inner];
                coef[i * nv + v] = _mm256_loadu_ps(lanes);
            }
        memcpy(seen, f, s * s * sizeof(float));
        seen_s = s, seen_inner = inner;
    }
    for (int64_t o = 0; o < outer; o++) {
        const float *xo = x + o * s * inner;
        float *out = to + o * s * inner;
        for (int64_t v0 = 0; v0 < nv; v0 += 6) {
            const int64_t w = nv - v0 < 6 ? nv - v0 : 6;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
            for (int64_t i = 0; i < s; i++) {
                const __m256 b = inner == 4
                    ? _mm256_broadcast_ps((const __m128 *)(xo + 4 * i))
                    : _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(xo + 2 * i)));
                const __m256 *c = coef + i * nv + v0;
                a0 = _mm256_fmadd_ps(c[0], b, a0);
                if (w > 1) a1 = _mm256_fmadd_ps(c[1], b, a1);
                if (w > 2) a2 = _mm256_fmadd_ps(c[2], b, a2);
                if (w > 3) a3 = _mm256_fmadd_ps(c[3], b, a3);
                if (w > 4) a4 = _mm256_fmadd_ps(c[4], b, a4);
                if (w > 5) a5 = _mm256_fmadd_ps(c[5], b, a5);
            }
            const __m256 acc[6] = {a0, a1, a2, a3, a4, a5};
            for (int64_t v = 0; v < w; v++) _mm256_storeu_ps(out + 8 * (v0 + v), acc[v]);
        }
    }
}

/* x[n] (viewed as the grid |sizes[0]| x ... x |sizes[nf - 1]|, last fastest) times the
 * Kronecker product of the factors, axis a contracted with factor a, as formats/rotation.py's
 * rotate. A factor of size s > 0 is a dense row-major s x s block of `factors`; s < 0 is the
 * normalized Sylvester matrix of size -s (no entries), applied by fwht_axis. Returns the
 * buffer holding the result (x or tmp). */
static float *kron_rotate(float *x, float *tmp, int64_t n, int64_t nf, const int64_t *sizes,
                          const float *factors) {
    int64_t inner = n;
    for (int64_t a = 0; a < nf; a++) {
        const int64_t s = sizes[a] < 0 ? -sizes[a] : sizes[a];
        inner /= s;
        const int64_t outer = n / (inner * s);
        if (sizes[a] < 0) {
            fwht_axis(x, outer, s, inner);
            continue;
        }
        if ((inner == 2 || inner == 4) && s % (8 / inner) == 0 && s <= NARROW_MAX) {
            dense_axis_narrow(x, tmp, outer, s, inner, factors);
        } else {
            for (int64_t o = 0; o < outer; o++)
                dense_axis(x + o * s * inner, tmp + o * s * inner, s, inner, factors);
        }
        factors += s * s;
        float *t = x; x = tmp; tmp = t;
    }
    return x;
}

/* y[m, :] = x[m, :] rotated as kron_rotate, row by row; tmp: K floats. */
static void rotate_rows(const float *x, int64_t M, int64_t K, int64_t nf, const int64_t *sizes,
                        const float *factors, float *y, float *tmp) {
    for (int64_t m = 0; m < M; m++) {
        float *row = y + m * K;
        memcpy(row, x + m * K, K * sizeof(float));
        float *r = kron_rotate(row, tmp, K, nf, sizes, factors);
        if (r != row) memcpy(row, r, K * sizeof(float));
    }
}

/* One vector rotated as kron_rotate (buf, tmp: K floats each); returns buf or tmp. */
float *lowbit_rotate_vector(const float *x, int64_t K, int64_t nf, const int64_t *sizes,
                            const float *factors, float *buf, float *tmp) {
    memcpy(buf, x, K * sizeof(float));
    return kron_rotate(buf, tmp, K, nf, sizes, factors);
}

/* Weight-only layers that rotate their input, in one call: the input rotated (rotate_rows)
 * into rx (M * K + K floats), then lowbit_int8_gemv / lowbit_int4_gemv read it. */
void lowbit_rot_int8_gemv(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t ldq,
                          const float *scale, const float *bias, float *y, int64_t N,
                          int64_t nf, const int64_t *sizes, const float *factors, float *rx) {
    rotate_rows(x, M, K, nf, sizes, factors, rx, rx + M * K);
    lowbit_int8_gemv(rx, M, K, q, ldq, scale, bias, y, N);
}

/* W8A8's codes of one row r: round(r / s) clamped to [-127, 127] into codes (may be r),
 * with s = act_scale (static) or max(max |r|, 1e-12) / 127 (dynamic, per token: as
 * int8_dynamic.quantize_per_token); returns s. */
float lowbit_w8a8_codes(const float *r, int64_t K, float act_scale, float *codes) {
    float s = act_scale;
    if (s <= 0.0f) {
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fabsf(r[k]) > amax ? fabsf(r[k]) : amax;
        s = (amax > 1e-12f ? amax : 1e-12f) / 127.0f;
    }
    for (int64_t k = 0; k < K; k++) {
        const float c = nearbyintf(r[k] / s);
        codes[k] = c > 127.0f ? 127.0f : (c < -127.0f ? -127.0f : c);
    }
    return s;
}

/* scratch: at least 2 * M * K floats. */
void lowbit_w8a8_gemv(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t ldq,
                      const float *wscale, const float *bias, float *y, int64_t N,
                      float act_scale, int64_t nf, const int64_t *sizes, const float *factors,
                      float *scratch) {
    float *codes = scratch, *tmp = scratch + M * K, xscale[64];
    for (int64_t m = 0; m < M; m++) {
        float *row = codes + m * K;
        memcpy(row, x + m * K, K * sizeof(float));
        const float *r = nf ? kron_rotate(row, tmp, K, nf, sizes, factors) : row;
        xscale[m] = lowbit_w8a8_codes(r, K, act_scale, row);
    }
    lowbit_int8_gemv(codes, M, K, q, ldq, NULL, NULL, y, N);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t n = 0; n < N; n++) {
            const float v = y[m * N + n];
            if (act_scale > 0.0f) /* torch.addcmul(bias, acc, out_scale): one rounding */
                y[m * N + n] = bias ? fmaf(v, wscale[n], bias[n]) : v * wscale[n];
            else
                y[m * N + n] = v * xscale[m] * wscale[n] + (bias ? bias[n] : 0.0f);
        }
    }
}

/* Per row m: group sums of x (xs[m, g], zero beyond K), and x rounded to int16 with one
 * scale per row (xq[m, :kp], zero beyond K; xscale[m] = max |x| / 32767). */
static void prepare_x(const float *x, int64_t M, int64_t K, int64_t kp, int64_t kg, int64_t G,
                      float *xs, int16_t *xq, float *xscale) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fabsf(xm[k]) > amax ? fabsf(xm[k]) : amax;
        float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        xscale[m] = amax / 32767.0f;
        for (int64_t k = 0; k < kp; k++) xq[m * kp + k] = k < K ? (int16_t)lrintf(xm[k] * inv) : 0;
        for (int64_t g = 0; g < G; g++) {
            float t = 0.0f;
            int64_t end = (g + 1) * kg < K ? (g + 1) * kg : K;
            for (int64_t k = g * kg; k < end; k++) t += xm[k];
            xs[m * G + g] = t;
        }
    }
}

/* One interleaved block of B rows: out[r] = sum_k w[r, k] x[k] with w = (u - 8) s + z.
 * Two inputs k, k + 1 at a time: their bytes are interleaved so that each 16-bit lane pair
 * holds one row's nibbles (u[r, k], u[r, k + 1]), and vpmaddwd against the int16 pair
 * (xq[k], xq[k + 1]) sums both products in int32 (|sum| < 2^31 for groups up to 256 inputs:
 * 128 steps x 2 x 15 x 32767). One conversion to float per group instead of per input. */
static void int4_block(const int16_t *xq, float xscale, const float *xs, int64_t K, int64_t kg,
                       int64_t G, const uint8_t *blk, int64_t B, const uint32_t *sz,
                       int64_t np, int64_t n0, float *out /* [B] */) {
    const int64_t half = B / 2;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m256i hi16 = _mm256_set1_epi32((int)0xFFFF0000u);
    const int32_t *xpair = (const int32_t *)xq; /* xpair[k / 2] = (xq[k], xq[k + 1]), k even */
    /* the next block's (s, z) pairs: one strided cache line pair per group, else a miss each */
    for (int64_t g = 0; g < G && n0 + 2 * B <= np; g++) {
        for (int64_t r = 0; r < B; r += 16)
            _mm_prefetch((const char *)(sz + g * np + n0 + B + r), _MM_HINT_T0);
    }
    for (int64_t sub = 0; sub < half; sub += 16) {
        __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
        for (int64_t g = 0; g < G; g++) {
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            int64_t end = (g + 1) * kg < K ? (g + 1) * kg : K;
            for (int64_t k = g * kg; k < end; k += 2) { /* k + 1 may be padding: xq is 0 */
                if ((k & 3) == 0) /* 4 inputs x 16 bytes: one cache line */
                    _mm_prefetch((const char *)(blk + k * half + sub + PREFETCH), _MM_HINT_T0);
                __m128i b0 = _mm_loadu_si128((const __m128i *)(blk + k * half + sub));
                __m128i b1 = _mm_loadu_si128((const __m128i *)(blk + (k + 1) * half + sub));
                __m128i p0 = _mm_unpacklo_epi8(b0, b1), p1 = _mm_unpackhi_epi8(b0, b1);
                __m256i xv = _mm256_set1_epi32(xpair[k / 2]);
                __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(p0, low4));
                __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(p1, low4));
                __m256i w2 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(p0, 4), low4));
                __m256i w3 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(p1, 4), low4));
                a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(w0, xv));
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(w1, xv));
                a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(w2, xv));
                a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(w3, xv));
            }
            /* (s, z) of rows r..r+7 as 8 uint32: low half s, high half z (little-endian) */
            const uint32_t *row = sz + g * np + n0;
            __m256 xsum = _mm256_set1_ps(xs[g]), eight = _mm256_set1_ps(8.0f);
            __m256 xsc = _mm256_set1_ps(xscale);
#define LOWBIT_APPLY(acc, tot, r)                                                          \
    do {                                                                                   \
        __m256i v = _mm256_loadu_si256((const __m256i *)(row + (r)));                      \
        __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));                          \
        __m256 z = _mm256_castsi256_ps(_mm256_and_si256(v, hi16));                         \
        __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), xsc);                          \
        tot = _mm256_fmadd_ps(s, dot, tot);                                                \
        tot = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, s, z), xsum, tot);                   \
    } while (0)
            LOWBIT_APPLY(a0, t0, sub);
            LOWBIT_APPLY(a1, t1, sub + 8);
            LOWBIT_APPLY(a2, t2, half + sub);
            LOWBIT_APPLY(a3, t3, half + sub + 8);
#undef LOWBIT_APPLY
        }
        _mm256_storeu_ps(out + sub, t0);
        _mm256_storeu_ps(out + sub + 8, t1);
        _mm256_storeu_ps(out + half + sub, t2);
        _mm256_storeu_ps(out + half + sub + 8, t3);
    }
}

/* Rows of a short (non-interleaved) last block: row 2j low nibble, 2j + 1 high nibble. */
static float int4_tail_row(const float *x, const float *xs, int64_t K, int64_t kg, int64_t G,
                           const uint8_t *tail, int64_t R, int64_t j, const uint16_t *sz,
                           int64_t np, int64_t n) {
    float total = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        float acc = 0.0f;
        int64_t end = (g + 1) * kg < K ? (g + 1) * kg : K;
        for (int64_t k = g * kg; k < end; k++) {
            uint8_t b = tail[k * (R / 2) + j / 2];
            acc += x[k] * (float)((j & 1) ? (b >> 4) : (b & 15));
        }
        float s = bf16_to_f32(sz[2 * (g * np + n)]), z = bf16_to_f32(sz[2 * (g * np + n) + 1]);
        total += s * acc + (z - 8.0f * s) * xs[g];
    }
    return total;
}

/* packed: uint8 [np, kp / 2] in the layout above; sz: bf16 [kp / kg, np, 2]; x: [M, K]
 * float32 with K <= kp (the padded inputs meet zero activations); y: [M, N], N <= np;
 * scratch: at least M * (kp / 2 + kp / kg + 1) floats. */
void lowbit_int4_gemv(const float *x, int64_t M, int64_t K, const uint8_t *packed, int64_t np,
                      int64_t kp, int64_t B, const uint16_t *sz, int64_t kg, const float *bias,
                      float *y, int64_t N, float *scratch) {
    const int64_t G = kp / kg, full = np / B;
    int16_t *xq = (int16_t *)scratch;
    float *xs = scratch + M * kp / 2, *xscale = xs + M * G;
    prepare_x(x, M, K, kp, kg, G, xs, xq, xscale);
#pragma omp parallel for schedule(static) if (np * kp >= 65536)
    for (int64_t b = 0; b < full; b++) {
        float out[64];
        const uint8_t *blk = packed + b * kp * (B / 2);
        for (int64_t m = 0; m < M; m++) {
            int4_block(xq + m * kp, xscale[m], xs + m * G, K, kg, G, blk, B,
                       (const uint32_t *)sz, np, b * B, out);
            for (int64_t r = 0; r < B; r++) {
                int64_t n = b * B + r;
                if (n < N) y[m * N + n] = out[r] + (bias ? bias[n] : 0.0f);
            }
        }
    }
    const int64_t R = np - full * B;
    const uint8_t *tail = packed + full * B * kp / 2;
    for (int64_t j = 0; j < R; j++) {
        int64_t n = full * B + j;
        if (n >= N) break;
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = int4_tail_row(x + m * K, xs + m * G, K, kg, G, tail, R, j, sz,
                                         np, n) + (bias ? bias[n] : 0.0f);
    }
}

void lowbit_rot_int4_gemv(const float *x, int64_t M, int64_t K, const uint8_t *packed,
                          int64_t np, int64_t kp, int64_t B, const uint16_t *sz, int64_t kg,
                          const float *bias, float *y, int64_t N, float *scratch, int64_t nf,
                          const int64_t *sizes, const float *factors, float *rx) {
    rotate_rows(x, M, K, nf, sizes, factors, rx, rx + M * K);
    lowbit_int4_gemv(rx, M, K, packed, np, kp, B, sz, kg, bias, y, N, scratch);
}

/* ---- row ranges of one activation row, for a caller that splits rows over its threads
 * (csrc/decode_loop.c runs one OpenMP region per decode step and calls these inside it) */

/* y[n] for n in [n0, n1) as lowbit_int8_gemv with M = 1 (n0 a multiple of 4). */
void lowbit_int8_gemv_range(const float *x, int64_t K, const int8_t *q, int64_t ldq,
                            const float *scale, const float *bias, float *y, int64_t n0,
                            int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        float acc[4];
        int8_rows4(x, K, q + n * ldq, ldq, acc);
        for (int r = 0; r < 4; r++)
            y[n + r] = acc[r] * (scale ? scale[n + r] : 1.0f) + (bias ? bias[n + r] : 0.0f);
    }
    for (; n < n1; n++)
        y[n] = int8_row(x, K, q + n * ldq) * (scale ? scale[n] : 1.0f) + (bias ? bias[n] : 0.0f);
}

/* lowbit_int4_gemv's activation preparation for one row, into scratch (kp / 2 + kp / kg + 1
 * floats); lowbit_int4_gemv_range then reads it. */
void lowbit_int4_prepare(const float *x, int64_t K, int64_t kp, int64_t kg, float *scratch) {
    const int64_t G = kp / kg;
    prepare_x(x, 1, K, kp, kg, G, scratch + kp / 2, (int16_t *)scratch, scratch + kp / 2 + G);
}

/* Work units of an int4 weight: its full row blocks, then the rows of its short last block. */
int64_t lowbit_int4_units(int64_t np, int64_t B) {
    return np / B + (np - (np / B) * B);
}

/* Units [u0, u1) of lowbit_int4_gemv with M = 1 after lowbit_int4_prepare. */
void lowbit_int4_gemv_range(const float *x, int64_t K, const uint8_t *packed, int64_t np,
                            int64_t kp, int64_t B, const uint16_t *sz, int64_t kg,
                            const float *bias, float *y, int64_t N, const float *scratch,
                            int64_t u0, int64_t u1) {
    const int64_t G = kp / kg, full = np / B, R = np - full * B;
    const int16_t *xq = (const int16_t *)scratch;
    const float *xs = scratch + kp / 2, xscale = scratch[kp / 2 + G];
    float out[64];
    for (int64_t u = u0; u < u1; u++) {
        if (u < full) {
            int4_block(xq, xscale, xs, K, kg, G, packed + u * kp * (B / 2), B,
                       (const uint32_t *)sz, np, u * B, out);
            for (int64_t r = 0; r < B && u * B + r < N; r++)
                y[u * B + r] = out[r] + (bias ? bias[u * B + r] : 0.0f);
            continue;
        }
        const int64_t j = u - full, n = full * B + j;
        if (n < N)
            y[n] = int4_tail_row(x, xs, K, kg, G, packed + full * B * kp / 2, R, j, sz, np, n)
                   + (bias ? bias[n] : 0.0f);
    }
}
