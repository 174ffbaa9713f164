/* Decode attention over a paged KV cache, float32, for CPUs.
 *
 * Each sequence reads its keys and values straight out of the cache blocks its block
 * table names: no gathered copy of the context is made, so the KV bytes cross memory
 * once, in contiguous runs. Query heads that share a KV head (grouped-query
 * attention) read the same key and value rows. Built at run time by workers/layers/cpu_kernels.py and called
 * through ctypes with raw pointers; the layout contract is:
 *   q, out:     [n, heads, head_dim]
 *   k/v cache:  [num_blocks, block_size, kv_heads, head_dim]
 *   tables:     [n, max_blocks] int64, lens: [n] int64 (context length per sequence)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One sequence, all heads. Walks its blocks in order and reads each token's keys
 * (or values) for every KV head in one contiguous run, so memory streams.
 * scores: [heads][len] scratch. */
static void attend_sequence(const float *q, const float *k_cache, const float *v_cache,
                            const int64_t *table, int64_t len, float *out, int heads,
                            int kv_heads, int head_dim, int block_size, float scale,
                            float *scores) {
    const int group = heads / kv_heads;
    const int64_t token_stride = (int64_t)kv_heads * head_dim;
    /* Pass 1: scores[h][t] = scale * q_h . k_t */
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
                scores[h * len + t0 + o] = dot * scale;
            }
        }
    }
    /* Softmax per head. */
    for (int h = 0; h < heads; h++) {
        float *s = scores + h * len;
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
    /* Pass 2: out_h = sum_t p[h][t] * v_t */
    memset(out, 0, sizeof(float) * heads * head_dim);
    for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, b++) {
        const int64_t count = len - t0 < block_size ? len - t0 : block_size;
        const float *block = v_cache + table[b] * block_size * token_stride;
        for (int64_t o = 0; o < count; o++) {
            const float *token = block + o * token_stride;
            for (int h = 0; h < heads; h++) {
                const float p = scores[h * len + t0 + o];
                const float *vh = token + (int64_t)(h / group) * head_dim;
                float *oh = out + (int64_t)h * head_dim;
                for (int d = 0; d < head_dim; d++) oh[d] += p * vh[d];
            }
        }
    }
}

/* Returns 0, or -1 if a scratch buffer could not be allocated. */
int paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                     const int64_t *tables, const int64_t *lens, float *out, int n,
                     int heads, int kv_heads, int head_dim, int block_size,
                     int max_blocks, float scale, int num_threads) {
    int64_t max_len = 0;
    for (int i = 0; i < n; i++) max_len = lens[i] > max_len ? lens[i] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * heads * (max_len > 0 ? max_len : 1));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < n; i++) {
            if (scores == NULL) continue;
            const int64_t off = (int64_t)i * heads * head_dim;
            attend_sequence(q + off, k_cache, v_cache, tables + (int64_t)i * max_blocks, lens[i],
                            out + off, heads, kv_heads, head_dim, block_size, scale, scores);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
