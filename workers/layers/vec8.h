/* Eight-float vectors for the CPU kernels (GCC's vector extensions: AVX or SSE on
 * x86, NEON on ARM), and e^x on them. */
#ifndef YARD_VEC8_H
#define YARD_VEC8_H

#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline v8f splat8(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

/* Lanewise: a where a > b, else b. (C has no vector ?:, so it picks by bit masks.) */
static inline v8f max8(v8f a, v8f b) {
    const v8i pick_a = a > b;
    return (v8f)((pick_a & (v8i)a) | (~pick_a & (v8i)b));
}

static inline float hsum8(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* e^x for x <= 0, within about 2 ulp of expf: x = n ln2 + r with |r| <= ln2/2, e^r by
 * its Taylor series to r^7 (error below 6e-9), times 2^n built in the exponent bits.
 * Below -87.3 (e^x under FLT_MIN) it answers e^-87.3, which a softmax sum cannot see. */
static inline v8f exp8(v8f x) {
    const v8f lo = splat8(-87.3f);
    x = max8(x, lo);
    v8f t = x * splat8(1.44269504f) + splat8(0.5f);
    v8i n = __builtin_convertvector(t, v8i);       /* truncates toward zero: */
    n += (v8i)(__builtin_convertvector(n, v8f) > t); /* floor, for negative t */
    v8f fn = __builtin_convertvector(n, v8f);
    v8f r = x - fn * splat8(0.693359375f) - fn * splat8(-2.12194440e-4f);
    v8f p = splat8(1.f / 5040);
    p = p * r + splat8(1.f / 720);
    p = p * r + splat8(1.f / 120);
    p = p * r + splat8(1.f / 24);
    p = p * r + splat8(1.f / 6);
    p = p * r + splat8(0.5f);
    p = p * r + splat8(1.f);
    p = p * r + splat8(1.f);
    v8i bits = (n + 127) << 23;
    v8f scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#endif
