/* The kernels for AVX-512 CPUs (F, BW, VL; BF16 for bfloat16: Intel since Cooper Lake, AMD since
   Zen 4): bfloat16 products by `vdpbf16ps` against bfloat16 inputs, int4 through a bfloat16 table.
   The primitives below compute dot products; `kernels.h` builds the projections and the entry
   points (`hm_experts_avx512`, `hm_linear_avx512`) on them. */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#include "common.h"

#define NAME(f) f##_avx512
#define WIDE_BF16_INPUTS 0 /* bfloat16 weights read bfloat16 inputs */
#define INT4_BLOCK 64       /* rows of an int4 block in torch's layout on AVX-512 CPUs */

/* res[t] = w . xs[t] for t < n (n <= MAX_ROWS, a constant after inlining): each 64-byte block of
   the weight row is loaded once for the n tokens, four independent sums per token */
static INLINE void dots_f32(const float *w, const float *const *xs, int n, int64_t k, float *res) {
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

static INLINE void dots_bf16(const uint16_t *w, const void *const *inputs, int n, int64_t k, float *res) {
    const uint16_t *const *xs = (const uint16_t *const *)inputs;
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

/* res[t] = sum over groups j of scale[j] * (q_j . xs[t]_j), q_j the g int8 values of row o in group
   j (at q + j * stride), for n (a constant after inlining) float32 inputs */
static INLINE void dots_int8(const int8_t *q, int64_t stride, const float *scales, int64_t n_groups,
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

/* Row of an int4 block held by lane i of accumulator a in `block_dots_int4`. */
static inline int64_t int4_row(int a, int i) { return 2 * i + (a >> 1) + 32 * (a & 1); }

/* res[t][a * 16 + i] = row int4_row(a, i) of an int4 block against xs[t] (bfloat16, n a constant
   after inlining); `scales` is [K/g, 64] in the same order.
   Two columns (64 bytes) at a time: one word permutation puts, in each 32-bit lane i, bytes
   2i and 2i + 1 of column c and then of column c + 1; the four nibbles of a word are then rows
   2i, 2i + 32, 2i + 1 and 2i + 33, each in the low bits after a shift, and a 32-entry table
   lookup (vpermw reads 5 bits; the table repeats after 16) turns a word into the bfloat16 value
   - 8 exactly. Each lane holds the same row in columns c and c + 1, as vdpbf16ps wants. */
static INLINE void block_dots_int4(const uint8_t *block, const float *scales, int64_t k, int64_t g,
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
static void project_int4(const Projection *p, const char *qdata, const char *scale, int64_t o0,
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
        for (int t = 0; t < n; t++) xs[t] = input_row(rows, r + t, k);
#define CASE(N) case N: block_dots_int4(block, scales, k, g, xs, N, v); break;
        switch (n) { CASE(1) CASE(2) CASE(3) CASE(4) }
#undef CASE
        for (int t = 0; t < n; t++)
            for (int a = 0; a < 4; a++)
                for (int i = 0; i < 16; i++) store(p->dtype, res, n_out, r + t, o0 + int4_row(a, i), v[t][a * 16 + i]);
    }
}

#include "kernels.h"
