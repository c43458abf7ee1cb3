// A linear layer y = x W^T on the CPU in bfloat16 whose weight is kept as one-byte codes: W[n, k] =
// bfloat16(d * q + m), q an int8 code, d and m float32 per output column and group of 32 inputs. A
// teacher dequantised from GGUF's Q4_1 (q in 0..15) or Q8_0 (m = 0) gives back its weights exactly
// in this form, so the result is the bf16 linear's, at ~1.25 bytes a weight against 2.
//
// Why: a decode step of ~48 requests reads every weight once from memory for 48 rows of work. In
// bfloat16 that read (~270 MB a step for SmolLM2-135M) costs about as much as the arithmetic, and
// oneDNN reached 370-760 GFLOP/s there against 890-970 at 512 rows (docs/results/speed.md 0j).
//
// How: the output columns are cut into blocks of 64, spread over the threads (with the rows too where
// the blocks do not divide evenly). For each block a
// thread decodes the codes into a bfloat16 panel in vdpbf16ps's pair layout (K/2 rows of 64 columns
// x 2 inputs, in L2), then runs register tiles of up to 6 rows x 64 columns over it with float32
// sums, rounded to bfloat16 at the end as torch rounds.
//
// Layouts (built by dsla/model/quant.py ``pack_codes``):
//   codes (N/64, K/2, 64, 2) int8: [b][p][j][i] = q[64 b + j, 2 p + i]
//   dm    (N/64, K/32, 2, 64) float32: [b][g][0][j] = d, [b][g][1][j] = m of column 64 b + j, group g
// Where the CPU has no AVX-512 BF16 the call returns 9 (cpu_kernels.py asks
// dsla_coded_linear_available() first; the packed bf16 weight serves there).
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#include "common.h"

namespace {

struct Args {
    int64_t M, N, K;
    const uint16_t* x;   // (M, K) bfloat16, row stride x_m
    int64_t x_m;
    const int8_t* codes;
    const float* dm;
    uint16_t* out;       // (M, N) bfloat16, row stride o_m
    int64_t o_m;
    int32_t threads;
};

#ifdef DSLA_HAVE_BF16

constexpr int NB = 64;  // output columns per block (4 vectors of 16)
constexpr int MR = 6;   // rows per register tile (24 accumulators)
constexpr int G = 32;   // inputs per group of d, m

// the codes of one column block -> its bfloat16 panel (K/2, 64, 2)
void decode_panel(const int8_t* codes, const float* dm, int64_t K, uint16_t* panel) {
    const __m512i lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    for (int64_t g = 0; g < K / G; ++g) {
        // d and m of the 64 columns, each repeated for its pair: vector c holds columns 8c..8c+7
        __m512 d[8], m[8];
        for (int c = 0; c < 8; ++c) {
            const float* p = dm + (g * 2) * NB + 16 * (c / 2);
            d[c] = _mm512_permutexvar_ps(c % 2 ? hi : lo, _mm512_loadu_ps(p));
            m[c] = _mm512_permutexvar_ps(c % 2 ? hi : lo, _mm512_loadu_ps(p + NB));
        }
        for (int64_t p = g * (G / 2); p < (g + 1) * (G / 2); ++p) {
            const int8_t* src = codes + p * 2 * NB;
            uint16_t* dst = panel + p * 2 * NB;
            for (int c = 0; c < 8; c += 2) {
                __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(src + 16 * c))));
                __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(src + 16 * c + 16))));
                // d * q rounded, then the add rounded, as pack_codes checks it in torch (built with
                // -ffp-contract=off: no fused multiply-add, so this holds for any d, not only a float16's)
                a = _mm512_add_ps(_mm512_mul_ps(a, d[c]), m[c]);
                b = _mm512_add_ps(_mm512_mul_ps(b, d[c + 1]), m[c + 1]);
                _mm512_storeu_si512(dst + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(b, a));
            }
        }
    }
}

// The cache lines of the block a thread decodes next, fetched into L2 a few at a time while this
// block's tiles run (a burst of hundreds would mostly be dropped by the prefetcher's queue).
struct Prefetch {
    const char* codes = nullptr;  // K lines
    const char* dm = nullptr;     // K / 32 * 8 lines
    int64_t first = 0, count = 0; // this tile's share of the K + K / 4 lines
    int64_t code_lines = 0;
    inline void line(int64_t i) const {
        i += first;
        _mm_prefetch(i < code_lines ? codes + 64 * i : dm + 64 * (i - code_lines), _MM_HINT_T1);
    }
};

template <int R>
void tile(const uint16_t* x, int64_t x_m, const uint16_t* panel, int64_t K, uint16_t* out, int64_t o_m,
          const Prefetch& pf) {
    // pf.count lines over the K/2 iterations: ``per`` lines every ``step`` iterations (a countdown,
    // no division in the loop)
    const int64_t P = K / 2;
    const int64_t per = pf.count ? (pf.count + P - 1) / P : 0;
    const int64_t step = pf.count ? (P * per / pf.count > 1 ? P * per / pf.count : 1) : 0;
    int64_t wait = step, issued = 0;
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < K / 2; ++p) {
        if (step && --wait == 0) {
            wait = step;
            for (int64_t i = 0; i < per && issued < pf.count; ++i) pf.line(issued++);
        }
        const uint16_t* w = panel + p * 2 * NB;
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 32),
                       w2 = (__m512bh)_mm512_loadu_si512(w + 64), w3 = (__m512bh)_mm512_loadu_si512(w + 96);
        for (int r = 0; r < R; ++r) {
            int32_t pair;
            std::memcpy(&pair, x + r * x_m + 2 * p, 4);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xb, w2);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xb, w3);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j)
            _mm256_storeu_si256((__m256i*)(out + r * o_m + 16 * j), (__m256i)_mm512_cvtneps_pbh(acc[r][j]));
}

// rows i0..i1 of column block b, over its decoded panel; ``next``/``next_dm``: the codes of the
// block to prefetch meanwhile (or null)
void rows(const Args& a, const uint16_t* panel, int64_t b, int64_t i0, int64_t i1, const int8_t* next,
          const float* next_dm) {
    const uint16_t* x = a.x + i0 * a.x_m;
    uint16_t* out = a.out + i0 * a.o_m + b * NB;
    const int64_t n = i1 - i0, tiles = (n + MR - 1) / MR, lines = a.K + a.K / 4;
    Prefetch pf;
    pf.codes = (const char*)next;
    pf.dm = (const char*)next_dm;
    pf.code_lines = a.K;
    auto share = [&](int64_t t) {  // tile t's lines
        pf.first = next ? lines * t / tiles : 0;
        pf.count = next ? lines * (t + 1) / tiles - pf.first : 0;
    };
    int64_t i = 0, t = 0;
    for (; i + MR <= n; i += MR, ++t) {
        share(t);
        tile<MR>(x + i * a.x_m, a.x_m, panel, a.K, out + i * a.o_m, a.o_m, pf);
    }
    share(t);
    const uint16_t* xr = x + i * a.x_m;
    uint16_t* o = out + i * a.o_m;
    switch (n - i) {
        case 1: tile<1>(xr, a.x_m, panel, a.K, o, a.o_m, pf); break;
        case 2: tile<2>(xr, a.x_m, panel, a.K, o, a.o_m, pf); break;
        case 3: tile<3>(xr, a.x_m, panel, a.K, o, a.o_m, pf); break;
        case 4: tile<4>(xr, a.x_m, panel, a.K, o, a.o_m, pf); break;
        case 5: tile<5>(xr, a.x_m, panel, a.K, o, a.o_m, pf); break;
        default: break;
    }
}

int run(const Args& a) {
    const int64_t blocks = a.N / NB;
    const int64_t T = a.threads > 1 && blocks > 1 ? a.threads : 1;
    // Work units: (block, part of the rows), cut into one contiguous range per thread. Where the blocks
    // do not divide evenly among the threads (9 blocks of a 576-wide output on 2), each block's rows
    // are cut in T parts, so the arithmetic splits evenly; a block shared by two threads is decoded by both.
    const int64_t parts = blocks % T && a.M >= 2 * MR * T ? T : 1;
    const int64_t units = blocks * parts;
#pragma omp parallel num_threads(T) if (T > 1)
    {
        static thread_local std::vector<uint16_t> panel;  // one per thread, grown to the largest K seen
        if ((int64_t)panel.size() < a.K * NB) panel.resize(a.K * NB);
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t u0 = units * t / nt, u1 = units * (t + 1) / nt;
        int64_t decoded = -1;
        for (int64_t u = u0; u < u1; ++u) {
            const int64_t b = u / parts, part = u % parts;
            if (b != decoded) {
                decode_panel(a.codes + b * a.K * NB, a.dm + b * (a.K / G) * 2 * NB, a.K, panel.data());
                decoded = b;
            }
            // while the last unit of a block runs, the next block's codes are fetched
            const bool last = u + 1 == u1 || (u + 1) / parts != b;
            const bool more = u + 1 < u1;
            rows(a, panel.data(), b, a.M * part / parts, a.M * (part + 1) / parts,
                 last && more ? a.codes + (b + 1) * a.K * NB : nullptr,
                 last && more ? a.dm + (b + 1) * (a.K / G) * 2 * NB : nullptr);
        }
    }
    return 0;
}

#endif  // DSLA_HAVE_BF16

}  // namespace

extern "C" {

// Returns 0 on success; 2: M < 1, N not a multiple of 64 or K not a multiple of 32;
// 9: this CPU (or this build) has no AVX-512 BF16.
int dsla_coded_linear(const Args* a) {
#ifdef DSLA_HAVE_BF16
    if (a->M < 1 || a->N < NB || a->N % NB || a->K < G || a->K % G) return 2;
    return run(*a);
#else
    (void)a;
    return 9;
#endif
}

// Whether this build has the kernel (the CPU has AVX-512 BF16).
int dsla_coded_linear_available() { return kHaveBf16; }

}
