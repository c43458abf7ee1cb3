// Causal attention for a prefill chunk on the CPU, bfloat16, with AVX-512 BF16 dot products: L new
// queries over T keys, the last L of which are theirs (query i sits at position T - L + i and sees
// keys 0..T-L+i), grouped-query heads.
//
// Flash-attention style: the keys and values of each KV head are first packed in pairs for
// vdpbf16ps; then for each block of query rows (BQ positions x G query heads), key blocks of 64 are
// scored (float32 sums of bfloat16 products), the running maximum and sum are updated, and the
// exponentials, rounded to bfloat16, are multiplied into the values. The scores never leave the
// registers and L1, and key blocks past a block's last position are skipped.
// Where the CPU has no AVX-512 BF16 the call returns 9; dsla/ops/cpu_kernels.py asks
// dsla_prefill_attention_available() first and runs torch's SDPA there (and for other dtypes or
// head dims, which prefill_kernel() refuses before calling).
//
// Built and loaded by dsla/ops/cpu_kernels.py (prefill_attention_cpu gives the layout).
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#include "common.h"

namespace {

struct Args {
    int64_t H, G, L, T, D;       // KV heads, query heads per KV head, queries, keys, head dim
    const uint16_t* q;           // (h * G + g, i, d) at (h * G + g) * q_h + i * q_l + d
    int64_t q_h, q_l;
    const uint16_t* k;           // (h, t, d) at h * k_h + t * k_t + d
    int64_t k_h, k_t;
    const uint16_t* v;
    int64_t v_h, v_t;
    uint16_t* out;               // like q, with o_h, o_l
    int64_t o_h, o_l;
    float scale;
    int32_t threads;
};

#ifdef DSLA_HAVE_BF16

constexpr int BK = 64;  // keys per block (4 vectors of 16)
constexpr int BQ = 16;  // query positions per work item
constexpr int RT = 4;   // query rows per register tile

inline __m512 exp512(__m512 x) {  // e^x for x <= 0 (x - max), ~1 ulp; very negative x gives ~0
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);  // NaN stays NaN (maxps returns its second operand)
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

inline uint32_t pair(const uint16_t* lo, const uint16_t* hi) { return uint32_t(*lo) | (uint32_t(*hi) << 16); }

// keys of one head, packed per block of 16 keys and pair of dims: kp[(t/16)][d/2][t%16] (2 x bf16 each)
void pack_k(const uint16_t* k, int64_t k_t, int64_t T, int64_t D, uint32_t* kp) {
    const int64_t blocks = (T + 15) / 16;
    for (int64_t b = 0; b < blocks; ++b)
        for (int64_t p = 0; p < D / 2; ++p)
            for (int64_t j = 0; j < 16; ++j) {
                const int64_t t = b * 16 + j;
                kp[(b * (D / 2) + p) * 16 + j] = t < T ? pair(k + t * k_t + 2 * p, k + t * k_t + 2 * p + 1) : 0u;
            }
}

// values of one head, packed per pair of keys: vp[t/2][d] = (v[t][d], v[t+1][d])
void pack_v(const uint16_t* v, int64_t v_t, int64_t T, int64_t D, uint32_t* vp) {
    const int64_t pairs = (T + 1) / 2;
    const uint16_t zero = 0;
    for (int64_t j = 0; j < pairs; ++j)
        for (int64_t d = 0; d < D; ++d) {
            const int64_t t = 2 * j;
            vp[j * D + d] = pair(v + t * v_t + d, t + 1 < T ? v + (t + 1) * v_t + d : &zero);
        }
}

template <int D>
void block(const Args& a, int64_t h, int64_t i0, const uint32_t* kp, const uint32_t* vp) {
    constexpr int NP = D / 2, NV = D / 16;
    const int64_t G = a.G, L = a.L, T = a.T;
    const int64_t nq = i0 + BQ <= L ? BQ : L - i0;
    const int64_t M = nq * G, Mp = (M + RT - 1) / RT * RT;  // rows (i, g), padded to the tile
    alignas(64) uint32_t qb[BQ * 8][NP];                    // query rows as bf16 pairs
    alignas(64) float ob[BQ * 8][D];                        // running outputs
    float mrow[BQ * 8], lrow[BQ * 8];
    int64_t pos[BQ * 8];
    for (int64_t r = 0; r < Mp; ++r) {
        const int64_t i = r < M ? i0 + r / G : i0 + nq - 1, g = r < M ? r % G : 0;
        pos[r] = T - L + i;
        if (r < M) std::memcpy(qb[r], a.q + (h * G + g) * a.q_h + i * a.q_l, D * 2);
        else std::memset(qb[r], 0, D * 2);
        mrow[r] = -FLT_MAX;
        lrow[r] = 0.f;
        std::memset(ob[r], 0, D * 4);
    }
    const int64_t last = T - L + i0 + nq - 1;  // the block's last position: keys past it are skipped
    const int64_t first_masked = T - L + i0;   // key blocks ending at or before this need no mask
    const __m512 scale = _mm512_set1_ps(a.scale);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    alignas(64) uint16_t pb[RT][BK];
    for (int64_t t0 = 0; t0 <= last; t0 += BK) {
        const bool masked = t0 + BK - 1 > first_masked;
        const uint32_t* kb = kp + (t0 / 16) * NP * 16;
        for (int64_t r0 = 0; r0 < Mp; r0 += RT) {
            __m512 s[RT][4];
            for (int r = 0; r < RT; ++r)
                for (int c = 0; c < 4; ++c) s[r][c] = _mm512_setzero_ps();
            for (int p = 0; p < NP; ++p) {
                __m512bh kv[4];
                for (int c = 0; c < 4; ++c)
                    kv[c] = (__m512bh)_mm512_loadu_si512(kb + (c * NP + p) * 16);
                for (int r = 0; r < RT; ++r) {
                    const __m512bh qv = (__m512bh)_mm512_set1_epi32(int(qb[r0 + r][p]));
                    for (int c = 0; c < 4; ++c) s[r][c] = _mm512_dpbf16_ps(s[r][c], qv, kv[c]);
                }
            }
            float alpha[RT];
            for (int r = 0; r < RT; ++r) {
                __mmask16 ok[4];
                __m512 mx = _mm512_set1_ps(-FLT_MAX);
                for (int c = 0; c < 4; ++c) {
                    s[r][c] = _mm512_mul_ps(s[r][c], scale);
                    const __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(int(t0 + 16 * c)));
                    ok[c] = masked ? _mm512_cmple_epi32_mask(key, _mm512_set1_epi32(int(pos[r0 + r]))) : 0xffff;
                    mx = _mm512_mask_max_ps(mx, ok[c], mx, s[r][c]);
                }
                const float m_old = mrow[r0 + r];
                float m_new = std::fmax(m_old, _mm512_reduce_max_ps(mx));
                for (int c = 0; c < 4; ++c)  // a NaN score (a NaN or infinite q or k) makes the row NaN, as in SDPA
                    if (_mm512_mask_cmp_ps_mask(ok[c], s[r][c], s[r][c], _CMP_UNORD_Q)) m_new = NAN;
                if (m_old != m_old) m_new = m_old;
                const __m512 mv = _mm512_set1_ps(m_new);
                __m512 sum = _mm512_setzero_ps();
                for (int c = 0; c < 4; ++c) {
                    const __m512 e = _mm512_maskz_mov_ps(ok[c], exp512(_mm512_sub_ps(s[r][c], mv)));
                    const __m256bh eb = _mm512_cvtneps_pbh(e);  // rounded to bf16, as multiplied into v
                    sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(eb));
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb[r] + 16 * c), (__m256i)eb);
                }
                alpha[r] = std::exp(m_old - m_new);
                mrow[r0 + r] = m_new;
                lrow[r0 + r] = lrow[r0 + r] * alpha[r] + _mm512_reduce_add_ps(sum);
            }
            // ob[rows] = alpha * ob + P (RT x 64, bf16) . V (64 x D), 64 dims at a time
            const uint32_t* vb = vp + (t0 / 2) * D;
            const int64_t npairs = (t0 + BK <= T ? BK : T - t0 + 1) / 2;
            for (int d0 = 0; d0 < D; d0 += 64) {
                constexpr int CV = NV < 4 ? NV : 4;
                __m512 o[RT][CV];
                for (int r = 0; r < RT; ++r)
                    for (int c = 0; c < CV; ++c)
                        o[r][c] = _mm512_mul_ps(_mm512_loadu_ps(ob[r0 + r] + d0 + 16 * c), _mm512_set1_ps(alpha[r]));
                for (int64_t j = 0; j < npairs; ++j) {
                    __m512bh vv[CV];
                    for (int c = 0; c < CV; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vb + j * D + d0 + 16 * c);
                    for (int r = 0; r < RT; ++r) {
                        uint32_t pp;
                        std::memcpy(&pp, pb[r] + 2 * j, 4);
                        const __m512bh pv = (__m512bh)_mm512_set1_epi32(int(pp));
                        for (int c = 0; c < CV; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], pv, vv[c]);
                    }
                }
                for (int r = 0; r < RT; ++r)
                    for (int c = 0; c < CV; ++c) _mm512_storeu_ps(ob[r0 + r] + d0 + 16 * c, o[r][c]);
            }
        }
    }
    for (int64_t r = 0; r < M; ++r) {
        const int64_t i = i0 + r / G, g = r % G;
        uint16_t* o = a.out + (h * G + g) * a.o_h + i * a.o_l;
        const float inv = 1.f / lrow[r];
        for (int d = 0; d < D; ++d) o[d] = round_bf16(ob[r][d] * inv);
    }
}

template <int D>
int run(const Args& a) {
    const int64_t H = a.H, T = a.T, L = a.L;
    // whole blocks of 64 keys are read: 3 blocks of 16 keys of slack (zeros) after the last
    const int64_t kp_size = ((T + 15) / 16 + 3) * 16 * (D / 2), vp_size = (T + 1) / 2 * D;
    std::vector<uint32_t> kp(H * kp_size, 0u), vp(H * vp_size);
    const int threads = a.threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && H > 1)
    for (int64_t h = 0; h < H; ++h) {
        pack_k(a.k + h * a.k_h, a.k_t, T, D, kp.data() + h * kp_size);
        pack_v(a.v + h * a.v_h, a.v_t, T, D, vp.data() + h * vp_size);
    }
    const int64_t nb = (L + BQ - 1) / BQ, N = H * nb;
    // the costliest (latest) query blocks first, handed out one at a time: their key ranges differ
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && N > 1)
    for (int64_t n = 0; n < N; ++n) {
        const int64_t b = nb - 1 - n / H, h = n % H;
        block<D>(a, h, b * BQ, kp.data() + h * kp_size, vp.data() + h * vp_size);
    }
    return 0;
}

#endif  // DSLA_HAVE_BF16

}  // namespace

extern "C" {

// Returns 0 on success; 3: G not in 1..8; 4: head dim not 32, 64 or 128; 5: L > T or L < 1;
// 9: this CPU (or this build) has no AVX-512 BF16.
int dsla_prefill_attention(const Args* a) {
#ifdef DSLA_HAVE_BF16
    if (a->G < 1 || a->G > 8) return 3;
    if (a->L < 1 || a->L > a->T) return 5;
    switch (a->D) {
        case 32: return run<32>(*a);
        case 64: return run<64>(*a);
        case 128: return run<128>(*a);
        default: return 4;
    }
#else
    (void)a;
    return 9;
#endif
}

// Whether this build has the kernel (the CPU has AVX-512 BF16).
int dsla_prefill_attention_available() { return kHaveBf16; }

}
