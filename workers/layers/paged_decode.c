/* Decode attention over a paged KV cache, float32, for CPUs.
 *
 * Each sequence reads its keys and values straight out of the cache blocks its block
 * table names: no gathered copy of the context is made, so the KV bytes cross memory
 * once, in contiguous runs. Built at run time by workers/layers/cpu_kernels.py and
 * called through ctypes with raw pointers; the layout contract is:
 *   q, out:     [n, heads, head_dim]
 *   k/v cache:  [num_blocks, block_size, kv_heads, head_dim]
 *   tables:     [n, max_blocks] int64, lens: [n] int64 (context length per sequence)
 *
 * Where head_dim is a multiple of 8 (up to 256), the work runs on 8-float vectors
 * (GCC's vector extensions: AVX or SSE on x86, NEON on ARM). The query heads that
 * share a KV head (grouped-query attention) read each key and value row once; while
 * the values stream by, one KV head at a time, its query heads' output rows stay in
 * registers; the softmax's exponentials are computed eight at a time. About 2.5x the
 * speed of the scalar loops, which other head sizes still take.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec8.h"

#define MAX_GROUP 16    /* query heads per KV head on the vector path */
#define MAX_CHUNKS 32   /* head_dim / 8 on the vector path (head_dim <= 256) */

/* Asks for the cache lines of the next block while this one is computed: the blocks
 * of a sequence lie scattered over the cache, where the hardware's prefetcher cannot
 * guess them. */
static inline void prefetch_block(const float *block, int64_t floats) {
    for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(block + i, 0, 3);
}

/* Softmax of each head's scores in place; rows are `stride` (a multiple of 8) apart
 * and hold `len` scores. */
static void softmax_rows(float *scores, int heads, int64_t len, int64_t stride) {
    const int64_t full = len / 8 * 8;
    for (int h = 0; h < heads; h++) {
        float *s = scores + h * stride;
        for (int64_t t = len; t < stride; t++) s[t] = s[len - 1]; /* pad: finite, ignored */
        v8f vmax = load8(s);
        for (int64_t t = 8; t < stride; t += 8) {
            v8f v = load8(s + t);
            vmax = max8(v, vmax);
        }
        float max = vmax[0];
        for (int i = 1; i < 8; i++) max = vmax[i] > max ? vmax[i] : max;
        v8f vsum = splat8(0.f);
        for (int64_t t = 0; t < stride; t += 8) {
            v8f e = exp8(load8(s + t) - splat8(max));
            store8(s + t, e);
            if (t < full) vsum += e;
        }
        float sum = hsum8(vsum);
        for (int64_t t = full; t < len; t++) sum += s[t];
        const v8f inv = splat8(1.f / sum);
        for (int64_t t = 0; t < stride; t += 8) store8(s + t, load8(s + t) * inv);
    }
}

/* One sequence on the vector path. The first query head of KV head g is g * group.
 * scores: [heads][stride] scratch. Always inlined, so each call site below with a
 * constant head_dim and group gets loops of fixed length. */
static inline __attribute__((always_inline)) void attend_vector(
    const float *q, const float *k_cache, const float *v_cache, const int64_t *table, int64_t len,
    float *out, int heads, int kv_heads, const int head_dim, const int group, int block_size, float scale,
    float *scores, int64_t stride) {
    const int chunks = head_dim / 8;
    const int64_t token_stride = (int64_t)kv_heads * head_dim;
    /* Pass 1: scores[h][t] = scale * q_h . k_t, a token's row (every KV head) at a time */
    for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, b++) {
        const int64_t count = len - t0 < block_size ? len - t0 : block_size;
        const float *block = k_cache + table[b] * block_size * token_stride;
        if (t0 + block_size < len) prefetch_block(k_cache + table[b + 1] * block_size * token_stride,
                                                  block_size * token_stride);
        for (int64_t o = 0; o < count; o++) {
            for (int g = 0; g < kv_heads; g++) {
                const float *k = block + o * token_stride + (int64_t)g * head_dim;
                for (int j = 0; j < group; j++) {
                    const int h = g * group + j;
                    const float *qh = q + (int64_t)h * head_dim;
                    v8f acc = load8(qh) * load8(k);
                    for (int c = 1; c < chunks; c++) acc += load8(qh + 8 * c) * load8(k + 8 * c);
                    scores[h * stride + t0 + o] = hsum8(acc) * scale;
                }
            }
        }
    }
    softmax_rows(scores, heads, len, stride);
    /* Pass 2: out_h = sum_t p[h][t] * v_t, the group's output rows held in registers. */
    for (int g = 0; g < kv_heads; g++) {
        v8f acc[MAX_GROUP][MAX_CHUNKS];
        for (int j = 0; j < group; j++)
            for (int c = 0; c < chunks; c++) acc[j][c] = splat8(0.f);
        for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, b++) {
            const int64_t count = len - t0 < block_size ? len - t0 : block_size;
            const float *block = v_cache + table[b] * block_size * token_stride + (int64_t)g * head_dim;
            if (g == 0 && t0 + block_size < len)
                prefetch_block(v_cache + table[b + 1] * block_size * token_stride, block_size * token_stride);
            for (int64_t o = 0; o < count; o++) {
                const float *v = block + o * token_stride;
                for (int j = 0; j < group; j++) {
                    const v8f p = splat8(scores[(g * group + j) * stride + t0 + o]);
                    for (int c = 0; c < chunks; c++) acc[j][c] += p * load8(v + 8 * c);
                }
            }
        }
        for (int j = 0; j < group; j++)
            for (int c = 0; c < chunks; c++) store8(out + (int64_t)(g * group + j) * head_dim + 8 * c, acc[j][c]);
    }
}

/* One sequence, any head_dim. scores: [heads][stride] scratch. */
static void attend_scalar(const float *q, const float *k_cache, const float *v_cache, const int64_t *table,
                          int64_t len, float *out, int heads, int kv_heads, int head_dim, int block_size,
                          float scale, float *scores, int64_t stride) {
    const int group = heads / kv_heads;
    const int64_t token_stride = (int64_t)kv_heads * head_dim;
    for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, b++) {
        const int64_t count = len - t0 < block_size ? len - t0 : block_size;
        const float *block = k_cache + table[b] * block_size * token_stride;
        for (int64_t o = 0; o < count; o++) {
            const float *token = block + o * token_stride;
            for (int h = 0; h < heads; h++) {
                const float *qh = q + (int64_t)h * head_dim;
                const float *kh = token + (int64_t)(h / group) * head_dim;
                float dot = 0.f;
                for (int d = 0; d < head_dim; d++) dot += qh[d] * kh[d];
                scores[h * stride + t0 + o] = dot * scale;
            }
        }
    }
    softmax_rows(scores, heads, len, stride);
    memset(out, 0, sizeof(float) * heads * head_dim);
    for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, b++) {
        const int64_t count = len - t0 < block_size ? len - t0 : block_size;
        const float *block = v_cache + table[b] * block_size * token_stride;
        for (int64_t o = 0; o < count; o++) {
            const float *token = block + o * token_stride;
            for (int h = 0; h < heads; h++) {
                const float p = scores[h * stride + t0 + o];
                const float *vh = token + (int64_t)(h / group) * head_dim;
                float *oh = out + (int64_t)h * head_dim;
                for (int d = 0; d < head_dim; d++) oh[d] += p * vh[d];
            }
        }
    }
}

/* One sequence: the vector path with the common shapes' loop lengths fixed. */
static void attend_sequence(const float *q, const float *k_cache, const float *v_cache, const int64_t *table,
                            int64_t len, float *out, int heads, int kv_heads, int head_dim, int block_size,
                            float scale, float *scores, int64_t stride) {
    const int group = heads / kv_heads;
#define VECTOR(HD, G) attend_vector(q, k_cache, v_cache, table, len, out, heads, kv_heads, HD, G, \
                                    block_size, scale, scores, stride)
    if (head_dim % 8 != 0 || head_dim / 8 > MAX_CHUNKS || group > MAX_GROUP)
        attend_scalar(q, k_cache, v_cache, table, len, out, heads, kv_heads, head_dim, block_size, scale,
                      scores, stride);
    else if (head_dim == 32 && group == 2) VECTOR(32, 2);
    else if (head_dim == 64 && group == 1) VECTOR(64, 1);
    else if (head_dim == 64 && group == 4) VECTOR(64, 4);
    else if (head_dim == 128 && group == 1) VECTOR(128, 1);
    else if (head_dim == 128 && group == 4) VECTOR(128, 4);
    else if (head_dim == 128 && group == 8) VECTOR(128, 8);
    else VECTOR(head_dim, group);
#undef VECTOR
}

/* Returns 0, or -1 if a scratch buffer could not be allocated. */
int paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                     const int64_t *tables, const int64_t *lens, float *out, int n,
                     int heads, int kv_heads, int head_dim, int block_size,
                     int max_blocks, float scale, int num_threads) {
    int64_t max_len = 0;
    for (int i = 0; i < n; i++) max_len = lens[i] > max_len ? lens[i] : max_len;
    const int64_t stride = (max_len + 7) / 8 * 8; /* rows padded to whole vectors */
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * heads * (stride > 0 ? stride : 8));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n; i++) {
            const int64_t off = (int64_t)i * heads * head_dim;
            if (scores == NULL) continue;
            if (lens[i] <= 0) { /* nothing to attend to */
                memset(out + off, 0, sizeof(float) * heads * head_dim);
                continue;
            }
            attend_sequence(q + off, k_cache, v_cache, tables + (int64_t)i * max_blocks, lens[i], out + off,
                            heads, kv_heads, head_dim, block_size, scale, scores, (lens[i] + 7) / 8 * 8);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
