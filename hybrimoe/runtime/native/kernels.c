/* CPU matrix-vector kernels for decode, reading every weight once at the memory's bandwidth: a
   layer's experts (`hm_experts`) and a linear layer (`hm_linear`), for a few tokens each.

Shapes: T = tokens of the step, R = rows (token-expert pairs, group after group), G = groups (one
expert each), D = hidden size, I = expert intermediate size, N = experts in the stacked weights,
O x K = one projection's weight (output x input), g = a quantization group (K / g scales a row).

Expert formats (`quantized.py` stores them; the layouts are torch's, so its kernels stay the
fallback on the same tensors):
- dense: [N, O, K] in the compute dtype (float32 or bfloat16);
- int8: qdata [N, K/g, O, g] int8 (each group's [O, g] block contiguous), scale [N, O, K/g] float32;
- int4: qdata [N, O, K/2] uint8 in torch's CPU int4 layout for O a multiple of 64: blocks of 64
  rows, each [K, 32] bytes, byte d of column k holding row d (low nibble) and row d + 32 (high),
  value + 8; scale [N, O, K/g] in the compute dtype. `native/__init__.py` checks the layout
  against torch's own converter before it hands one over.

Design choices:
- One call runs every expert of the layer's CPU side: gate_up for every row, the SwiGLU gate,
  down, then out[token] += weight * y. Each phase is one OpenMP loop over (expert, block of 16
  output rows), so the threads split the layer's bytes evenly whatever the experts' sizes; the
  implicit barriers between loops are the only synchronisation.
- A weight row is read from memory once; the other tokens of its expert read it again from L1.
  Prefill-sized groups are torch's business (`native.py` decides), where a blocked matmul wins.
- Quantized weights become exact floating-point values in registers and multiply unquantized
  inputs, each group's sum scaled once, so the result is the dequantized weight's product up to
  the order of float32 sums (llama.cpp's Q8_0/Q4_0 quantize the inputs too): int8 is widened to
  float32 against float32 inputs; int4 becomes bfloat16 through a table and runs `vdpbf16ps`
  against bfloat16 inputs (float32 activations keep torch's int4 kernel, which beat a float32
  version of this one). A work item is 16 rows (dense, int8) or one 64-row block (int4, whose
  columns are contiguous).
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
enum { HM_DENSE = 0, HM_INT8 = 1, HM_INT4 = 2 };
#define INT4_BLOCK 64 /* rows of one int4 block */
/* quantized weights are read this far ahead with software prefetches: their widening keeps the
   core busy enough that the hardware prefetcher alone left a third of the bandwidth unused
   (int4, one thread: 5.1 -> 9.3 GB/s; dense rows gained nothing measurable and have none) */
#define PREFETCH_BYTES 2048

/* One projection of the stacked experts: where expert e's weights (and scales) are. */
typedef struct {
    int format, dtype, scale_dtype; /* dtype: the dense weights' and the inputs' */
    const char *data, *scale;
    int64_t out, in, group; /* O, K, g */
} Projection;

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

/* The input rows of one call: rows start..stop, row r being row in_rows[r] (or r) of `in`, [rows, K]
   in the compute dtype (dense) or float32 (quantized). */
typedef struct {
    const void *in;
    const int64_t *in_rows;
    int64_t start, stop;
} Rows;

static inline const void *input_row(const Rows *rows, int64_t r, int64_t k, int64_t esize) {
    return (const char *)rows->in + (rows->in_rows ? rows->in_rows[r] : r) * k * esize;
}

/* res[r][o] = v (+ bias[o]), rounded to bfloat16 for bfloat16 as torch's matmul output is */
static inline void store(int dtype, float *res, int64_t n_out, int64_t r, int64_t o, float v) {
    res[r * n_out + o] = dtype == HM_BFLOAT16 ? round_bf16(v) : v;
}

/* Dense rows [o0, o1) of W [O, K] against the rows, bias optional (NULL). */
TARGET static void project_dense(int dtype, const char *weight, int64_t k, int64_t o0, int64_t o1,
                                 const Rows *rows, float *res, int64_t n_out, const void *bias) {
    int64_t esize = dtype == HM_BFLOAT16 ? 2 : 4;
    for (int64_t o = o0; o < o1; o++) {
        const char *w = weight + o * k * esize;
        for (int64_t r = rows->start; r < rows->stop; r += MAX_ROWS) {
            int n = rows->stop - r < MAX_ROWS ? (int)(rows->stop - r) : MAX_ROWS;
            const void *xs[MAX_ROWS];
            float v[MAX_ROWS];
            for (int t = 0; t < n; t++) xs[t] = input_row(rows, r + t, k, esize);
            row_dots(dtype, w, xs, n, k, v);
            float b = !bias ? 0.0f : dtype == HM_BFLOAT16 ? bf16_to_f32(((const uint16_t *)bias)[o]) : ((const float *)bias)[o];
            for (int t = 0; t < n; t++) store(dtype, res, n_out, r + t, o, v[t] + b);
        }
    }
}

static inline float scale_at(const Projection *p, const char *scale, int64_t index) {
    return p->scale_dtype == HM_BFLOAT16 ? bf16_to_f32(((const uint16_t *)scale)[index]) : ((const float *)scale)[index];
}

/* res[t] = sum over groups j of scale[j] * (q_j . xs[t]_j), q_j the g int8 values of row o in group
   j (at q + j * stride), for n (a constant after inlining) float32 inputs */
TARGET static INLINE void dots_int8(const int8_t *q, int64_t stride, const float *scales, int64_t n_groups,
                                    int64_t g, const float *const *xs, int n, float *res) {
    __m512 total[MAX_ROWS], acc[MAX_ROWS][4];
    for (int t = 0; t < n; t++) total[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n_groups; j++, q += stride) {
        for (int t = 0; t < n; t++)
            for (int a = 0; a < 4; a++) acc[t][a] = _mm512_setzero_ps();
        const int64_t base = j * g;
        int64_t i = 0;
        for (; i + 64 <= g; i += 64) {
            _mm_prefetch((const char *)q + i + PREFETCH_BYTES, _MM_HINT_T0);
            for (int a = 0; a < 4; a++) {
                __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i + 16 * a))));
                for (int t = 0; t < n; t++) acc[t][a] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs[t] + base + i + 16 * a), acc[t][a]);
            }
        }
        for (; i < g; i += 16) {
            __mmask16 m = g - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (g - i)) - 1);
            __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + i)));
            for (int t = 0; t < n; t++) acc[t][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, xs[t] + base + i), acc[t][0]);
        }
        __m512 s = _mm512_set1_ps(scales[j]);
        for (int t = 0; t < n; t++)
            total[t] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3])), s, total[t]);
    }
    for (int t = 0; t < n; t++) res[t] = _mm512_reduce_add_ps(total[t]);
}

/* int8 rows [o0, o1) of one expert against the rows (float32 inputs) */
TARGET static void project_int8(const Projection *p, const char *qdata, const char *scale, int64_t o0, int64_t o1,
                                const Rows *rows, float *res, int64_t n_out) {
    int64_t k = p->in, g = p->group, n_groups = k / g;
    float scales[n_groups];
    for (int64_t o = o0; o < o1; o++) {
        for (int64_t j = 0; j < n_groups; j++) scales[j] = scale_at(p, scale, o * n_groups + j);
        const int8_t *q = (const int8_t *)qdata + o * g;  /* group j of row o: q + j * O * g */
        for (int64_t r = rows->start; r < rows->stop; r += MAX_ROWS) {
            int n = rows->stop - r < MAX_ROWS ? (int)(rows->stop - r) : MAX_ROWS;
            const float *xs[MAX_ROWS];
            float v[MAX_ROWS];
            for (int t = 0; t < n; t++) xs[t] = input_row(rows, r + t, k, 4);
#define CASE(N) case N: dots_int8(q, p->out * g, scales, n_groups, g, xs, N, v); break;
            switch (n) { CASE(1) CASE(2) CASE(3) CASE(4) }
#undef CASE
            for (int t = 0; t < n; t++) store(p->dtype, res, n_out, r + t, o, v[t]);
        }
    }
}

/* Row of an int4 block held by lane i of accumulator a in `block_dots_int4`. */
static inline int64_t int4_row(int a, int i) { return 2 * i + (a >> 1) + 32 * (a & 1); }

/* res[t][a * 16 + i] = row int4_row(a, i) of an int4 block against xs[t] (bfloat16, n a constant
   after inlining); `scales` is [K/g, 64] in the same order.
   Two columns (64 bytes) at a time: one word permutation puts, in each 32-bit lane i, bytes
   2i and 2i + 1 of column c and then of column c + 1; the four nibbles of a word are then rows
   2i, 2i + 32, 2i + 1 and 2i + 33, each in the low bits after a shift, and a 32-entry table
   lookup (vpermw reads 5 bits; the table repeats after 16) turns a word into the bfloat16 value
   - 8 exactly. Each lane holds the same row in columns c and c + 1, as vdpbf16ps wants. */
TARGET static INLINE void block_dots_int4(const uint8_t *block, const float *scales, int64_t k, int64_t g,
                                          const uint16_t *const *xs, int n, float res[][INT4_BLOCK]) {
    static const uint16_t interleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                            8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    uint16_t values[32];
    for (int v = 0; v < 32; v++) values[v] = f32_to_bf16((float)((v & 15) - 8));
    const __m512i order = _mm512_loadu_si512(interleave), table = _mm512_loadu_si512(values);
    __m512 total[MAX_ROWS][4], acc[MAX_ROWS][4];
    for (int t = 0; t < n; t++)
        for (int a = 0; a < 4; a++) total[t][a] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k / g; j++) {
        for (int t = 0; t < n; t++)
            for (int a = 0; a < 4; a++) acc[t][a] = _mm512_setzero_ps();
        for (int64_t c = j * g; c < (j + 1) * g; c += 2) {
            _mm_prefetch((const char *)block + c * 32 + PREFETCH_BYTES, _MM_HINT_T0);
            __m512i words = _mm512_permutexvar_epi16(order, _mm512_loadu_si512(block + c * 32));
            __m512bh w[4] = {
                (__m512bh)_mm512_permutexvar_epi16(words, table),
                (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table),
                (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 8), table),
                (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 12), table),
            };
            for (int t = 0; t < n; t++) {
                uint32_t pair;
                memcpy(&pair, xs[t] + c, 4);  /* x[c], x[c + 1] */
                __m512bh x = (__m512bh)_mm512_set1_epi32((int)pair);
                for (int a = 0; a < 4; a++) acc[t][a] = _mm512_dpbf16_ps(acc[t][a], w[a], x);
            }
        }
        for (int a = 0; a < 4; a++) {
            __m512 s = _mm512_loadu_ps(scales + j * INT4_BLOCK + 16 * a);
            for (int t = 0; t < n; t++) total[t][a] = _mm512_fmadd_ps(acc[t][a], s, total[t][a]);
        }
    }
    for (int t = 0; t < n; t++)
        for (int a = 0; a < 4; a++) _mm512_storeu_ps(res[t] + 16 * a, total[t][a]);
}

/* The int4 block of rows [o0, o0 + 64) of one expert against the rows (bfloat16 inputs) */
TARGET static void project_int4(const Projection *p, const char *qdata, const char *scale, int64_t o0,
                                const Rows *rows, float *res, int64_t n_out) {
    int64_t k = p->in, g = p->group, n_groups = k / g;
    float scales[n_groups * INT4_BLOCK];  /* [K/g, 64]: the block's scales, group after group */
    for (int a = 0; a < 4; a++)
        for (int i = 0; i < 16; i++)
            for (int64_t j = 0; j < n_groups; j++)
                scales[j * INT4_BLOCK + a * 16 + i] = scale_at(p, scale, (o0 + int4_row(a, i)) * n_groups + j);
    const uint8_t *block = (const uint8_t *)qdata + o0 * k / 2;
    for (int64_t r = rows->start; r < rows->stop; r += MAX_ROWS) {
        int n = rows->stop - r < MAX_ROWS ? (int)(rows->stop - r) : MAX_ROWS;
        const uint16_t *xs[MAX_ROWS];
        float v[MAX_ROWS][INT4_BLOCK];
        for (int t = 0; t < n; t++) xs[t] = input_row(rows, r + t, k, 2);
#define CASE(N) case N: block_dots_int4(block, scales, k, g, xs, N, v); break;
        switch (n) { CASE(1) CASE(2) CASE(3) CASE(4) }
#undef CASE
        for (int t = 0; t < n; t++)
            for (int a = 0; a < 4; a++)
                for (int i = 0; i < 16; i++) store(p->dtype, res, n_out, r + t, o0 + int4_row(a, i), v[t][a * 16 + i]);
    }
}

static inline int64_t rows_per_item(const Projection *p) { return p->format == HM_INT4 ? INT4_BLOCK : BLOCK; }

static int64_t expert_bytes(const Projection *p) {
    int64_t n = p->out * p->in;
    return p->format == HM_INT4 ? n / 2 : p->format == HM_INT8 ? n : n * (p->dtype == HM_BFLOAT16 ? 2 : 4);
}

/* Rows [o0, o0 + rows_per_item) (clipped to O) of expert e against the rows. */
TARGET static void project(const Projection *p, int64_t e, int64_t o0, const Rows *rows, float *res, int64_t n_out) {
    int64_t o1 = o0 + rows_per_item(p) < p->out ? o0 + rows_per_item(p) : p->out;
    const char *data = p->data + e * expert_bytes(p);
    const char *scale = p->scale ? p->scale + e * p->out * (p->in / p->group) * (p->scale_dtype == HM_BFLOAT16 ? 2 : 4) : NULL;
    if (p->format == HM_INT8) project_int8(p, data, scale, o0, o1, rows, res, n_out);
    else if (p->format == HM_INT4) project_int4(p, data, scale, o0, rows, res, n_out);
    else project_dense(p->dtype, data, p->in, o0, o1, rows, res, n_out, NULL);
}

static inline void *scratch(int64_t n_bytes) { return aligned_alloc(64, (n_bytes + 63) / 64 * 64); }

/* Runs groups 0..G-1 and adds their weighted rows into out [T, D] (float32). x is [T, D] in the
   compute dtype; gate_up holds [N, 2I, D] weights and down [N, D, I] in `format` (scales NULL for
   dense). Returns 0, or -1 when the scratch memory could not be had (nothing written). */
TARGET int hm_experts(int dtype, int format, int scale_dtype, int64_t group,
                      const void *x, int64_t T, int64_t D, int64_t I,
                      const int64_t *tokens, const float *row_weights, int round_product,
                      const int64_t *experts, const int64_t *ends, int64_t n_groups,
                      const void *gate_up, const void *gate_up_scale, const void *down, const void *down_scale,
                      float *out, int n_threads) {
    int64_t R = n_groups ? ends[n_groups - 1] : 0, esize = dtype == HM_BFLOAT16 ? 2 : 4;
    if (R == 0) return 0;
    Projection up_p = {format, dtype, scale_dtype, gate_up, gate_up_scale, 2 * I, D, group};
    Projection down_p = {format, dtype, scale_dtype, down, down_scale, D, I, group};
    /* int8 projections read float32 inputs: x widened once, the gate's output kept in float32
       (holding bfloat16 values for bfloat16); dense and int4 ones read the compute dtype */
    int wide = format == HM_INT8, widen_x = wide && dtype == HM_BFLOAT16;
    int64_t act_esize = wide ? 4 : esize;
    float *h = scratch(R * 2 * I * 4);          /* [R, 2I] */
    void *act = scratch(R * I * act_esize);      /* [R, I] */
    float *y = scratch(R * D * 4);               /* [R, D] */
    float *xf = widen_x ? scratch(T * D * 4) : NULL;  /* [T, D] */
    if (!h || !act || !y || (widen_x && !xf)) {
        free(h); free(act); free(y); free(xf);
        return -1;
    }
    if (widen_x)
        for (int64_t i = 0; i < T * D; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    int64_t up_items = (2 * I + rows_per_item(&up_p) - 1) / rows_per_item(&up_p);
    int64_t down_items = (D + rows_per_item(&down_p) - 1) / rows_per_item(&down_p);
    int64_t blocks = (D + BLOCK - 1) / BLOCK;
    if (n_groups * (expert_bytes(&up_p) + expert_bytes(&down_p)) < PARALLEL_MIN_BYTES) n_threads = 1;
    #pragma omp parallel num_threads(n_threads)
    {
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < n_groups * up_items; item++) {
            int64_t g = item / up_items;
            Rows rows = {widen_x ? (const void *)xf : x, tokens, g ? ends[g - 1] : 0, ends[g]};
            project(&up_p, experts[g], item % up_items * rows_per_item(&up_p), &rows, h, 2 * I);
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {  /* the SwiGLU gate: silu(gate) * up, rounded as torch */
            for (int64_t i = 0; i < I; i++) {
                float gate = h[r * 2 * I + i], up = h[r * 2 * I + I + i];
                float silu = gate / (1.0f + expf(-gate));
                float v = dtype == HM_BFLOAT16 ? round_bf16(round_bf16(silu) * up) : silu * up;
                if (wide) ((float *)act)[r * I + i] = v;
                else if (dtype == HM_BFLOAT16) ((uint16_t *)act)[r * I + i] = f32_to_bf16(v);
                else ((float *)act)[r * I + i] = v;
            }
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < n_groups * down_items; item++) {
            int64_t g = item / down_items;
            Rows rows = {act, NULL, g ? ends[g - 1] : 0, ends[g]};
            project(&down_p, experts[g], item % down_items * rows_per_item(&down_p), &rows, y, D);
        }
        /* combine: each thread owns a range of columns, so rows of one token never race */
        #pragma omp for schedule(static)
        for (int64_t c = 0; c < blocks; c++) {
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
    free(h); free(act); free(y); free(xf);
    return 0;
}

/* out [T, O] (in the weights' dtype) = x [T, K] @ W[O, K]^T + bias [O] (NULL: none), rounded once as
   torch's matmul output is. Returns 0, or -1 when the scratch memory could not be had. */
TARGET int hm_linear(int dtype, const void *x, int64_t T, int64_t K, const void *weight, int64_t O,
                     const void *bias, void *out, int n_threads) {
    float *res = scratch(T * O * 4);  /* [T, O] */
    if (!res) return -1;
    int64_t blocks = (O + BLOCK - 1) / BLOCK;
    if (O * K * (dtype == HM_BFLOAT16 ? 2 : 4) < PARALLEL_MIN_BYTES) n_threads = 1;
    #pragma omp parallel num_threads(n_threads)
    {
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            int64_t o0 = b * BLOCK, o1 = o0 + BLOCK < O ? o0 + BLOCK : O;
            Rows rows = {x, NULL, 0, T};
            project_dense(dtype, (const char *)weight, K, o0, o1, &rows, res, O, bias);
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
