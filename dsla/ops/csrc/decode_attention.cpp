// Decode attention for many requests at once, on the CPU: one query token per request, each
// request's keys and values in its own buffer (any capacity), grouped-query heads.
//
// Built and loaded by dsla/ops/cpu_kernels.py (g++ -O3 -march=native -fopenmp, called through
// ctypes): see that module for the layout of the arguments. The work is split into pieces of at
// most CHUNK tokens of one (request, KV head); each piece computes its G query heads' scores,
// their running maximum, the sum of exponentials and the weighted sum of values (all in float32),
// and a second pass merges a (request, head)'s pieces. So a long cache splits over threads as well
// as many short ones do.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

#include "common.h"

namespace {

constexpr int64_t CHUNK = 128;

struct Item { int64_t rh, start, end; };

// 16 float lanes, written with GCC's vector extensions: AVX-512 does one op per vector, AVX2 two.
template <typename T, int D, int G>
void piece(const T* k, const T* v, int64_t n, const float* q, float* part, const T* next_k) {
    // q: (G, D) float32, already scaled; k, v: n <= CHUNK rows of D; part: G x (2 + D) = max, sum, acc
    constexpr int NV = D / 16;
    for (int64_t b = 0; b < int64_t(8 * D * sizeof(T)); b += 64)  // the next piece's first rows
        __builtin_prefetch(reinterpret_cast<const char*>(next_k) + b);
    vf16 qv[G][NV];
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < NV; ++c) qv[g][c] = load16(q + g * D + c * 16);
    alignas(64) float s[G][CHUNK];
    constexpr int64_t AHEAD = 8;  // rows: the cache comes from memory, not from a warm L1/L2
    for (int64_t j = 0; j < n; ++j) {
        for (int64_t b = 0; b < int64_t(D * sizeof(T)); b += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(k + (j + AHEAD) * D) + b);
            __builtin_prefetch(reinterpret_cast<const char*>(v + j * D) + b);  // read after the scores
        }
        vf16 kf[NV];
        for (int c = 0; c < NV; ++c) kf[c] = load16(k + j * D + c * 16);
        for (int g = 0; g < G; ++g) {
            vf16 t = qv[g][0] * kf[0];
            for (int c = 1; c < NV; ++c) t += qv[g][c] * kf[c];
            s[g][j] = hsum(t);
        }
    }
    float l[G];
    for (int g = 0; g < G; ++g) {
        float mx = -FLT_MAX;
        for (int64_t j = 0; j < n; ++j) mx = s[g][j] > mx ? s[g][j] : mx;
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
            const float p = std::exp(s[g][j] - mx);
            s[g][j] = p;
            sum += p;
        }
        part[g * (2 + D)] = mx;
        l[g] = sum;
    }
    vf16 acc[G][NV] = {};
    for (int64_t j = 0; j < n; ++j) {
        vf16 vv[NV];
        for (int c = 0; c < NV; ++c) vv[c] = load16(v + j * D + c * 16);
        for (int g = 0; g < G; ++g) {
            const float p = s[g][j];
            for (int c = 0; c < NV; ++c) acc[g][c] += p * vv[c];
        }
    }
    for (int g = 0; g < G; ++g) {
        float* pg = part + g * (2 + D);
        pg[1] = l[g];
        for (int c = 0; c < NV; ++c) std::memcpy(pg + 2 + c * 16, &acc[g][c], 64);
    }
}

// One call's arguments (mirrored by dsla/ops/cpu_kernels.py: _Args).
struct Args {
    int64_t R, H, G, D;
    const int64_t* meta;  // R rows of (k address, v address, head stride, length, capacity, heads, head dim,
                          // bytes per element): the last three must match the call
    const void* q;        // (r, h * G + g, d) at r * q_r + (h * G + g) * q_h + d
    int64_t q_r, q_h;
    void* out;            // the same layout with o_r, o_h
    int64_t o_r, o_h;
    const void* k_new;    // when not null: one new token per request, written at row `length` first
    int64_t kn_h, kn_r;   // (h, r, d) at h * kn_h + r * kn_r + d
    const void* v_new;
    int64_t vn_h, vn_r;
    float scale;
    int32_t threads;
};

constexpr int64_t M = 8;  // meta columns

template <typename T, int D, int G>
int run(const Args& a) {
    const int64_t R = a.R, H = a.H, *meta = a.meta;
    const T* q = static_cast<const T*>(a.q);
    T* out = static_cast<T*>(a.out);
    const int add = a.k_new != nullptr;
    std::vector<Item> items;
    std::vector<int64_t> first(R * H + 1);
    for (int64_t r = 0; r < R; ++r) {
        const int64_t L = meta[r * M + 3] + add;
        if (L <= 0) return 2;
        if (L > meta[r * M + 4]) return 5;
        if (meta[r * M + 5] != H || meta[r * M + 6] != D || meta[r * M + 7] != int64_t(sizeof(T))) return 6;
        for (int64_t h = 0; h < H; ++h) {
            first[r * H + h] = int64_t(items.size());
            for (int64_t s = 0; s < L; s += CHUNK) items.push_back({r * H + h, s, s + CHUNK < L ? s + CHUNK : L});
        }
    }
    first[R * H] = int64_t(items.size());
    if (add) {
        const T* kn = static_cast<const T*>(a.k_new);
        const T* vn = static_cast<const T*>(a.v_new);
        for (int64_t r = 0; r < R; ++r)
            for (int64_t h = 0; h < H; ++h) {
                const int64_t row = h * meta[r * M + 2] + meta[r * M + 3] * D;
                std::memcpy(reinterpret_cast<T*>(meta[r * M + 0]) + row, kn + h * a.kn_h + r * a.kn_r, D * sizeof(T));
                std::memcpy(reinterpret_cast<T*>(meta[r * M + 1]) + row, vn + h * a.vn_h + r * a.vn_r, D * sizeof(T));
            }
    }
    const int64_t N = int64_t(items.size()), P = G * (2 + D);
    std::vector<float> parts(N * P);
    const int threads = a.threads;
    const float scale = a.scale;

#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N > 1)
    for (int64_t i = 0; i < N; ++i) {
        const Item it = items[i];
        const int64_t r = it.rh / H, h = it.rh % H;
        const T* kb = reinterpret_cast<const T*>(meta[r * M + 0]) + h * meta[r * M + 2] + it.start * D;
        const T* vb = reinterpret_cast<const T*>(meta[r * M + 1]) + h * meta[r * M + 2] + it.start * D;
        alignas(64) float qf[G * D];
        for (int64_t g = 0; g < G; ++g) {
            const T* qg = q + r * a.q_r + (h * G + g) * a.q_h;
            for (int d = 0; d < D; ++d) qf[g * D + d] = to_float(qg[d]) * scale;
        }
        const T* next_k = kb;
        if (i + 1 < N) {
            const Item nx = items[i + 1];
            next_k = reinterpret_cast<const T*>(meta[nx.rh / H * M]) + nx.rh % H * meta[nx.rh / H * M + 2] + nx.start * D;
        }
        piece<T, D, G>(kb, vb, it.end - it.start, qf, parts.data() + i * P, next_k);
    }

#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && R * H > 1)
    for (int64_t rh = 0; rh < R * H; ++rh) {
        const int64_t r = rh / H, h = rh % H;
        for (int64_t g = 0; g < G; ++g) {
            float M = -FLT_MAX;
            for (int64_t i = first[rh]; i < first[rh + 1]; ++i) {
                const float mi = parts[i * P + g * (2 + D)];
                M = mi > M ? mi : M;
            }
            float l = 0.f, acc[D];
            for (int d = 0; d < D; ++d) acc[d] = 0.f;
            for (int64_t i = first[rh]; i < first[rh + 1]; ++i) {
                const float* pg = parts.data() + i * P + g * (2 + D);
                const float w = std::exp(pg[0] - M);
                l += w * pg[1];
                for (int d = 0; d < D; ++d) acc[d] += w * pg[2 + d];
            }
            const float inv = 1.f / l;
            T* og = out + r * a.o_r + (h * G + g) * a.o_h;
            for (int d = 0; d < D; ++d) store(acc[d] * inv, og + d);
        }
    }
    return 0;
}

template <typename T>
int dispatch(const Args& a) {
    return by_head_dim(a.D, [&](auto d) { return by_group(a.G, [&](auto g) { return run<T, decltype(d)::value, decltype(g)::value>(a); }); });
}

}  // namespace

extern "C" {

// dtype 0: bfloat16, 1: float32. Returns 0 on success; 2: a request with no tokens; 3: G (query
// heads per KV head) not in 1..8; 4: head dim not 32, 64 or 128; 5: no room for the new token;
// 6: a cache's heads, head dim or element size differ from the call's.
int dsla_decode_attention(const Args* a, int dtype) {
    return dtype == 0 ? dispatch<uint16_t>(*a) : dispatch<float>(*a);
}

}
