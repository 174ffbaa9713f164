/* Decode attention over a paged KV cache, float32, for CPUs.
 *
 * Each (sequence, KV head) pair reads its keys and values straight out of the cache
 * blocks its block table names: no gathered copy of the context is made, so the KV
 * bytes cross memory once. Query heads that share a KV head (grouped-query attention)
 * are handled together. Built at run time by workers/layers/cpu_kernels.py and called
 * through ctypes with raw pointers; the layout contract is:
 *   q, out:     [n, heads, head_dim]
 *   k/v cache:  [num_blocks, block_size, kv_heads, head_dim]
 *   tables:     [n, max_blocks] int64, lens: [n] int64 (context length per sequence)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void attend_one(const float *q, const float *k_cache, const float *v_cache,
                       const int64_t *table, int64_t len, float *out, int group,
                       int kv_heads, int head_dim, int block_size, int kv_head,
                       float scale, float *scores) {
    const int64_t token_stride = (int64_t)kv_heads * head_dim;
    /* Pass 1: scores[g][t] = scale * q_g . k_t */
    for (int64_t t = 0; t < len; t++) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const float *kt = k_cache + slot * token_stride + (int64_t)kv_head * head_dim;
        for (int g = 0; g < group; g++) {
            const float *qg = q + (int64_t)g * head_dim;
            float dot = 0.f;
            for (int d = 0; d < head_dim; d++) dot += qg[d] * kt[d];
            scores[g * len + t] = dot * scale;
        }
    }
    /* Softmax per query head. */
    for (int g = 0; g < group; g++) {
        float *s = scores + g * len;
        float max = -INFINITY;
        for (int64_t t = 0; t < len; t++) max = s[t] > max ? s[t] : max;
        float sum = 0.f;
        for (int64_t t = 0; t < len; t++) {
            s[t] = expf(s[t] - max);
            sum += s[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; t++) s[t] *= inv;
    }
    /* Pass 2: out_g = sum_t p[g][t] * v_t */
    memset(out, 0, sizeof(float) * group * head_dim);
    for (int64_t t = 0; t < len; t++) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const float *vt = v_cache + slot * token_stride + (int64_t)kv_head * head_dim;
        for (int g = 0; g < group; g++) {
            const float p = scores[g * len + t];
            float *og = out + (int64_t)g * head_dim;
            for (int d = 0; d < head_dim; d++) og[d] += p * vt[d];
        }
    }
}

/* Returns 0, or -1 if a scratch buffer could not be allocated. */
int paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                     const int64_t *tables, const int64_t *lens, float *out, int n,
                     int heads, int kv_heads, int head_dim, int block_size,
                     int max_blocks, float scale, int num_threads) {
    const int group = heads / kv_heads;
    int64_t max_len = 0;
    for (int i = 0; i < n; i++) max_len = lens[i] > max_len ? lens[i] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * group * (max_len > 0 ? max_len : 1));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for collapse(2) schedule(dynamic, 4)
        for (int i = 0; i < n; i++) {
            for (int h = 0; h < kv_heads; h++) {
                if (scores == NULL) continue;
                const int64_t off = ((int64_t)i * heads + (int64_t)h * group) * head_dim;
                attend_one(q + off, k_cache, v_cache, tables + (int64_t)i * max_blocks,
                           lens[i], out + off, group, kv_heads, head_dim, block_size, h,
                           scale, scores);
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
