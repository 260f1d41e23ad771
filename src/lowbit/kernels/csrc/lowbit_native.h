/* Functions shared between lowbit's C sources (built into one library by native_build.py)
 * and the model descriptor of csrc/decode_loop.c (mirrored by runtime/native_loop.py). */
#ifndef LOWBIT_NATIVE_H
#define LOWBIT_NATIVE_H
#include <stdint.h>

/* gemv_avx2.c: row ranges of one activation row */
void lowbit_int8_gemv_range(const float *x, int64_t K, const int8_t *q, int64_t ldq,
                            const float *scale, const float *bias, float *y, int64_t n0,
                            int64_t n1);
void lowbit_int4_prepare(const float *x, int64_t K, int64_t kp, int64_t kg, float *scratch);
float lowbit_w8a8_codes(const float *r, int64_t K, float act_scale, float *codes);
float *lowbit_rotate_vector(const float *x, int64_t K, int64_t nf, const int64_t *sizes,
                            const float *factors, float *buf, float *tmp);
int64_t lowbit_int4_units(int64_t np, int64_t B);
void lowbit_int4_gemv_range(const float *x, int64_t K, const uint8_t *packed, int64_t np,
                            int64_t kp, int64_t B, const uint16_t *sz, int64_t kg,
                            const float *bias, float *y, int64_t N, const float *scratch,
                            int64_t u0, int64_t u1);

/* decode_ops.c */
void lowbit_rmsnorm(const float *x, int64_t M, int64_t n, const float *w, float eps, float *out);
void lowbit_add_rmsnorm(float *x, const float *d, int64_t M, int64_t n, const float *w,
                        float eps, float *out);
float lowbit_rms_inverse(const float *x, int64_t n, float eps);
void lowbit_silu_mul(const float *g, const float *u, int64_t count, float *out);
void lowbit_attend_write(float *q, const float *k, const float *v, int64_t M, int64_t H,
                         int64_t Hkv, int64_t D, int64_t pos, int64_t L, const float *cos,
                         const float *sin, float *kcache, float *vcache);
void lowbit_attend_heads(const float *q, int64_t H, int64_t Hkv, int64_t D, int64_t pos,
                         int64_t L, const float *kcache, const float *vcache, float scale,
                         float *out, float *scores, int64_t mh0, int64_t mh1);

/* decode_loop.c: one linear layer y = x W^T + b, W in one of these layouts */
enum {
    LB_F32 = 0,  /* w float [n, ld]                                                        */
    LB_I8 = 1,   /* w int8 [n, ld], s float [n]: per-channel scale                         */
    LB_I8G = 2,  /* w int8 [n, ld], s float [n, k / 32]: one scale per 32 inputs (Q8_0)    */
    LB_I4T = 3,  /* torch's int4 CPU layout (int4_weight): ld = kp, np, block, kg, s = sz  */
    LB_Q4R = 4,  /* rows in groups of 4 (n padded): w uint8 [n / 4, ld / 32, 4, 32], per row
                  * and 64 inputs 32 bytes, byte j = u[j] | u[j + 32] << 4 (ld = kp / 2);
                  * s (z) bf16 [n / 4, G / 16, 4, 16] (G = kp / 32 blocks, padded to 16):
                  * w = (u - 8) s + z per 32 inputs; z may be NULL */
    LB_W8A8 = 5, /* w int8 [n, ld], s float [n]; the input quantized to int8 per token
                  * (act_scale 0: s_x = max|x| / 127) or with act_scale (static), codes
                  * round(x / s_x) in [-127, 127]; y = sum * s_x * s[n] (dynamic) or
                  * sum * s[n] (static: s = act_scale * s_w), as gemv_avx2.c's w8a8 */
    LB_LUT4 = 6, /* w uint8 [n, ld = kp / 2] (kp = k rounded up to 32): per 32 inputs 16
                  * bytes, byte j = u[j] | u[j + 16] << 4; z float tables of 16 values,
                  * one shared (block 0) or one per row and group of kg ([n, G, 16], block
                  * 1); s float [n, G] per-group scales or NULL: w = T[u] (* s); float
                  * activations (csrc/lut_gemv.c) */
    LB_LUT4Q = 7, /* LB_LUT4 for int8 activations: w as LB_LUT4; z uint8 [tables, 32], each
                   * table's int16 values T16 as 16 low bytes then 16 high bytes (one shared
                   * table, block 0, or [n, G] of them, block 1); s float [n, G]:
                   * w = T16[u] * s */
    LB_Q4C = 8,  /* int8 activations on AVX512-VNNI: 4-bit codes in tiles of 16 rows (n
                  * padded to 16), ld = G blocks of 32 inputs (k padded with code 8): w uint8
                  * [n / 16, G, 4, 16, 4], byte j of row r in step m of block b holding
                  * u[r, 32 b + 4 m + j] (low nibble) and u[r, 32 b + 16 + 4 m + j]; s (z)
                  * bf16 [n / 16, G, 16]: w = (u - 8) s + z per 32 inputs; z may be NULL */
    LB_I8C = 9,  /* int8 weights in the same tiles: w uint8 [n / 16, G, 8, 16, 4], byte j
                  * of row r in step m of block b = w[r, 32 b + 4 m + j] + 128 (k padded
                  * with 0); kg 32: s float [n / 16, G, 16] per 32 inputs (Q8_0), kg 0: s
                  * float [n padded to 16] per row */
    LB_L4C = 10, /* a 4-bit lookup format whose one table holds integers in [-128, 127]
                  * (IQ4_NL): w as LB_Q4C; z uint8 [16] = T + 128; s float16 [n / 16, G,
                  * 16] per 32 inputs: w = T[u] s */
};

typedef struct {
    int64_t kind, n, k, ld, np, block, kg;
    const void *w, *s, *z;
    const float *bias;
    float *scratch; /* LB_I4T: its prepared activations (kp / 2 + kp / kg + 1 floats) */
    int64_t nf;     /* > 0: the input is first rotated by nf Kronecker factors (kron_rotate) */
    const int64_t *sizes;
    const float *factors;
    float act_scale; /* LB_W8A8 */
} lb_linear;

typedef struct {
    lb_linear q, k, v, o, gate, up, down;
    const float *in_norm, *post_norm;
    float *kcache, *vcache; /* [kv_heads, max_len, head_dim] */
    float in_eps, post_eps;
} lb_layer;

typedef struct {
    int64_t n_layers, hidden, inter, heads, kv_heads, head_dim, max_len, vocab;
    int64_t q8; /* 1: int8 activations per block of 32 for LB_I8 / LB_I8G / LB_Q4R */
    int64_t threads; /* at most this many threads (work holds a residual copy for each) */
    const float *final_norm, *cos, *sin; /* tables [max_len, head_dim], sin as decode_ops */
    const lb_layer *layers;
    const lb_linear *head;
    float *work; /* lowbit_loop_work_floats(model) floats */
    float attn_scale, final_eps;
} lb_model;

/* q8_vnni.c: int8 activations per block of 32 (Q8_0) and their dot products (AVX512-VNNI).
 * Per 4-input lane l: dl its block's scale, dls = dl * (code sum), n8 / n128 = -8 / -128
 * times the code sum (the weights' unsigned offsets); codes padded with zeros to 64. The
 * same per block of 32: bd, bds, bn8, bn128 (the 16-row tile kernels, q8_tiles.c). */
typedef struct {
    int8_t *xq;
    float *dl, *dls;
    int32_t *n8, *n128;
    float *bd, *bds;
    int32_t *bn8, *bn128;
} lb_q8;

int64_t lowbit_q8_floats(int64_t k);          /* floats of one lb_q8 for k inputs */
lb_q8 lowbit_q8_carve(float *p, int64_t k);   /* its arrays inside p */
void lowbit_q8_fill(const float *x, int64_t K, const lb_q8 *a);
void lowbit_q8_fill_blocks(const float *x, int64_t K, const lb_q8 *a, int64_t b0, int64_t b1);
void lowbit_q8_quantize(const float *x, int64_t K, float *buf); /* buf: lowbit_q8_carve */
void lowbit_q8_rows(const lb_linear *L, const lb_q8 *a, float *y, int64_t n0, int64_t n1);
/* q8_avx2.c: the same rows without VNNI */
void lowbit_q8_rows_avx2(const lb_linear *L, const lb_q8 *a, float *y, int64_t n0,
                         int64_t n1);
int64_t lowbit_loop_has_vnni(void);   /* decode_loop.c: the int8 kernels run on VNNI */
int64_t lowbit_loop_isa(int64_t vnni); /* 1: VNNI where present (default), 0: AVX2 only;
                                        * returns the previous setting (tests) */
int64_t lowbit_avx512_allowed(void);   /* AVX-512 F/DQ present and not turned off above */
/* lut_gemv.c: rows [n0, n1) of an LB_LUT4 linear on float32 activations */
void lowbit_lut4_rows(const lb_linear *L, const float *x, float *y, int64_t n0, int64_t n1);
/* lut_gemv.c: rows [n0, n1) of an LB_LUT4Q linear on int8 activations */
void lowbit_lut4_q8_rows(const lb_linear *L, const lb_q8 *a, float *y, int64_t n0, int64_t n1);
/* q8_tiles.c: tiles [t0, t1) of an LB_Q4C / LB_I8C / LB_L4C linear (rows 16 t0 .. min(16 t1, n)) */
void lowbit_q8_tiles(const lb_linear *L, const lb_q8 *a, float *y, int64_t t0, int64_t t1);
void lowbit_w8a8_dot(const lb_linear *L, const int8_t *xq, int32_t codesum, float *y,
                     int64_t n0, int64_t n1);
#endif
