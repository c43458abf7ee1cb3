// Helpers shared by the kernels in this directory: bfloat16 <-> float32 as torch rounds, 16-lane
// float vectors (GCC vector extensions: one AVX-512 op, or two AVX2 ones), and the dispatch of a
// call's head dim and query-group size to compiled instances. Everything has internal linkage, so
// each file keeps its own copies, built with its own math flags (see SOURCE_FLAGS in cpu_kernels.py).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
// AVX-512 BF16 (vdpbf16ps, the bf16 conversions): the kernels that need it are compiled where the
// CPU has it; elsewhere they return 9 and their *_available() function says 0
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define DSLA_HAVE_BF16 1
#endif

namespace {

#ifdef DSLA_HAVE_BF16
constexpr int kHaveBf16 = 1;
#else
constexpr int kHaveBf16 = 0;
#endif

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {  // bfloat16 bits -> float32
    uint32_t u = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint16_t round_bf16(float f) {  // round to nearest even, NaN kept; branch-free, so loops vectorise
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t r = (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x400000u) : u + 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(r >> 16);
}
inline void store(float f, float* p) { *p = f; }
inline void store(float f, uint16_t* p) { *p = round_bf16(f); }
inline float rounded(float f, float) { return f; }  // the value a tensor of that dtype holds
inline float rounded(float f, uint16_t) { return to_float(round_bf16(f)); }

typedef float vf16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef uint16_t vh16 __attribute__((vector_size(32)));

inline vf16 load16(const float* p) { vf16 x; std::memcpy(&x, p, 64); return x; }
inline vf16 load16(const uint16_t* p) {  // 16 bfloat16 -> float32
    vh16 h;
    std::memcpy(&h, p, 32);
    vu16 u = __builtin_convertvector(h, vu16) << 16;
    vf16 x;
    std::memcpy(&x, &u, 64);
    return x;
}
inline void store16(vf16 x, float* p) { std::memcpy(p, &x, 64); }
inline float hsum(vf16 x) {
    float s = 0.f;
    for (int i = 0; i < 16; ++i) s += x[i];
    return s;
}

template <int N>
using Int = std::integral_constant<int, N>;

// f(Int<D>{}) for a head dim of 32, 64 or 128; else 4 (the callers' code for "head dim not handled")
template <typename F>
int by_head_dim(int64_t D, F&& f) {
    switch (D) {
        case 32: return f(Int<32>{});
        case 64: return f(Int<64>{});
        case 128: return f(Int<128>{});
        default: return 4;
    }
}

// f(Int<G>{}) for 1 to 8 query heads per KV head; else 3
template <typename F>
int by_group(int64_t G, F&& f) {
    switch (G) {
        case 1: return f(Int<1>{});
        case 2: return f(Int<2>{});
        case 3: return f(Int<3>{});
        case 4: return f(Int<4>{});
        case 5: return f(Int<5>{});
        case 6: return f(Int<6>{});
        case 7: return f(Int<7>{});
        case 8: return f(Int<8>{});
        default: return 3;
    }
}

}  // namespace
