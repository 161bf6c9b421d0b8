/* CPU matrix-vector kernels for decode, reading every weight once at the memory's bandwidth: a
   layer's experts (`hm_experts`) and a linear layer (`hm_linear`), for a few tokens each.

Shapes: T = tokens of the step, R = rows (token-expert pairs, group after group), G = groups (one
expert each), D = hidden size, I = expert intermediate size, N = experts in the stacked weights.

Design choices:
- One call runs every expert of the layer's CPU side: gate_up for every row, the SwiGLU gate,
  down, then out[token] += weight * y. Each phase is one OpenMP loop over (expert, block of 16
  output rows), so the threads split the layer's bytes evenly whatever the experts' sizes; the
  implicit barriers between loops are the only synchronisation.
- A weight row is read from memory once; the other tokens of its expert read it again from L1.
  Prefill-sized groups are torch's business (`native.py` decides), where a blocked matmul wins.
- Rounding follows torch's own: for bfloat16 the projections' outputs, the gate and its product
  are rounded to bfloat16 where torch's ops return bfloat16 (products of two bfloat16 values are
  exact in float32, sums in float32); only the order of the float32 sums differs.
- OpenMP is the same libgomp torch links (same soname), so torch.set_num_threads governs it; the
  thread count is also passed explicitly.
- AVX-512 (F, BW; BF16 for bfloat16) only: `hm_supports` says whether this CPU has it, and the
  caller keeps torch's path otherwise. Nothing here is compiled for other targets.
*/
#include <Python.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define BLOCK 16 /* output rows of one work item */
/* below this many weight bytes a call runs on one thread: waking a second costs more than it reads
   (the demo model's 192 KiB experts decode 1.6x faster on one thread than on two) */
#define PARALLEL_MIN_BYTES (1 << 20)

enum { HM_FLOAT32 = 0, HM_BFLOAT16 = 1 };

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round half to even, as torch; NaN kept NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

#define INLINE inline __attribute__((always_inline))
#define MAX_ROWS 4 /* tokens that share one pass over a weight row */

/* res[t] = w . xs[t] for t < n (n <= MAX_ROWS, a constant after inlining): each 64-byte block of
   the weight row is loaded once for the n tokens, four independent sums per token */
TARGET static INLINE void dots_f32(const float *w, const float *const *xs, int n, int64_t k, float *res) {
    __m512 acc[MAX_ROWS][4];
    for (int t = 0; t < n; t++)
        for (int j = 0; j < 4; j++) acc[t][j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= k; i += 64)
        for (int j = 0; j < 4; j++) {
            __m512 wj = _mm512_loadu_ps(w + i + 16 * j);
            for (int t = 0; t < n; t++) acc[t][j] = _mm512_fmadd_ps(wj, _mm512_loadu_ps(xs[t] + i + 16 * j), acc[t][j]);
        }
    for (; i < k; i += 16) {
        __mmask16 m = k - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - i)) - 1);
        __m512 wj = _mm512_maskz_loadu_ps(m, w + i);
        for (int t = 0; t < n; t++) acc[t][0] = _mm512_fmadd_ps(wj, _mm512_maskz_loadu_ps(m, xs[t] + i), acc[t][0]);
    }
    for (int t = 0; t < n; t++)
        res[t] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3])));
}

TARGET static INLINE void dots_bf16(const uint16_t *w, const uint16_t *const *xs, int n, int64_t k, float *res) {
    __m512 acc[MAX_ROWS][4];
    for (int t = 0; t < n; t++)
        for (int j = 0; j < 4; j++) acc[t][j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 128 <= k; i += 128)
        for (int j = 0; j < 4; j++) {
            __m512bh wj = (__m512bh)_mm512_loadu_si512(w + i + 32 * j);
            for (int t = 0; t < n; t++)
                acc[t][j] = _mm512_dpbf16_ps(acc[t][j], wj, (__m512bh)_mm512_loadu_si512(xs[t] + i + 32 * j));
        }
    for (; i < k; i += 32) {
        __mmask32 m = k - i >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (k - i)) - 1);
        __m512bh wj = (__m512bh)_mm512_maskz_loadu_epi16(m, w + i);
        for (int t = 0; t < n; t++)
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], wj, (__m512bh)_mm512_maskz_loadu_epi16(m, xs[t] + i));
    }
    for (int t = 0; t < n; t++)
        res[t] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3])));
}

/* One weight row against n (1..MAX_ROWS) inputs, with n a constant in each call below. */
TARGET static void row_dots(int dtype, const char *w, const void *const *xs, int n, int64_t k, float *res) {
#define CASE(N)                                                                                     \
    case N:                                                                                         \
        if (dtype == HM_BFLOAT16) dots_bf16((const uint16_t *)w, (const uint16_t *const *)xs, N, k, res); \
        else dots_f32((const float *)w, (const float *const *)xs, N, k, res);                       \
        break;
    switch (n) { CASE(1) CASE(2) CASE(3) CASE(4) }
#undef CASE
}

/* res[r][o] = W[o] . input(r) + bias[o] for the rows start..stop of one group and o in [o0, o1),
   where input(r) is row in_rows[r] (or r) of `in` ([rows, k] in the weights' dtype) and bias is
   optional (NULL); res is [rows, n_out] float32, rounded to bfloat16 for bfloat16 weights as torch's
   matmul output is */
TARGET static void project(int dtype, const void *weight, int64_t k, int64_t o0, int64_t o1,
                           const void *in, const int64_t *in_rows,
                           int64_t start, int64_t stop, float *res, int64_t n_out, const void *bias) {
    int64_t esize = dtype == HM_BFLOAT16 ? 2 : 4;
    for (int64_t o = o0; o < o1; o++) {
        const char *w = (const char *)weight + o * k * esize;
        for (int64_t r = start; r < stop; r += MAX_ROWS) {
            int n = stop - r < MAX_ROWS ? (int)(stop - r) : MAX_ROWS;
            const void *xs[MAX_ROWS];
            float v[MAX_ROWS];
            for (int t = 0; t < n; t++) xs[t] = (const char *)in + (in_rows ? in_rows[r + t] : r + t) * k * esize;
            row_dots(dtype, w, xs, n, k, v);
            float b = !bias ? 0.0f : dtype == HM_BFLOAT16 ? bf16_to_f32(((const uint16_t *)bias)[o]) : ((const float *)bias)[o];
            for (int t = 0; t < n; t++) res[(r + t) * n_out + o] = dtype == HM_BFLOAT16 ? round_bf16(v[t] + b) : v[t] + b;
        }
    }
}

/* Runs groups 0..G-1 and adds their weighted rows into out [T, D] (float32). Returns 0, or -1 when
   the scratch memory could not be had (nothing written). */
TARGET int hm_experts(int dtype, const void *x, int64_t D, int64_t I,
                      const int64_t *tokens, const float *row_weights, int round_product,
                      const int64_t *experts, const int64_t *ends, int64_t n_groups,
                      const void *gate_up, const void *down, float *out, int n_threads) {
    int64_t R = n_groups ? ends[n_groups - 1] : 0, esize = dtype == HM_BFLOAT16 ? 2 : 4;
    if (R == 0) return 0;
    float *h = aligned_alloc(64, ((R * 2 * I * 4) + 63) / 64 * 64);   /* [R, 2I] */
    void *act = aligned_alloc(64, ((R * I * esize) + 63) / 64 * 64);  /* [R, I] in dtype */
    float *y = aligned_alloc(64, ((R * D * 4) + 63) / 64 * 64);       /* [R, D] */
    if (!h || !act || !y) {
        free(h); free(act); free(y);
        return -1;
    }
    int64_t up_blocks = (2 * I + BLOCK - 1) / BLOCK, down_blocks = (D + BLOCK - 1) / BLOCK;
    if (n_groups * 3 * D * I * esize < PARALLEL_MIN_BYTES) n_threads = 1;
    #pragma omp parallel num_threads(n_threads)
    {
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < n_groups * up_blocks; item++) {
            int64_t g = item / up_blocks, o0 = item % up_blocks * BLOCK, o1 = o0 + BLOCK < 2 * I ? o0 + BLOCK : 2 * I;
            int64_t start = g ? ends[g - 1] : 0;
            const char *w = (const char *)gate_up + experts[g] * 2 * I * D * esize;
            project(dtype, w, D, o0, o1, x, tokens, start, ends[g], h, 2 * I, NULL);
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {  /* the SwiGLU gate: silu(gate) * up, rounded as torch */
            for (int64_t i = 0; i < I; i++) {
                float gate = h[r * 2 * I + i], up = h[r * 2 * I + I + i];
                float silu = gate / (1.0f + expf(-gate));
                if (dtype == HM_BFLOAT16) ((uint16_t *)act)[r * I + i] = f32_to_bf16(round_bf16(silu) * up);
                else ((float *)act)[r * I + i] = silu * up;
            }
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < n_groups * down_blocks; item++) {
            int64_t g = item / down_blocks, o0 = item % down_blocks * BLOCK, o1 = o0 + BLOCK < D ? o0 + BLOCK : D;
            int64_t start = g ? ends[g - 1] : 0;
            const char *w = (const char *)down + experts[g] * D * I * esize;
            project(dtype, w, I, o0, o1, act, NULL, start, ends[g], y, D, NULL);
        }
        /* combine: each thread owns a range of columns, so rows of one token never race */
        #pragma omp for schedule(static)
        for (int64_t c = 0; c < down_blocks; c++) {
            int64_t d1 = (c + 1) * BLOCK < D ? (c + 1) * BLOCK : D;
            for (int64_t r = 0; r < R; r++) {
                float *dst = out + tokens[r] * D;
                for (int64_t d = c * BLOCK; d < d1; d++) {
                    float v = y[r * D + d] * row_weights[r];
                    dst[d] += round_product ? round_bf16(v) : v;
                }
            }
        }
    }
    free(h); free(act); free(y);
    return 0;
}

/* out [T, O] (in the weights' dtype) = x [T, K] @ W[O, K]^T + bias [O] (NULL: none), rounded once as
   torch's matmul output is. Returns 0, or -1 when the scratch memory could not be had. */
TARGET int hm_linear(int dtype, const void *x, int64_t T, int64_t K, const void *weight, int64_t O,
                     const void *bias, void *out, int n_threads) {
    float *res = aligned_alloc(64, ((T * O * 4) + 63) / 64 * 64);  /* [T, O] */
    if (!res) return -1;
    int64_t blocks = (O + BLOCK - 1) / BLOCK;
    if (O * K * (dtype == HM_BFLOAT16 ? 2 : 4) < PARALLEL_MIN_BYTES) n_threads = 1;
    #pragma omp parallel num_threads(n_threads)
    {
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            int64_t o0 = b * BLOCK, o1 = o0 + BLOCK < O ? o0 + BLOCK : O;
            project(dtype, weight, K, o0, o1, x, NULL, 0, T, res, O, bias);
            for (int64_t t = 0; t < T; t++)
                for (int64_t o = o0; o < o1; o++) {
                    if (dtype == HM_BFLOAT16) ((uint16_t *)out)[t * O + o] = f32_to_bf16(res[t * O + o]);
                    else ((float *)out)[t * O + o] = res[t * O + o];
                }
        }
    }
    free(res);
    return 0;
}

/* 1 when this CPU runs the kernels for the dtype. */
int hm_supports(int dtype) {
    __builtin_cpu_init();
    int base = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
    if (dtype == HM_BFLOAT16) return base && __builtin_cpu_supports("avx512bf16");
    return base;
}

/* A module so that setuptools builds and imports it as any extension; the functions above are
   called through ctypes (which releases the GIL for the call). */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "hybrimoe's native CPU kernels", -1, NULL};
PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
