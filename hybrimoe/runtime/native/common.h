/* What every instruction set's kernels share: constants, formats, bfloat16 rounding as torch does
   it, and the structs `kernels.h` passes around. Included first by each `<isa>.c`. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16 /* output rows of one work item */
/* below this many weight bytes a call runs on one thread: waking a second costs more than it reads
   (the demo model's 192 KiB experts decode 1.6x faster on one thread than on two) */
#define PARALLEL_MIN_BYTES (1 << 20)

enum { HM_FLOAT32 = 0, HM_BFLOAT16 = 1 };
enum { HM_DENSE = 0, HM_INT8 = 1, HM_INT4 = 2 };
/* quantized weights are read this far ahead with software prefetches: their widening keeps the
   core busy enough that the hardware prefetcher alone left a third of the bandwidth unused
   (int4, one thread: 5.1 -> 9.3 GB/s; dense rows gained nothing measurable and have none) */
#define PREFETCH_BYTES 2048

#define INLINE inline __attribute__((always_inline))
#define MAX_ROWS 4 /* tokens that share one pass over a weight row */

/* One projection of the stacked experts: where expert e's weights (and scales) are. */
typedef struct {
    int format, dtype, scale_dtype; /* dtype: the dense weights' and the inputs' */
    const char *data, *scale;
    int64_t out, in, group; /* O, K, g */
} Projection;

/* The input rows of one call: rows start..stop, row r being row in_rows[r] (or r) of `in`, [rows, K],
   each value `esize` bytes (bfloat16 or float32: `input_esize` in kernels.h says which). */
typedef struct {
    const void *in;
    const int64_t *in_rows;
    int64_t esize, start, stop;
} Rows;

static inline const void *input_row(const Rows *rows, int64_t r, int64_t k) {
    return (const char *)rows->in + (rows->in_rows ? rows->in_rows[r] : r) * k * rows->esize;
}

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

/* res[r][o] = v, rounded to bfloat16 for bfloat16 as torch's matmul output is */
static inline void store(int dtype, float *res, int64_t n_out, int64_t r, int64_t o, float v) {
    res[r * n_out + o] = dtype == HM_BFLOAT16 ? round_bf16(v) : v;
}

static inline float scale_at(const Projection *p, const char *scale, int64_t index) {
    return p->scale_dtype == HM_BFLOAT16 ? bf16_to_f32(((const uint16_t *)scale)[index]) : ((const float *)scale)[index];
}
