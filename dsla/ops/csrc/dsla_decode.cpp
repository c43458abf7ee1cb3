// A DSLA layer's decode step with an exact window, on the CPU: everything between the layer's
// projections and RoPE for R requests, one token each, in one call (dsla.model.dsla's
// window_decode_layer computes the same in torch ops; see dsla/ops/window.py window_decode_math).
//
// Per (request r, KV head h), one work item, spread over torch's OpenMP threads:
//   1. the gates' decays from the key before RoPE (sigmoid of a per-head linear map);
//   2. the key leaving the window (ring row length % W) enters the states once the window and the
//      sinks are full: S <- diag(exp(log decay)) S + phi(k_out)^T [v_out, 1], every state;
//   3. the states read out by the query features phi(q) weighted per state (gamma, 1 - gamma);
//   4. the new key and value written over the leaving ones (and as a sink while length < sinks);
//   5. softmax scores over the window (and the sinks that left it), minus their maximum, summed
//      with and without the values, scaled by the head's window factor and added to the readout;
//   6. o = u[:V] / (u[V] + eps).
// Each feature map is [softmax(xW), softmax(-xW)], xW rounded to the model dtype first, the
// features rounded to it after, as the torch form rounds; the readout u is rounded to the model
// dtype before the division, as there. The states (float32) are updated in place, the ring and
// sinks written in place.
//
// Built and loaded by dsla/ops/cpu_kernels.py (its window_decode_cpu gives the layout).
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

#include "common.h"

namespace {

constexpr int MAX_K = 512;   // feature width 2F
constexpr int MAX_W = 8192;  // window rows

// One call's arguments (mirrored by dsla/ops/cpu_kernels.py: _WindowArgs). Every tensor contiguous.
struct Args {
    int64_t R, H, G, D, F, S, W, NS;  // requests, KV heads, query heads per KV head, head dim,
                                      // feature dim (K = 2F), states, window rows, sinks
    const void* q;       // (R, H, G, D) after RoPE
    const void* k;       // (R, H, D) after RoPE
    const void* k_raw;   // (R, H, D) before RoPE (the gates' input)
    const void* v;       // (R, H, D)
    const void* w_fq;    // (H, D, F)
    const void* w_fk;    // (H, D, F)
    const void* w_hist;  // (H, D, K) the history gate
    const void* b_hist;  // (H, K)
    const void* w_rec;   // (H, D, K) the recency gate, with two states (else null)
    const void* b_rec;   // (H, K)
    const void* mix_logits;  // (H, G): gamma = sigmoid(mix_logits), with two states (else null)
    const void* window_log_scale;  // (H, G): the window factor exp(window_log_scale)
    float* states;       // (R, H, S, K, D + 1), updated in place
    void* ring_k;        // (R, H, W, D), written in place
    void* ring_v;
    void* sink_k;        // (R, H, NS, D) or null
    void* sink_v;
    const int64_t* lengths;  // (R): tokens seen before this one
    void* out;           // (R, H, G, D)
    float eps;
    int32_t threads;
};

// [softmax(x W), softmax(-x W)] for x (D), W (D, F): xW rounded to T first, features rounded to T.
template <typename T, int D>
void features(const T* x, const T* w, int64_t F, float* out) {
    alignas(64) float y[MAX_K / 2];
    for (int64_t f0 = 0; f0 < F; f0 += 16) {
        vf16 acc = {};
        for (int d = 0; d < D; ++d) acc += to_float(x[d]) * load16(w + d * F + f0);
        store16(acc, y + f0);
    }
    float hi = -FLT_MAX, lo = FLT_MAX;
    for (int64_t f = 0; f < F; ++f) {
        y[f] = rounded(y[f], T());
        hi = y[f] > hi ? y[f] : hi;
        lo = y[f] < lo ? y[f] : lo;
    }
    float sp = 0.f, sn = 0.f;
    for (int64_t f = 0; f < F; ++f) {
        out[f] = std::exp(y[f] - hi);
        out[F + f] = std::exp(lo - y[f]);
        sp += out[f];
        sn += out[F + f];
    }
    const float ip = 1.f / sp, in = 1.f / sn;
    for (int64_t f = 0; f < F; ++f) {
        out[f] = rounded(out[f] * ip, T());
        out[F + f] = rounded(out[F + f] * in, T());
    }
}

template <typename T, int D, int G>
void item(const Args& a, int64_t r, int64_t h) {
    constexpr int NV = D / 16;
    const int64_t H = a.H, F = a.F, K = 2 * F, S = a.S, W = a.W, NS = a.NS, V1 = D + 1;
    const int64_t rh = r * H + h, len = a.lengths[r];
    const T* q = static_cast<const T*>(a.q) + rh * G * D;
    const T* k = static_cast<const T*>(a.k) + rh * D;
    const T* kraw = static_cast<const T*>(a.k_raw) + rh * D;
    const T* v = static_cast<const T*>(a.v) + rh * D;
    T* rk = static_cast<T*>(a.ring_k) + rh * W * D;
    T* rv = static_cast<T*>(a.ring_v) + rh * W * D;
    T* sk = NS ? static_cast<T*>(a.sink_k) + rh * NS * D : nullptr;
    T* sv = NS ? static_cast<T*>(a.sink_v) + rh * NS * D : nullptr;
    float* st = a.states + rh * S * K * V1;

    // 1. the decays of the key before RoPE, per state (float32)
    alignas(64) float decay[2][MAX_K];
    for (int64_t s = 0; s < S; ++s) {
        const T* w = static_cast<const T*>(s ? a.w_rec : a.w_hist) + h * D * K;
        const T* b = static_cast<const T*>(s ? a.b_rec : a.b_hist) + h * K;
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
            vf16 acc = {};
            for (int d = 0; d < D; ++d) acc += to_float(kraw[d]) * load16(w + d * K + k0);
            store16(acc, decay[s] + k0);
        }
        for (int64_t j = 0; j < K; ++j)  // exp(logsigmoid(z)) = sigmoid(z), within an ulp or two
            decay[s][j] = 1.f / (1.f + std::exp(-(decay[s][j] + to_float(b[j]))));
    }
    // 2. + 3. the leaving token into the states, and the readout, in one pass over the states
    const int64_t pos = len % W;
    const bool entering = len >= W + NS;
    alignas(64) float fk[MAX_K], vout[D + 16];
    if (entering) {
        features<T, D>(rk + pos * D, static_cast<const T*>(a.w_fk) + h * D * F, F, fk);
        for (int d = 0; d < D; ++d) vout[d] = to_float(rv[pos * D + d]);
    }
    alignas(64) float fq[G][MAX_K];
    for (int g = 0; g < G; ++g) features<T, D>(q + g * D, static_cast<const T*>(a.w_fq) + h * D * F, F, fq[g]);
    vf16 u[G][NV] = {};
    float un[G] = {};
    for (int64_t s = 0; s < S; ++s) {
        float qm[G][MAX_K];
        for (int g = 0; g < G; ++g) {
            float m = 1.f;  // one state: weight 1; two: gamma, then 1 - gamma (float32, as state_mix)
            if (S == 2) {
                const float gamma = 1.f / (1.f + std::exp(-to_float(static_cast<const T*>(a.mix_logits)[h * G + g])));
                m = s ? 1.f - gamma : gamma;
            }
            for (int64_t j = 0; j < K; ++j) qm[g][j] = fq[g][j] * m;
        }
        for (int64_t j = 0; j < K; ++j) {
            float* row = st + (s * K + j) * V1;
            const float dk = decay[s][j];
            vf16 x[NV];
            for (int c = 0; c < NV; ++c) x[c] = load16(row + c * 16) * dk;
            float xn = row[D] * dk;
            if (entering) {
                const float f = fk[j];
                for (int c = 0; c < NV; ++c) x[c] += f * load16(vout + c * 16);
                xn += f;
            }
            for (int c = 0; c < NV; ++c) store16(x[c], row + c * 16);
            row[D] = xn;
            for (int g = 0; g < G; ++g) {
                const float w = qm[g][j];
                for (int c = 0; c < NV; ++c) u[g][c] += w * x[c];
                un[g] += w * xn;
            }
        }
    }
    // 4. the new token over the leaving one; a sink while the sinks are not yet full
    std::memcpy(rk + pos * D, k, D * sizeof(T));
    std::memcpy(rv + pos * D, v, D * sizeof(T));
    if (NS && len < NS) {
        std::memcpy(sk + len * D, k, D * sizeof(T));
        std::memcpy(sv + len * D, v, D * sizeof(T));
    }
    // 5. the window's softmax scores (rows 0..min(len, W-1)) and the sinks outside it
    const int64_t n = len < W ? len + 1 : W;
    const int64_t ns = NS && len >= W ? (len - W + 1 < NS ? len - W + 1 : NS) : 0;
    const float scale = 1.f / std::sqrt(float(D));
    vf16 qv[G][NV];
    for (int g = 0; g < G; ++g)
        for (int c = 0; c < NV; ++c) qv[g][c] = load16(q + g * D + c * 16) * scale;
    thread_local std::vector<float> scores;  // G rows of n + ns (one buffer per thread, grown once)
    const int64_t stride = W + NS;
    if (int64_t(scores.size()) < G * stride) scores.resize(G * stride);
    float* const sb = scores.data();
    auto score = [&](const T* kb, int64_t rows, int64_t at) {
        for (int64_t j = 0; j < rows; ++j) {
            __builtin_prefetch(kb + (j + 8) * D);
            vf16 kf[NV];
            for (int c = 0; c < NV; ++c) kf[c] = load16(kb + j * D + c * 16);
            for (int g = 0; g < G; ++g) {
                vf16 t = qv[g][0] * kf[0];
                for (int c = 1; c < NV; ++c) t += qv[g][c] * kf[c];
                sb[g * stride + at + j] = hsum(t);
            }
        }
    };
    score(rk, n, 0);
    if (ns) score(sk, ns, n);
    const int64_t total = n + ns;
    float den[G];
    for (int g = 0; g < G; ++g) {
        float mx = -FLT_MAX;
        float* sg = sb + g * stride;
        for (int64_t j = 0; j < total; ++j) mx = sg[j] > mx ? sg[j] : mx;
        float sum = 0.f;
        for (int64_t j = 0; j < total; ++j) {
            const float p = std::exp(sg[j] - mx);
            sg[j] = p;
            sum += p;
        }
        den[g] = sum;
    }
    vf16 num[G][NV] = {};
    auto values = [&](const T* vb, int64_t rows, int64_t at) {
        for (int64_t j = 0; j < rows; ++j) {
            __builtin_prefetch(vb + (j + 8) * D);
            vf16 vv[NV];
            for (int c = 0; c < NV; ++c) vv[c] = load16(vb + j * D + c * 16);
            for (int g = 0; g < G; ++g) {
                const float p = sb[g * stride + at + j];
                for (int c = 0; c < NV; ++c) num[g][c] += p * vv[c];
            }
        }
    };
    values(rv, n, 0);
    if (ns) values(sv, ns, n);
    // 6. u = readout + factor * (num, den), rounded to T; o = u[:D] / (u[D] + eps)
    T* o = static_cast<T*>(a.out) + rh * G * D;
    for (int g = 0; g < G; ++g) {
        const float f = std::exp(to_float(static_cast<const T*>(a.window_log_scale)[h * G + g]));
        const float dn = rounded(rounded(un[g] + f * den[g], T()) + a.eps, T());
        alignas(64) float uc[D];
        for (int c = 0; c < NV; ++c) store16(u[g][c] + f * num[g][c], uc + c * 16);
        for (int d = 0; d < D; ++d) store(rounded(uc[d], T()) / dn, o + g * D + d);
    }
}

template <typename T, int D, int G>
int run(const Args& a) {
    const int64_t N = a.R * a.H;
    const int threads = a.threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && N > 1)
    for (int64_t i = 0; i < N; ++i) item<T, D, G>(a, i / a.H, i % a.H);
    return 0;
}

template <typename T>
int dispatch(const Args& a) {
    if (a.F <= 0 || a.F % 16 || 2 * a.F > MAX_K) return 7;
    if (a.S < 1 || a.S > 2 || a.W < 1 || a.W > MAX_W || a.NS < 0 || a.NS > 64) return 8;
    for (int64_t r = 0; r < a.R; ++r)
        if (a.lengths[r] < 0) return 2;
    return by_head_dim(a.D, [&](auto d) { return by_group(a.G, [&](auto g) { return run<T, decltype(d)::value, decltype(g)::value>(a); }); });
}

}  // namespace

extern "C" {

// dtype 0: bfloat16, 1: float32 (q, k, k_raw, v, the weights, rings, sinks and out alike). Returns 0
// on success; 2: a negative length; 3: G not in 1..8; 4: head dim not 32, 64 or 128; 7: feature
// dim not a multiple of 16 up to 256; 8: states not 1 or 2, window not in 1..8192, or sinks not in 0..64.
int dsla_window_decode(const Args* a, int dtype) {
    return dtype == 0 ? dispatch<uint16_t>(*a) : dispatch<float>(*a);
}

}
