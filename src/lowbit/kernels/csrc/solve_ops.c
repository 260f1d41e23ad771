/* The column loops of GPTQ and of its coordinate-descent refinement, for integer formats.
 *
 * Built with the decode kernels into one library (lowbit/kernels/native.py). Both loops
 * visit the columns of one lazy-batch block in order, and every row of the weight evolves
 * on its own given the block's slice of a shared matrix, so each row runs the whole block
 * in registers and cache (rows in parallel) instead of one torch call per column.
 * The torch loops in algorithms/gptq_columns.py and algorithms/refine.py are the reference; the
 * arithmetic here is theirs, operation for operation, rounding for rounding: the build's
 * -std=c11 implies -ffp-contract=off, so a product is fused into an add only where torch
 * fuses it too (GPTQ's rank-1 update with alpha = -1 on a contiguous row: fmaf), and the
 * results agree bit for bit here (tests/algorithms/test_native_solve.py).
 *
 * Each column j of the block has a parameter set (group): scale[g * rows + r] and, when
 * zero is not NULL, zero[g * rows + r], with g = group[j]. One column of one row:
 *     c = clamp(round_half_even(t / s + z), lo, hi),  q = (c - z) * s
 *
 * gptq_columns (Frantar et al., 2022, Algorithm 1, the inner loop of one block): for
 * columns j in [c0, c1) of a block of `width` columns, with t = W1[r, j]
 *     e = (t - q) / d[j];  W1[r, j:] = fma(-e, Hinv1[j, j:], W1[r, j:]);  Err1[r, j] = e
 *     codes[r, j] = c;  losses[r, j] = e^2 / 2
 * cd_columns (QuantEase, Behdin et al., 2023, Algorithm 1, one block of a sweep): for every
 * column j of the block, with t = V[r, j] + G[r, j] / d[j]
 *     delta = V[r, j] - q;  V[r, j] = q;  G[r, :] += delta * Hb[j, :];  dE[r, j] = delta
 *     codes[r, j] = c;  returns how many codes changed.
 * W1, Err1, G, dE are [rows, width] with row stride ld; codes, losses, V with row stride
 * ldc (the block's first column at offset 0); Hinv1 and Hb are [width, width] with row
 * stride ldh.
 */
#include <math.h>
#include <stdint.h>

static inline float quant_level(float t, float s, const float *zero, int64_t at, float lo,
                                float hi, float *code) {
    float y = t / s;
    float z = 0.0f;
    if (zero) {
        z = zero[at];
        y += z;
    }
    float c = nearbyintf(y);  /* round half to even, as torch.round */
    c = c < lo ? lo : (c > hi ? hi : c);
    *code = c;
    return (zero ? c - z : c) * s;
}

void lowbit_gptq_columns(float *W1, float *Err1, int64_t rows, int64_t width, int64_t ld,
                         int64_t c0, int64_t c1, const float *Hinv1, int64_t ldh,
                         const float *d, const int64_t *group, const float *scale,
                         const float *zero, float lo, float hi, float *codes, float *losses,
                         int64_t ldc) {
#pragma omp parallel for schedule(static) if (rows * (c1 - c0) * width >= 262144)
    for (int64_t r = 0; r < rows; r++) {
        float *w = W1 + r * ld;
        for (int64_t j = c0; j < c1; j++) {
            int64_t at = group[j] * rows + r;
            float c;
            float q = quant_level(w[j], scale[at], zero, at, lo, hi, &c);
            float e = (w[j] - q) / d[j];
            const float *h = Hinv1 + j * ldh;
            for (int64_t k = j; k < width; k++) w[k] = fmaf(-e, h[k], w[k]);
            Err1[r * ld + j] = e;
            codes[r * ldc + j] = c;
            losses[r * ldc + j] = e * e / 2.0f;
        }
    }
}

int64_t lowbit_cd_columns(float *G, float *dE, int64_t rows, int64_t width, int64_t ld,
                          const float *Hb, int64_t ldh, const float *d, const int64_t *group,
                          const float *scale, const float *zero, float lo, float hi,
                          float *codes, float *V, int64_t ldc) {
    int64_t changed = 0;
#pragma omp parallel for schedule(static) reduction(+ : changed) if (rows * width * width >= 262144)
    for (int64_t r = 0; r < rows; r++) {
        float *g = G + r * ld;
        float *v = V + r * ldc;
        for (int64_t j = 0; j < width; j++) {
            int64_t at = group[j] * rows + r;
            float c;
            float q = quant_level(v[j] + g[j] / d[j], scale[at], zero, at, lo, hi, &c);
            float delta = v[j] - q;
            changed += delta != 0.0f;
            v[j] = q;
            codes[r * ldc + j] = c;
            dE[r * ld + j] = delta;
            const float *h = Hb + j * ldh;
            for (int64_t k = 0; k < width; k++) g[k] += delta * h[k];
        }
    }
    return changed;
}
