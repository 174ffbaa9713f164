/* RMSNorm, and RMSNorm of a residual sum, float32, for CPUs: one pass over each row.
 *
 * PyTorch's RMSNorm is five operators (square, mean, rsqrt, two products), each a
 * pass with its own result; with the residual add before it, six. At a decode step's
 * few hundred rows their fixed costs dominate. Each value is computed as PyTorch
 * computes it, (x * r) rounded, then weight times that, and the residual sum is the
 * same single rounding; only the sum of squares runs in another order (8 lanes), so
 * r may differ from PyTorch's in its last bit.
 * Built at run time by workers/layers/cpu_kernels.py and called through ctypes:
 *   x, delta, sum, out: [rows][dim], contiguous; weight: [dim]
 */
#include <math.h>
#include <stdint.h>

#include "vec8.h"

static void norm_row(const float *x, const float *weight, float *out, int64_t dim, float eps) {
    const int64_t full = dim / 8 * 8;
    v8f squares = splat8(0.f);
    for (int64_t i = 0; i < full; i += 8) {
        const v8f v = load8(x + i);
        squares += v * v;
    }
    float sum = hsum8(squares);
    for (int64_t i = full; i < dim; i++) sum += x[i] * x[i];
    const float r = 1.f / sqrtf(sum / (float)dim + eps);
    for (int64_t i = 0; i < full; i += 8) store8(out + i, load8(weight + i) * (load8(x + i) * splat8(r)));
    for (int64_t i = full; i < dim; i++) out[i] = weight[i] * (x[i] * r);
}

/* out = RMSNorm(x). */
void rms_norm_f32(const float *x, const float *weight, float *out, int64_t rows, int64_t dim, float eps,
                  int num_threads) {
    const int parallel = rows * dim >= 65536; /* a decode step's rows: not worth the thread team */
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * dim, weight, out + r * dim, dim, eps);
}

/* sum = x + delta, out = RMSNorm(sum). */
void add_rms_norm_f32(const float *x, const float *delta, const float *weight, float *sum, float *out,
                      int64_t rows, int64_t dim, float eps, int num_threads) {
    const int parallel = rows * dim >= 65536;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t off = r * dim;
        for (int64_t i = 0; i < dim; i++) sum[off + i] = x[off + i] + delta[off + i];
        norm_row(sum + off, weight, out + off, dim, eps);
    }
}
