// Two small steps of a decoder layer, fused: RMSNorm with its weight, and RoPE on a (heads, tokens,
// head_dim) view. Each replaces several torch ops (and their
// dispatch, which at decode sizes costs more than the arithmetic) with one call, and rounds where
// torch's op sequence rounds (RMSNorm in float32 then rounded, times the weight; each product and
// the sum of RoPE rounded; IEEE division and square root: this file is built without -ffast-math),
// so in bfloat16 RoPE gives exactly the bits of dsla.model.llama's torch forms, and RMSNorm all but
// ~3 in a million of them (62 of 23M elements in one check: its float32 sum of squares runs in
// another order, which can tip a rounding). SiLU is left to torch: its exp differs from ours in the
// last bit, which tipped ~0.05% of bfloat16 roundings, for no measurable gain.
// Built and loaded by dsla/ops/cpu_kernels.py with decode_attention.cpp.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>

#include "common.h"

namespace {

constexpr int64_t PARALLEL_MIN = 1 << 14;  // elements: below this, one thread (a fork costs more)

template <typename T>
void rms_norm(const T* x, const T* w, T* out, int64_t rows, int64_t dim, float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1 && rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * dim;
        float ss = 0.f;
        for (int64_t d = 0; d < dim; ++d) {
            const float v = to_float(xr[d]);
            ss += v * v;
        }
        const float inv = 1.f / std::sqrt(ss / float(dim) + eps);
        T* o = out + r * dim;
        for (int64_t d = 0; d < dim; ++d)
            store(to_float(w[d]) * rounded(to_float(xr[d]) * inv, T()), o + d);
    }
}

template <typename T>
void rope(const T* x, const T* cos, const T* ssin, T* out, int64_t heads, int64_t n, int64_t dim,
          int64_t xs_h, int64_t xs_n, int64_t os_h, int64_t os_n, int threads) {
    // out[h, i, d] = x*cos + roll(x, dim/2)*ssin, each product and the sum rounded to T
    const int64_t half = dim / 2;
#pragma omp parallel for collapse(2) num_threads(threads) if (threads > 1 && heads * n * dim >= PARALLEL_MIN)
    for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < n; ++i) {
            const T* xi = x + h * xs_h + i * xs_n;
            const T* c = cos + i * dim;
            const T* s = ssin + i * dim;
            T* o = out + h * os_h + i * os_n;
            for (int64_t d = 0; d < half; ++d) {  // the rolled partner of d is d + half, then d - half
                const float a = rounded(to_float(xi[d]) * to_float(c[d]), T());
                const float b = rounded(to_float(xi[d + half]) * to_float(s[d]), T());
                store(a + b, o + d);
            }
            for (int64_t d = half; d < dim; ++d) {
                const float a = rounded(to_float(xi[d]) * to_float(c[d]), T());
                const float b = rounded(to_float(xi[d - half]) * to_float(s[d]), T());
                store(a + b, o + d);
            }
        }
}

}  // namespace

extern "C" {

// dtype 0: bfloat16, 1: float32; x, w, out contiguous (rows, dim) and (dim,).
void dsla_rms_norm(const void* x, const void* w, void* out, int64_t rows, int64_t dim, float eps, int dtype,
                   int threads) {
    if (dtype == 0)
        rms_norm(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w), static_cast<uint16_t*>(out),
                 rows, dim, eps, threads);
    else
        rms_norm(static_cast<const float*>(x), static_cast<const float*>(w), static_cast<float*>(out), rows, dim,
                 eps, threads);
}

// x, out: (heads, n, dim) with the given head and token strides, dim contiguous; cos, ssin (n, dim).
void dsla_rope(const void* x, const void* cos, const void* ssin, void* out, int64_t heads, int64_t n, int64_t dim,
               int64_t xs_h, int64_t xs_n, int64_t os_h, int64_t os_n, int dtype, int threads) {
    if (dtype == 0)
        rope(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(cos), static_cast<const uint16_t*>(ssin),
             static_cast<uint16_t*>(out), heads, n, dim, xs_h, xs_n, os_h, os_n, threads);
    else
        rope(static_cast<const float*>(x), static_cast<const float*>(cos), static_cast<const float*>(ssin),
             static_cast<float*>(out), heads, n, dim, xs_h, xs_n, os_h, os_n, threads);
}

}
