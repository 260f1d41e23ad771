/* A whole Llama-style decode step in one call: every block, the final norm and the output
 * head over lowbit's packed weights (runtime/native_loop.py builds the descriptor).
 *
 * One OpenMP region per token. Every thread keeps its own copy of the residual stream and
 * computes its norm; the elementwise work after it (the normalized vector, SiLU x up, the
 * activations' int8 blocks) is split over the threads by blocks of 32, as is every linear
 * (by rows) and the attention (by heads), with a barrier between the stages that depend on
 * each other; only RoPE and the cache write run on one thread. The step is DecoderRuntime's
 * eager decode:
 *
 *   h = rmsnorm(x);  q, k, v = h Wq, h Wk, h Wv;  a = attend(rope(q), rope(k) -> cache, v)
 *   x += a Wo;  h = rmsnorm(x);  x += (silu(h Wg) * h Wu) Wd;   logits = rmsnorm(x) Wh
 *
 * Linears run float32 activations (the reference: the GEMVs of gemv_avx2.c and the small
 * loops below) or, with model->q8, int8 activations per block of 32 as llama.cpp's
 * Q8_0 x Q8_0 and Q4_0 x Q8_0 dot products (ggml-cpu/arch/x86/quants.c; csrc/q8_vnni.c;
 * on AVX512-VNNI the 4-bit and int8 weights in tiles of 16 rows, csrc/q8_tiles.c).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lowbit_native.h"
#include "simd_avx2.h"


static int64_t up64(int64_t k) { return (k + 63) / 64 * 64; }

static int64_t use_vnni = 1;

/* Whether the int8 dot products run q8_vnni.c (the CPU has AVX512-VNNI and lowbit_loop_isa
 * did not turn it off) or q8_avx2.c. */
int64_t lowbit_loop_has_vnni(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                __builtin_cpu_supports("avx512vnni");
    }
    return known && use_vnni;
}

/* Whether AVX-512 (F, DQ) float kernels may run (prefill_attention.c): the CPU has them
 * and lowbit_loop_isa did not ask for AVX2 only. */
int64_t lowbit_avx512_allowed(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
    }
    return known && use_vnni;
}

int64_t lowbit_loop_isa(int64_t vnni) {
    const int64_t before = use_vnni;
    use_vnni = vnni;
    return before;
}

static inline __m256 widen8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}


static float f32_row(const float *x, const float *w, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_loadu_ps(w + k + 8), a1);
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; k < K; k++) s += x[k] * w[k];
    return s;
}

/* sum_g s[g] sum_{k in g} x[k] q[k], groups of 32 (K a multiple of 32) */
static float i8g_row(const float *x, const int8_t *q, const float *s, int64_t K) {
    __m256 tot = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / 32; g++) {
        const float *xg = x + 32 * g;
        const int8_t *qg = q + 32 * g;
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(xg), widen8(qg));
        a = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 8), widen8(qg + 8), a);
        a = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 16), widen8(qg + 16), a);
        a = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 24), widen8(qg + 24), a);
        tot = _mm256_fmadd_ps(a, _mm256_set1_ps(s[g]), tot);
    }
    return hsum8(tot);
}

static void split(int64_t units, int t, int T, int64_t *a, int64_t *b) {
    *a = units * t / T;
    *b = units * (t + 1) / T;
}

/* Thread t's blocks of 32 among the `count` values of a vector (padded to 64 for q8). */
static void blocks(int64_t count, int t, int T, int64_t *b0, int64_t *b1) {
    split(up64(count) / 32, t, T, b0, b1);
}

/* Each LB_I4T consumer's prepared activations (gemv_avx2.c) from the complete x: one thread,
 * after a barrier; nothing where no consumer is LB_I4T. */
static void prepare_i4t(const float *x, const lb_linear *const *ls, int count) {
    int any = 0;
    for (int i = 0; i < count; i++) any |= ls[i]->kind == LB_I4T && !ls[i]->nf;
    if (!any) return;
#pragma omp barrier
#pragma omp single
    for (int i = 0; i < count; i++)
        if (ls[i]->kind == LB_I4T && !ls[i]->nf)
            lowbit_int4_prepare(x, ls[i]->k, ls[i]->ld, ls[i]->kg, ls[i]->scratch);
}

/* h = rmsnorm(xt (+= d)) * w on thread t's blocks, and their int8 blocks (a); xt is this
 * thread's residual copy, updated whole (every thread computes the same numbers). Then a
 * barrier: h and a are complete. */
static void norm_stage(float *xt, const float *d, int64_t E, const float *w, float eps,
                       float *h, const lb_q8 *a, const lb_linear *const *ls, int count, int t,
                       int T) {
    if (d)
        for (int64_t i = 0; i < E; i++) xt[i] += d[i];
    const float inv = lowbit_rms_inverse(xt, E, eps);
    int64_t b0, b1;
    blocks(E, t, T, &b0, &b1);
    for (int64_t i = 32 * b0; i < 32 * b1 && i < E; i++) h[i] = xt[i] * inv * w[i];
    if (a) lowbit_q8_fill_blocks(h, E, a, b0, b1);
#pragma omp barrier
    prepare_i4t(h, ls, count);
}

/* int8 blocks of the complete vector x (K values) on thread t's blocks, then a barrier. */
static void q8_stage(const float *x, int64_t K, const lb_q8 *a, const lb_linear *const *ls,
                     int count, int t, int T) {
    int64_t b0, b1;
    blocks(K, t, T, &b0, &b1);
    if (a) lowbit_q8_fill_blocks(x, K, a, b0, b1);
#pragma omp barrier
    prepare_i4t(x, ls, count);
}

static int tiled(const lb_linear *L) {
    return L->kind == LB_Q4C || L->kind == LB_I8C || L->kind == LB_L4C;
}

/* Units [u0, u1) of y = x W^T + b (a: int8 activations, or NULL): blocks of an LB_I4T
 * weight, tiles of 16 rows (LB_Q4C / LB_I8C / LB_L4C), else groups of 4 rows. */
static void rows(const lb_linear *L, const float *x, const lb_q8 *a, float *y, int64_t u0,
                 int64_t u1) {
    const int64_t n = L->n, K = L->k;
    if (tiled(L)) { /* only built for int8 activations */
        if (a) lowbit_q8_tiles(L, a, y, u0, u1);
        else for (int64_t r = 16 * u0; r < 16 * u1 && r < n; r++) y[r] = NAN;
        return;
    }
    if (L->kind == LB_I4T) {
        lowbit_int4_gemv_range(x, K, L->w, L->np, L->ld, L->block, L->s, L->kg, L->bias, y, n,
                               L->scratch, u0, u1);
        return;
    }
    const int64_t n0 = 4 * u0, n1 = 4 * u1 < n ? 4 * u1 : n;
    if (L->kind == LB_LUT4) {
        lowbit_lut4_rows(L, x, y, n0, n1);
        return;
    }
    if (L->kind == LB_LUT4Q) { /* only built for int8 activations (native_loop.py) */
        if (a) lowbit_lut4_q8_rows(L, a, y, n0, n1);
        else for (int64_t r = n0; r < n1; r++) y[r] = NAN;
        return;
    }
    if (a && L->kind != LB_F32) {
        if (lowbit_loop_has_vnni()) lowbit_q8_rows(L, a, y, n0, n1);
        else lowbit_q8_rows_avx2(L, a, y, n0, n1);
        return;
    }
    if (L->kind == LB_Q4R) { /* only built for int8 activations (native_loop.py) */
        for (int64_t r = n0; r < n1; r++) y[r] = NAN;
        return;
    }
    if (L->kind == LB_I8) {
        lowbit_int8_gemv_range(x, K, L->w, L->ld, L->s, L->bias, y, n0, n1);
        return;
    }
    for (int64_t r = n0; r < n1; r++) {
        float v = L->kind == LB_F32 ? f32_row(x, (const float *)L->w + r * L->ld, K)
                                    : i8g_row(x, (const int8_t *)L->w + r * L->ld,
                                              (const float *)L->s + r * (K / 32), K);
        y[r] = v + (L->bias ? L->bias[r] : 0.0f);
    }
}

/* Floats of one thread's scratch for linears that prepare their own input (own_rows). */
static int64_t own_floats(int64_t kp) { return 4 * kp + 64; }

/* Rows [n0, n1) of LB_W8A8 on the (rotated) input v: codes per token or with the static
 * scale, exactly as gemv_avx2.c's lowbit_w8a8_gemv; the integer sums by VNNI where the CPU
 * has it, else the AVX2 loop on float codes (exact below 2^24). rest: 2 kp floats. */
static void w8a8_rows(const lb_linear *L, const float *v, float *y, int64_t n0, int64_t n1,
                      float *rest) {
    const int64_t K = L->k, kp = up64(K);
    float *codes = rest;
    int8_t *xq = (int8_t *)(rest + kp);
    const float s = lowbit_w8a8_codes(v, K, L->act_scale, codes);
    int32_t sum = 0;
    for (int64_t i = 0; i < kp; i++) {
        xq[i] = i < K ? (int8_t)codes[i] : 0;
        sum += xq[i];
    }
    if (lowbit_loop_has_vnni()) lowbit_w8a8_dot(L, xq, sum, y, n0, n1);
    else lowbit_int8_gemv_range(codes, K, L->w, L->ld, NULL, NULL, y, n0, n1);
    const float *ws = L->s, *b = L->bias;
    for (int64_t n = n0; n < n1; n++)
        y[n] = L->act_scale > 0.0f ? (b ? fmaf(y[n], ws[n], b[n]) : y[n] * ws[n])
                                   : y[n] * s * ws[n] + (b ? b[n] : 0.0f);
}

/* Units [u0, u1) of a linear that prepares its own input on each thread, with no barrier
 * (every thread computes the same numbers into ts, own_floats(kp) floats): rotated by its
 * Kronecker factors, then W8A8's codes, the int8 blocks (q8), or LB_I4T's activations. */
static void own_rows(const lb_linear *L, const float *x, int q8, float *y, int64_t u0,
                     int64_t u1, float *ts) {
    const int64_t K = L->k, kp = up64(K);
    const float *v = L->nf ? lowbit_rotate_vector(x, K, L->nf, L->sizes, L->factors, ts,
                                                  ts + kp) : x;
    float *rest = ts + 2 * kp;
    if (L->kind == LB_W8A8) {
        w8a8_rows(L, v, y, 4 * u0, 4 * u1 < L->n ? 4 * u1 : L->n, rest);
    } else if (q8 && L->kind != LB_F32 && L->kind != LB_LUT4) {
        const lb_q8 own = lowbit_q8_carve(rest, K);
        lowbit_q8_fill(v, K, &own);
        rows(L, v, &own, y, u0, u1);
    } else if (L->kind == LB_I4T) {
        lb_linear with = *L;
        with.scratch = rest;
        lowbit_int4_prepare(v, K, L->ld, L->kg, rest);
        rows(&with, v, NULL, y, u0, u1);
    } else {
        rows(L, v, NULL, y, u0, u1);
    }
}

/* Thread t of T computes its share of y = x W^T + b: a contiguous range of units (a
 * dynamic split into chunks measured slower: the threads' weight streams interleave). */
static void part(const lb_linear *L, const float *x, const lb_q8 *a, float *y, int t, int T,
                 float *ts) {
    const int64_t units = L->kind == LB_I4T ? lowbit_int4_units(L->np, L->block)
                          : tiled(L) ? (L->n + 15) / 16
                                                                   : (L->n + 3) / 4;
    int64_t u0, u1;
    split(units, t, T, &u0, &u1);
    if (L->nf || L->kind == LB_W8A8) own_rows(L, x, a != NULL, y, u0, u1, ts);
    else rows(L, x, a, y, u0, u1);
}

static int64_t kmax(const lb_model *m) {
    int64_t k = m->hidden > m->inter ? m->hidden : m->inter;
    return up64(k > m->heads * m->head_dim ? k : m->heads * m->head_dim);
}

/* Floats of model->work: the step's vectors, the attention scores, int8 activations. */
int64_t lowbit_loop_work_floats(const lb_model *m) {
    const int64_t hd = m->heads * m->head_dim, kd = m->kv_heads * m->head_dim;
    return 3 * m->hidden + 2 * hd + 2 * kd + 2 * m->inter + m->heads * m->max_len +
           lowbit_q8_floats(kmax(m)) +
           (m->hidden + own_floats(kmax(m))) * (m->threads > 0 ? m->threads : 1);
}

/* One decode step at position pos: embed (hidden floats) in, logits (vocab floats) out;
 * the caches get this position's k and v. */
void lowbit_decode_step(const lb_model *m, const float *embed, int64_t pos, float *logits) {
    const int64_t E = m->hidden, H = m->heads, Hkv = m->kv_heads, D = m->head_dim;
    float *h = m->work + E, *o = h + E, *q = o + E, *att = q + H * D;
    float *k = att + H * D, *v = k + Hkv * D, *g = v + Hkv * D, *u = g + m->inter;
    float *scores = u + m->inter;
    const lb_q8 q8 = lowbit_q8_carve(scores + H * m->max_len, kmax(m));
    const lb_q8 *a = m->q8 ? &q8 : NULL;
    const float *cos = m->cos + pos * D, *sin = m->sin + pos * D;
    float *xs = scores + H * m->max_len + lowbit_q8_floats(kmax(m)); /* per thread:
                                                             residual copy, scratch */
    int nt = omp_get_max_threads() < m->threads ? omp_get_max_threads() : (int)m->threads;
    nt = nt > 0 ? nt : 1; /* a descriptor never bound (threads 0) runs on one thread */
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        float *xt = xs + t * (E + own_floats(kmax(m))), *ts = xt + E;
        int64_t h0, h1, i0, i1;
        split(H, t, T, &h0, &h1);
        memcpy(xt, embed, E * sizeof(float));
        for (int64_t l = 0; l < m->n_layers; l++) {
            const lb_layer *L = m->layers + l;
            const lb_linear *qkv[3] = {&L->q, &L->k, &L->v}, *os[1] = {&L->o};
            const lb_linear *gu[2] = {&L->gate, &L->up}, *ds[1] = {&L->down};
            norm_stage(xt, l ? o : NULL, E, L->in_norm, L->in_eps, h, a, qkv, 3, t, T);
            part(&L->q, h, a, q, t, T, ts);
            part(&L->k, h, a, k, t, T, ts);
            part(&L->v, h, a, v, t, T, ts);
#pragma omp barrier
#pragma omp single
            lowbit_attend_write(q, k, v, 1, H, Hkv, D, pos, m->max_len, cos, sin, L->kcache,
                                L->vcache);
            lowbit_attend_heads(q, H, Hkv, D, pos, m->max_len, L->kcache, L->vcache,
                                m->attn_scale, att, scores, h0, h1);
#pragma omp barrier
            q8_stage(att, H * D, a, os, 1, t, T);
            part(&L->o, att, a, o, t, T, ts);
#pragma omp barrier
            norm_stage(xt, o, E, L->post_norm, L->post_eps, h, a, gu, 2, t, T);
            part(&L->gate, h, a, g, t, T, ts);
            part(&L->up, h, a, u, t, T, ts);
#pragma omp barrier
            blocks(m->inter, t, T, &i0, &i1);
            i1 = 32 * i1 < m->inter ? 32 * i1 : m->inter;
            if (32 * i0 < i1) silu_mul8(g + 32 * i0, u + 32 * i0, i1 - 32 * i0, g + 32 * i0);
            q8_stage(g, m->inter, a, ds, 1, t, T);
            part(&L->down, g, a, o, t, T, ts);
#pragma omp barrier
        }
        const lb_linear *hs[1] = {m->head};
        norm_stage(xt, o, E, m->final_norm, m->final_eps, h, a, hs, 1, t, T);
        part(m->head, h, a, logits, t, T, ts);
    }
}

/* One linear on its own (tests, the measured choice): y = x W^T + b, q8: int8 activations. */
void lowbit_linear_apply(const lb_linear *L, const float *x, float *y, int64_t q8) {
    float *buf = q8 ? malloc(lowbit_q8_floats(L->k) * sizeof(float)) : NULL;
    const lb_q8 q = lowbit_q8_carve(buf, L->k);
    const lb_q8 *a = q8 ? &q : NULL;
    const lb_linear *ls[1] = {L};
    const int64_t own = own_floats(up64(L->k));
    float *scratch = malloc(own * omp_get_max_threads() * sizeof(float));
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        q8_stage(x, L->k, a, ls, 1, t, T);
        part(L, x, a, y, t, T, scratch + t * own);
    }
    free(scratch);
    free(buf);
}
