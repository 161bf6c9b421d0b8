/* The kernels for AVX2 CPUs with FMA (Intel since Haswell, AMD since Zen): 8 float32 lanes, no
   bfloat16 product, so every weight format is widened exactly to float32 in registers and
   multiplies float32 inputs (WIDE_BF16_INPUTS: bfloat16 activations are widened once per call).
   The primitives below compute dot products; `kernels.h` builds the projections and the entry
   points (`hm_experts_avx2`, `hm_linear_avx2`) on them. */
#pragma GCC target("avx2,fma")
#include "common.h"

#define NAME(f) f##_avx2
#define WIDE_BF16_INPUTS 1
#define INT4_BLOCK 32 /* rows of an int4 block in torch's layout on AVX2 CPUs */

static INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static INLINE __m256 sum4(const __m256 acc[4]) {
    return _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
}

/* 8 bfloat16 values as float32 (exact: the bits moved up) */
static INLINE __m256 load_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* 8 int8 values as float32 */
static INLINE __m256 load_int8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* res[t] = w . xs[t] for t < n (n <= MAX_ROWS, a constant after inlining), w float32 (WIDTH 4) or
   bfloat16 (2) loaded by LOAD: each 32-value block of the weight row is loaded once for the n
   tokens, four independent sums per token; the last k % 8 values are summed one by one */
#define DENSE_DOTS(LOAD, WEIGHT_AT)                                                                  \
    enum { ACC = 8 };                                                                                \
    const int n_acc = n == 1 ? ACC : 4; /* one token: twice the loads in flight */                   \
    __m256 acc[MAX_ROWS][ACC];                                                                       \
    for (int t = 0; t < n; t++)                                                                      \
        for (int j = 0; j < n_acc; j++) acc[t][j] = _mm256_setzero_ps();                             \
    int64_t i = 0;                                                                                   \
    for (; i + 8 * n_acc <= k; i += 8 * n_acc)                                                       \
        for (int j = 0; j < n_acc; j++) {                                                            \
            __m256 wj = LOAD(w + i + 8 * j);                                                         \
            for (int t = 0; t < n; t++) acc[t][j] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(xs[t] + i + 8 * j), acc[t][j]); \
        }                                                                                            \
    for (; i + 8 <= k; i += 8) {                                                                     \
        __m256 wj = LOAD(w + i);                                                                     \
        for (int t = 0; t < n; t++) acc[t][0] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(xs[t] + i), acc[t][0]); \
    }                                                                                                \
    for (int t = 0; t < n; t++) {                                                                    \
        float tail = 0.0f;                                                                           \
        for (int64_t c = i; c < k; c++) tail += WEIGHT_AT(c) * xs[t][c];                             \
        for (int j = 1; j < n_acc; j++) acc[t][0] = _mm256_add_ps(acc[t][0], acc[t][j]);             \
        res[t] = hsum(acc[t][0]) + tail;                                                             \
    }

static INLINE void dots_f32(const float *w, const float *const *xs, int n, int64_t k, float *res) {
#define AT(c) w[c]
    DENSE_DOTS(_mm256_loadu_ps, AT)
#undef AT
}

/* bfloat16 weights against float32 inputs (WIDE_BF16_INPUTS) */
static INLINE void dots_bf16(const uint16_t *w, const void *const *inputs, int n, int64_t k, float *res) {
    const float *const *xs = (const float *const *)inputs;
#define AT(c) bf16_to_f32(w[c])
    DENSE_DOTS(load_bf16, AT)
#undef AT
}
#undef DENSE_DOTS

/* res[t] = sum over groups j of scale[j] * (q_j . xs[t]_j), q_j the g int8 values of row o in group
   j (at q + j * stride), for n (a constant after inlining) float32 inputs */
static INLINE void dots_int8(const int8_t *q, int64_t stride, const float *scales, int64_t n_groups,
                             int64_t g, const float *const *xs, int n, float *res) {
    __m256 total[MAX_ROWS], acc[MAX_ROWS][4];
    float tails[MAX_ROWS] = {0};
    for (int t = 0; t < n; t++) total[t] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n_groups; j++, q += stride) {
        for (int t = 0; t < n; t++)
            for (int a = 0; a < 4; a++) acc[t][a] = _mm256_setzero_ps();
        const float *x0[MAX_ROWS];
        for (int t = 0; t < n; t++) x0[t] = xs[t] + j * g;
        int64_t i = 0;
        for (; i + 32 <= g; i += 32) {
            _mm_prefetch((const char *)q + i + PREFETCH_BYTES, _MM_HINT_T0);
            for (int a = 0; a < 4; a++) {
                __m256 w = load_int8(q + i + 8 * a);
                for (int t = 0; t < n; t++) acc[t][a] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x0[t] + i + 8 * a), acc[t][a]);
            }
        }
        for (; i + 8 <= g; i += 8) {
            __m256 w = load_int8(q + i);
            for (int t = 0; t < n; t++) acc[t][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x0[t] + i), acc[t][0]);
        }
        __m256 s = _mm256_set1_ps(scales[j]);
        for (int t = 0; t < n; t++) {
            total[t] = _mm256_fmadd_ps(sum4(acc[t]), s, total[t]);
            float tail = 0.0f;
            for (int64_t c = i; c < g; c++) tail += (float)q[c] * x0[t][c];
            tails[t] += tail * scales[j];
        }
    }
    for (int t = 0; t < n; t++) res[t] = hsum(total[t]) + tails[t];
}

#define INT4_TOKENS 2 /* tokens per pass over an int4 block: four accumulators each */

/* res[t][r] = row r of an int4 block (torch's layout on AVX2 CPUs: byte d of a column holds rows d
   and d + 16) against xs[t] (float32, n <= INT4_TOKENS a constant after inlining), for the 32 rows;
   `scales` is [K/g, 32]. Two columns (32 bytes) at a time: their nibbles less 8 as signed bytes,
   widened eight at a time (the costly part, shared by the n tokens) and multiplied by x[c] and
   x[c + 1]; each group's sums are scaled once into `res`. */
static INLINE void block_dots_int4(const uint8_t *block, const float *scales, int64_t k, int64_t g,
                                   const float *const *xs, int n, float res[][INT4_BLOCK]) {
    const __m256i nibble = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8);
    for (int t = 0; t < n; t++)
        for (int r = 0; r < INT4_BLOCK; r++) res[t][r] = 0.0f;
    for (int64_t j = 0; j < k / g; j++) {
        __m256 acc[INT4_TOKENS][4];  /* acc[t][a] lane i is row 8a + i */
        for (int t = 0; t < n; t++)
            for (int a = 0; a < 4; a++) acc[t][a] = _mm256_setzero_ps();
        for (int64_t c = j * g; c < (j + 1) * g; c += 2) {
            _mm_prefetch((const char *)block + c * 16 + PREFETCH_BYTES, _MM_HINT_T0);
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(block + c * 16));
            __m256i halves[2] = {
                _mm256_sub_epi8(_mm256_and_si256(bytes, nibble), eight),                        /* rows 0-15 */
                _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble), eight),  /* rows 16-31 */
            };
            for (int col = 0; col < 2; col++) {  /* column c + col: the low or high 16 bytes */
                __m256 w[4];
                for (int h = 0; h < 2; h++) {
                    __m128i q = col ? _mm256_extracti128_si256(halves[h], 1) : _mm256_castsi256_si128(halves[h]);
                    w[2 * h] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                    w[2 * h + 1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
                }
                for (int t = 0; t < n; t++) {
                    __m256 xc = _mm256_broadcast_ss(xs[t] + c + col);
                    for (int a = 0; a < 4; a++) acc[t][a] = _mm256_fmadd_ps(w[a], xc, acc[t][a]);
                }
            }
        }
        for (int a = 0; a < 4; a++) {
            __m256 s = _mm256_loadu_ps(scales + j * INT4_BLOCK + 8 * a);
            for (int t = 0; t < n; t++)
                _mm256_storeu_ps(res[t] + 8 * a, _mm256_fmadd_ps(acc[t][a], s, _mm256_loadu_ps(res[t] + 8 * a)));
        }
    }
}

/* The int4 block of rows [o0, o0 + 32) of one expert against the rows (float32 inputs),
   INT4_TOKENS at a time (the block's K * 16 bytes come from the cache for the next pass) */
static void project_int4(const Projection *p, const char *qdata, const char *scale, int64_t o0,
                         const Rows *rows, float *res, int64_t n_out) {
    int64_t k = p->in, g = p->group, n_groups = k / g;
    float scales[n_groups * INT4_BLOCK];  /* [K/g, 32]: the block's scales, group after group */
    for (int r = 0; r < INT4_BLOCK; r++)
        for (int64_t j = 0; j < n_groups; j++) scales[j * INT4_BLOCK + r] = scale_at(p, scale, (o0 + r) * n_groups + j);
    const uint8_t *block = (const uint8_t *)qdata + o0 * k / 2;
    for (int64_t r = rows->start; r < rows->stop; r += INT4_TOKENS) {
        int n = rows->stop - r < INT4_TOKENS ? (int)(rows->stop - r) : INT4_TOKENS;
        const float *xs[INT4_TOKENS];
        float v[INT4_TOKENS][INT4_BLOCK];
        for (int t = 0; t < n; t++) xs[t] = input_row(rows, r + t, k);
        if (n == 1) block_dots_int4(block, scales, k, g, xs, 1, v);
        else block_dots_int4(block, scales, k, g, xs, INT4_TOKENS, v);
        for (int t = 0; t < n; t++)
            for (int i = 0; i < INT4_BLOCK; i++) store(p->dtype, res, n_out, r + t, o0 + i, v[t][i]);
    }
}

#include "kernels.h"
