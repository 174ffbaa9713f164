/* Causal attention of a prefill chunk, float32, for CPUs.
 *
 * The chunk's T query rows are the last T positions of a context of Tk keys and
 * values: the chunk alone (Tk = T, q, k and v row-strided views of the qkv
 * projection's output), or a cached prefix and the chunk (k, v read back from the
 * cache). Each row's arithmetic depends only on its query and the keys up to its
 * position, so a prompt gets the same bits whether its prefix was cached or not.
 * PyTorch's CPU flash kernel ran at ~22 GFLOPS on heads of 32 (6 ms a layer for 8
 * prompts of 256 tokens); here the work is laid out for the vector units:
 *   - each KV head's keys are first transposed into tiles of 8 tokens, [tile][d][8],
 *     so 8 scores come out of one vector's FMAs, with no horizontal sums;
 *   - 8 query rows at a time share every key tile they load;
 *   - the query heads of a KV head (grouped-query attention) share each value row.
 * The scores are kept for a row's whole context (a two-pass softmax, exponentials from
 * vec8.h): the sums run in another order than PyTorch's, so outputs agree with it to
 * float noise (~1e-6 relative), not to the bit.
 * Built at run time by workers/layers/cpu_kernels.py and called through ctypes:
 *   q:   [T][heads][D],     row r at q + r * q_stride (context position Tk - T + r)
 *   k,v: [Tk][kv_heads][D], rows at k + r * k_stride, v + r * v_stride
 *   out: [T][heads][D],    row r at out + r * out_stride
 * with D a multiple of 8 up to 256 and at most 16 query heads per KV head.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec8.h"

#define MAX_GROUP 16
#define MAX_CHUNKS 32 /* D / 8 */
#define BLOCK 8       /* query rows per task, and tokens per key tile */

/* kt[tile][d][lane] = k[tile * 8 + lane][g][d]; lanes past T are zero. */
static void transpose_keys(const float *k, int64_t k_stride, int64_t T, int g, int D, float *kt) {
    const int64_t tiles = (T + BLOCK - 1) / BLOCK;
    for (int64_t tile = 0; tile < tiles; tile++)
        for (int lane = 0; lane < BLOCK; lane++) {
            const int64_t t = tile * BLOCK + lane;
            const float *row = k + t * k_stride + (int64_t)g * D;
            for (int d = 0; d < D; d++) kt[(tile * D + d) * BLOCK + lane] = t < T ? row[d] : 0.f;
        }
}

/* vc[t][d] = v[t][g][d]: a KV head's values packed, so a long chunk's stay in cache. */
static void pack_values(const float *v, int64_t v_stride, int64_t T, int g, int D, float *vc) {
    for (int64_t t = 0; t < T; t++) memcpy(vc + t * D, v + t * v_stride + (int64_t)g * D, sizeof(float) * D);
}

/* scores[r][*] = scale * q_{r0+r} . k_* for the block's rows (all through the tile of
 * its last row: the causal mask is applied by the softmax's lengths). A block of fewer
 * rows computes its last row again in the missing ones: every row then runs the same
 * code, so its bits do not depend on where the chunk began. */
static inline __attribute__((always_inline)) void block_scores(
    const float *qh, int64_t q_stride, int rows, const float *kt, const int D, float scale, float *scores,
    int64_t stride) {
    const float *row[BLOCK];
    for (int r = 0; r < BLOCK; r++) row[r] = qh + (r < rows ? r : rows - 1) * q_stride;
    const int64_t tiles = stride / BLOCK;
    for (int64_t tile = 0; tile < tiles; tile++) {
        const float *kd = kt + tile * D * BLOCK;
        v8f acc[BLOCK];
        for (int r = 0; r < BLOCK; r++) acc[r] = splat8(0.f);
        for (int d = 0; d < D; d++) {
            const v8f keys = load8(kd + d * BLOCK);
            for (int r = 0; r < BLOCK; r++) acc[r] += splat8(row[r][d]) * keys;
        }
        for (int r = 0; r < BLOCK; r++) store8(scores + r * stride + tile * BLOCK, acc[r] * splat8(scale));
    }
}

/* Softmax of s[0, len) in place, s[len, padded) set to zero. */
static void softmax_prefix(float *s, int64_t len, int64_t padded) {
    const int64_t full = len / BLOCK * BLOCK;
    v8f vmax = splat8(s[0]);
    for (int64_t t = 0; t < full; t += BLOCK) vmax = max8(load8(s + t), vmax);
    float max = vmax[0];
    for (int i = 1; i < BLOCK; i++) max = vmax[i] > max ? vmax[i] : max;
    for (int64_t t = full; t < len; t++) max = s[t] > max ? s[t] : max;
    v8f vsum = splat8(0.f);
    for (int64_t t = 0; t < full; t += BLOCK) {
        const v8f e = exp8(load8(s + t) - splat8(max));
        store8(s + t, e);
        vsum += e;
    }
    float sum = hsum8(vsum);
    if (full < len) {
        const v8f e = exp8(load8(s + full) - splat8(max));
        for (int64_t t = full; t < len; t++) {
            s[t] = e[t - full];
            sum += s[t];
        }
    }
    for (int64_t t = len; t < padded; t++) s[t] = 0.f;
    const v8f inv = splat8(1.f / sum);
    for (int64_t t = 0; t < full + (full < len ? BLOCK : 0); t += BLOCK) store8(s + t, load8(s + t) * inv);
}

/* Rows [r0, r0 + rows) of KV head g's query heads, at context positions offset + r0 ... scores: [group][BLOCK][stride] scratch.
 * Always inlined, so each call site below with a constant D and group gets loops of
 * fixed length and its accumulators in registers. */
static inline __attribute__((always_inline)) void attend_block(
    const float *q, int64_t q_stride, const float *vc, float *out, int64_t out_stride, const float *kt,
    int64_t offset, int64_t r0, int rows, int g, const int group, const int D, float scale, float *scores) {
    const int chunks = D / 8;
    const int64_t stride = (offset + r0 + rows + BLOCK - 1) / BLOCK * BLOCK;
    for (int j = 0; j < group; j++) {
        const float *qh = q + r0 * q_stride + (int64_t)(g * group + j) * D;
        float *s = scores + (int64_t)j * BLOCK * stride;
        block_scores(qh, q_stride, rows, kt, D, scale, s, stride);
        for (int r = 0; r < rows; r++) softmax_prefix(s + r * stride, offset + r0 + r + 1, stride);
    }
    for (int r = 0; r < rows; r++) {
        v8f acc[MAX_GROUP][MAX_CHUNKS];
        for (int j = 0; j < group; j++)
            for (int c = 0; c < chunks; c++) acc[j][c] = splat8(0.f);
        for (int64_t t = 0; t <= offset + r0 + r; t++) {
            const float *vt = vc + t * D;
            for (int j = 0; j < group; j++) {
                const v8f p = splat8(scores[((int64_t)j * BLOCK + r) * stride + t]);
                for (int c = 0; c < chunks; c++) acc[j][c] += p * load8(vt + 8 * c);
            }
        }
        for (int j = 0; j < group; j++)
            for (int c = 0; c < chunks; c++)
                store8(out + (r0 + r) * out_stride + (int64_t)(g * group + j) * D + 8 * c, acc[j][c]);
    }
}

/* One block: the common shapes' loop lengths fixed. */
static void attend_block_of(const float *q, int64_t q_stride, const float *vc, float *out, int64_t out_stride,
                            const float *kt, int64_t offset, int64_t r0, int rows, int g, int group, int D,
                            float scale, float *scores) {
#define FIXED(HD, G) \
    attend_block(q, q_stride, vc, out, out_stride, kt, offset, r0, rows, g, G, HD, scale, scores)
    if (D == 32 && group == 2) FIXED(32, 2);
    else if (D == 64 && group == 1) FIXED(64, 1);
    else if (D == 64 && group == 4) FIXED(64, 4);
    else if (D == 128 && group == 1) FIXED(128, 1);
    else if (D == 128 && group == 4) FIXED(128, 4);
    else if (D == 128 && group == 8) FIXED(128, 8);
    else FIXED(D, group);
#undef FIXED
}

/* Returns 0, or -1 if a scratch buffer could not be allocated (out is then incomplete). */
int prefill_causal_f32(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                       int64_t v_stride, float *out, int64_t out_stride, int64_t T, int64_t Tk, int heads,
                       int kv_heads, int D, float scale, int num_threads) {
    const int group = heads / kv_heads;
    const int64_t offset = Tk - T;
    const int64_t padded = (Tk + BLOCK - 1) / BLOCK * BLOCK;
    float *kt = malloc(sizeof(float) * kv_heads * padded * D);
    float *vc = malloc(sizeof(float) * kv_heads * padded * D);
    if (kt == NULL || vc == NULL) {
        free(kt);
        free(vc);
        return -1;
    }
    const int64_t blocks = (T + BLOCK - 1) / BLOCK; /* of query rows */
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int g = 0; g < kv_heads; g++) {
            transpose_keys(k, k_stride, Tk, g, D, kt + (int64_t)g * padded * D);
            pack_values(v, v_stride, Tk, g, D, vc + (int64_t)g * padded * D);
        }
        float *scores = malloc(sizeof(float) * group * BLOCK * padded);
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        /* Later blocks attend to more keys: dynamic, the longest first. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < blocks * kv_heads; task++) {
            if (scores == NULL) continue;
            const int64_t b = blocks - 1 - task / kv_heads;
            const int g = (int)(task % kv_heads);
            const int64_t r0 = b * BLOCK;
            const int rows = T - r0 < BLOCK ? (int)(T - r0) : BLOCK;
            attend_block_of(q, q_stride, vc + (int64_t)g * padded * D, out, out_stride, kt + (int64_t)g * padded * D,
                            offset, r0, rows, g, group, D, scale, scores);
        }
        free(scores);
    }
    free(kt);
    free(vc);
    return failed ? -1 : 0;
}
