/* CPU matrix-vector kernels for decode, reading every weight once at the memory's bandwidth: a
   layer's experts (`hm_experts`) and a linear layer (`hm_linear`), for a few tokens each. This
   file is the part every instruction set shares; `avx512.c` and `avx2.c` each define the dot
   products it calls and include it once, so each gets its own copy compiled for its target
   (`NAME(hm_experts)` is `hm_experts_avx512` there), and `module.c` says which this CPU runs.

Shapes: T = tokens of the step, R = rows (token-expert pairs, group after group), G = groups (one
expert each), D = hidden size, I = expert intermediate size, N = experts in the stacked weights,
O x K = one projection's weight (output x input), g = a quantization group (K / g scales a row).

Expert formats (`quantized.py` stores them; the layouts are torch's, so its kernels stay the
fallback on the same tensors):
- dense: [N, O, K] in the compute dtype (float32 or bfloat16);
- int8: qdata [N, K/g, O, g] int8 (each group's [O, g] block contiguous), scale [N, O, K/g] float32;
- int4: qdata [N, O, K/2] uint8 in torch's CPU int4 layout, which depends on the CPU: blocks of
  B = INT4_BLOCK rows (64 on AVX-512, 32 on AVX2; O a multiple of B), each [K, B/2] bytes, byte d
  of column k holding row d (low nibble) and row d + B/2 (high), value + 8; scale [N, O, K/g] in
  the compute dtype. `native/__init__.py` checks the layout against torch's own converter before
  it hands one over.

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
  float32 against float32 inputs; int4 on AVX-512 becomes bfloat16 through a table and runs
  `vdpbf16ps` against bfloat16 inputs (float32 activations keep torch's int4 kernel there, which
  beat a float32 version of this one), on AVX2 it is widened to float32. A work item is 16 rows
  (dense, int8) or one int4 block (whose columns are contiguous).
- Inputs a projection reads are float32 wherever the instruction set has no bfloat16 product
  (`WIDE_BF16_INPUTS`: AVX2) or the weights are int8: bfloat16 activations are widened once per
  call (exactly), not once per weight row.
- Rounding follows torch's own: for bfloat16 the projections' outputs, the gate and its product
  are rounded to bfloat16 where torch's ops return bfloat16 (products of two bfloat16 values are
  exact in float32, sums in float32); only the order of the float32 sums differs.
- OpenMP is the same libgomp torch links (same soname), so torch.set_num_threads governs it; the
  thread count is also passed explicitly.
- AVX-512 (F, BW, VL; BF16 for bfloat16) or AVX2 with FMA: `module.c`'s `hm_supports` says
  which this CPU runs, and the caller keeps torch's path where it runs neither.

Before including this file, an `<isa>.c` defines NAME, WIDE_BF16_INPUTS, INT4_BLOCK and the dot
products: dots_f32, dots_bf16 (inputs bfloat16, or float32 when WIDE_BF16_INPUTS), dots_int8 and
project_int4 (one block; inputs as dots_bf16's).
*/

/* One weight row against n (1..MAX_ROWS) inputs, with n a constant in each call below. */
static void row_dots(int dtype, const char *w, const void *const *xs, int n, int64_t k, float *res) {
#define CASE(N)                                                                                     \
    case N:                                                                                         \
        if (dtype == HM_BFLOAT16) dots_bf16((const uint16_t *)w, xs, N, k, res);                    \
        else dots_f32((const float *)w, (const float *const *)xs, N, k, res);                       \
        break;
    switch (n) { CASE(1) CASE(2) CASE(3) CASE(4) }
#undef CASE
}

/* Dense rows [o0, o1) of W [O, K] against the rows, bias optional (NULL). */
static void project_dense(int dtype, const char *weight, int64_t k, int64_t o0, int64_t o1,
                          const Rows *rows, float *res, int64_t n_out, const void *bias) {
    int64_t esize = dtype == HM_BFLOAT16 ? 2 : 4;
    for (int64_t o = o0; o < o1; o++) {
        const char *w = weight + o * k * esize;
        for (int64_t r = rows->start; r < rows->stop; r += MAX_ROWS) {
            int n = rows->stop - r < MAX_ROWS ? (int)(rows->stop - r) : MAX_ROWS;
            const void *xs[MAX_ROWS];
            float v[MAX_ROWS];
            for (int t = 0; t < n; t++) xs[t] = input_row(rows, r + t, k);
            row_dots(dtype, w, xs, n, k, v);
            float b = !bias ? 0.0f : dtype == HM_BFLOAT16 ? bf16_to_f32(((const uint16_t *)bias)[o]) : ((const float *)bias)[o];
            for (int t = 0; t < n; t++) store(dtype, res, n_out, r + t, o, v[t] + b);
        }
    }
}

/* int8 rows [o0, o1) of one expert against the rows (float32 inputs) */
static void project_int8(const Projection *p, const char *qdata, const char *scale, int64_t o0, int64_t o1,
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
            for (int t = 0; t < n; t++) xs[t] = input_row(rows, r + t, k);
#define CASE(N) case N: dots_int8(q, p->out * g, scales, n_groups, g, xs, N, v); break;
            switch (n) { CASE(1) CASE(2) CASE(3) CASE(4) }
#undef CASE
            for (int t = 0; t < n; t++) store(p->dtype, res, n_out, r + t, o, v[t]);
        }
    }
}

static inline int64_t rows_per_item(const Projection *p) { return p->format == HM_INT4 ? INT4_BLOCK : BLOCK; }

static int64_t expert_bytes(const Projection *p) {
    int64_t n = p->out * p->in;
    return p->format == HM_INT4 ? n / 2 : p->format == HM_INT8 ? n : n * (p->dtype == HM_BFLOAT16 ? 2 : 4);
}

/* Bytes of one input value a projection of this format reads: float32 for float32 activations,
   int8 weights, and every format where the instruction set has no bfloat16 product. */
static inline int64_t input_esize(int dtype, int format) {
    return dtype == HM_FLOAT32 || format == HM_INT8 || WIDE_BF16_INPUTS ? 4 : 2;
}

/* Rows [o0, o0 + rows_per_item) (clipped to O) of expert e against the rows. */
static void project(const Projection *p, int64_t e, int64_t o0, const Rows *rows, float *res, int64_t n_out) {
    int64_t o1 = o0 + rows_per_item(p) < p->out ? o0 + rows_per_item(p) : p->out;
    const char *data = p->data + e * expert_bytes(p);
    const char *scale = p->scale ? p->scale + e * p->out * (p->in / p->group) * (p->scale_dtype == HM_BFLOAT16 ? 2 : 4) : NULL;
    if (p->format == HM_INT8) project_int8(p, data, scale, o0, o1, rows, res, n_out);
    else if (p->format == HM_INT4) project_int4(p, data, scale, o0, rows, res, n_out);
    else project_dense(p->dtype, data, p->in, o0, o1, rows, res, n_out, NULL);
}

static inline void *scratch(int64_t n_bytes) { return aligned_alloc(64, (n_bytes + 63) / 64 * 64); }

/* x [n] bfloat16 -> a new float32 copy (exact), or NULL when it could not be allocated. */
static float *widened(const uint16_t *x, int64_t n) {
    float *xf = scratch(n * 4);
    if (xf)
        for (int64_t i = 0; i < n; i++) xf[i] = bf16_to_f32(x[i]);
    return xf;
}

/* Runs groups 0..G-1 and adds their weighted rows into out [T, D] (float32). x is [T, D] in the
   compute dtype; gate_up holds [N, 2I, D] weights and down [N, D, I] in `format` (scales NULL for
   dense). Returns 0, or -1 when the scratch memory could not be had (nothing written). */
int NAME(hm_experts)(int dtype, int format, int scale_dtype, int64_t group,
                     const void *x, int64_t T, int64_t D, int64_t I,
                     const int64_t *tokens, const float *row_weights, int round_product,
                     const int64_t *experts, const int64_t *ends, int64_t n_groups,
                     const void *gate_up, const void *gate_up_scale, const void *down, const void *down_scale,
                     float *out, int n_threads) {
    int64_t R = n_groups ? ends[n_groups - 1] : 0;
    if (R == 0) return 0;
    Projection up_p = {format, dtype, scale_dtype, gate_up, gate_up_scale, 2 * I, D, group};
    Projection down_p = {format, dtype, scale_dtype, down, down_scale, D, I, group};
    /* the projections' inputs: x (widened once where they read float32 and it is bfloat16) and the
       gate's output, float32 holding bfloat16 values in that case */
    int64_t in_esize = input_esize(dtype, format);
    int widen_x = dtype == HM_BFLOAT16 && in_esize == 4;
    float *h = scratch(R * 2 * I * 4);          /* [R, 2I] */
    void *act = scratch(R * I * in_esize);      /* [R, I] */
    float *y = scratch(R * D * 4);              /* [R, D] */
    float *xf = widen_x ? widened(x, T * D) : NULL;  /* [T, D] */
    if (!h || !act || !y || (widen_x && !xf)) {
        free(h); free(act); free(y); free(xf);
        return -1;
    }
    int64_t up_items = (2 * I + rows_per_item(&up_p) - 1) / rows_per_item(&up_p);
    int64_t down_items = (D + rows_per_item(&down_p) - 1) / rows_per_item(&down_p);
    int64_t blocks = (D + BLOCK - 1) / BLOCK;
    if (n_groups * (expert_bytes(&up_p) + expert_bytes(&down_p)) < PARALLEL_MIN_BYTES) n_threads = 1;
    #pragma omp parallel num_threads(n_threads)
    {
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < n_groups * up_items; item++) {
            int64_t g = item / up_items;
            Rows rows = {widen_x ? (const void *)xf : x, tokens, in_esize, g ? ends[g - 1] : 0, ends[g]};
            project(&up_p, experts[g], item % up_items * rows_per_item(&up_p), &rows, h, 2 * I);
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {  /* the SwiGLU gate: silu(gate) * up, rounded as torch */
            for (int64_t i = 0; i < I; i++) {
                float gate = h[r * 2 * I + i], up = h[r * 2 * I + I + i];
                float silu = gate / (1.0f + expf(-gate));
                float v = dtype == HM_BFLOAT16 ? round_bf16(round_bf16(silu) * up) : silu * up;
                if (in_esize == 4) ((float *)act)[r * I + i] = v;
                else ((uint16_t *)act)[r * I + i] = f32_to_bf16(v);
            }
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < n_groups * down_items; item++) {
            int64_t g = item / down_items;
            Rows rows = {act, NULL, in_esize, g ? ends[g - 1] : 0, ends[g]};
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
int NAME(hm_linear)(int dtype, const void *x, int64_t T, int64_t K, const void *weight, int64_t O,
                    const void *bias, void *out, int n_threads) {
    int64_t in_esize = input_esize(dtype, HM_DENSE);
    int widen_x = dtype == HM_BFLOAT16 && in_esize == 4;
    float *res = scratch(T * O * 4);  /* [T, O] */
    float *xf = widen_x ? widened(x, T * K) : NULL;  /* [T, K] */
    if (!res || (widen_x && !xf)) {
        free(res); free(xf);
        return -1;
    }
    int64_t blocks = (O + BLOCK - 1) / BLOCK;
    if (O * K * (dtype == HM_BFLOAT16 ? 2 : 4) < PARALLEL_MIN_BYTES) n_threads = 1;
    #pragma omp parallel num_threads(n_threads)
    {
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            int64_t o0 = b * BLOCK, o1 = o0 + BLOCK < O ? o0 + BLOCK : O;
            Rows rows = {widen_x ? (const void *)xf : x, NULL, in_esize, 0, T};
            project_dense(dtype, (const char *)weight, K, o0, o1, &rows, res, O, bias);
            for (int64_t t = 0; t < T; t++)
                for (int64_t o = o0; o < o1; o++) {
                    if (dtype == HM_BFLOAT16) ((uint16_t *)out)[t * O + o] = f32_to_bf16(res[t * O + o]);
                    else ((float *)out)[t * O + o] = res[t * O + o];
                }
        }
    }
    free(res); free(xf);
    return 0;
}
