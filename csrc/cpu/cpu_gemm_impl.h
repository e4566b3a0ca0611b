// The fp32 GEMM of cpu_lowrank.h (LowRankKernels::gemm), written once over GCC vectors of VW floats;
// included by the cpu_lowrank_*.cpp units after cpu_lowrank_impl.h (same vf, vload, vstore).
//
//     C[M, N] = ((accumulate ? C : 0) + A[M, K] . op(B) + scale2 * A2[M, R] . op2(B2)) * cs[N] + bias[N]
//
// op(B) = B^T for a [N, K] row-major B (nt: y = x W^T), else B as [K, N] rows (dX = dY W); the
// rank-R term (the LoRA term s xa B^T or s dyb A) rides along as R extra steps of the last K block,
// and the column scale (DoRA's g) and the bias are applied as that block's tiles are stored, so C is
// written once, with no separate rank-r or epilogue pass over it. With a projection (proj), A2 =
// A . op(proj) (xa = x A^T, dyb = dY B) is computed from the packed tiles of A before they are used.
//
// Blocking (BLIS's loop nest): K in blocks of KC (+ R in the last), N in blocks of NC. Per block,
// B is packed into NR-wide column panels, k-major; A in MR-tall panels, MC rows at a time; the
// MR x NR microkernel (MR x NV vector accumulators, one broadcast of A and NV vector loads of B per
// step) runs over every panel. Threads split M when there are enough row tiles (all pack B's
// panels, then a barrier; each runs its rows) and else N (each packs its own panels and all of A).
// Every C element has one writer and one summation order (fp32 FMAs, K-block order, k ascending
// within a block), so results never depend on the thread count.
//
// Packing transposes 8 x 8 tiles with AVX shuffles where the unit has them (nt B, and A); NF4 B
// (W as 4-bit codes and fp32 block scales) is decoded while packed: W never exists dense.
#include <cstdlib>
#include <new>

#ifdef __AVX__
#include <immintrin.h>
#endif

namespace {

namespace gemm_impl {

constexpr int G_MR = WIDE ? 12 : (VW == 8 ? 6 : 4);
constexpr int G_NV = 2;
constexpr int G_NR = G_NV * VW;
constexpr int64_t G_KC = 512;
constexpr int64_t G_MC = 8 * G_MR;
constexpr int64_t G_NC = 4096;
constexpr int64_t G_RMAX = 64;

// A grow-only 64-byte-aligned buffer per thread and slot (0: the calling thread's packed B block, 1: a
// worker's packed A block, 2: a worker's packed projection), kept between calls: a fresh megabyte-sized
// allocation would page-fault on every call, which costs as much as packing it.
struct Scratch {
    float* p[3] = {nullptr, nullptr, nullptr};
    size_t n[3] = {0, 0, 0};
    ~Scratch() { std::free(p[0]); std::free(p[1]); std::free(p[2]); }
    float* get(int slot, size_t floats) {
        if (n[slot] < floats) {
            std::free(p[slot]);
            const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
            p[slot] = static_cast<float*>(std::aligned_alloc(64, bytes));
            if (!p[slot]) throw std::bad_alloc();
            n[slot] = floats;
        }
        return p[slot];
    }
};

inline float* scratch(int slot, size_t floats) {
    thread_local Scratch s;
    return s.get(slot, floats);
}

// The epilogue of a tile: c = ((add ? c : 0) + acc) * cs[j] (if cs) + bias[j] (if bias).
struct Epilogue {
    bool add;
    const float* cs;
    const float* bias;
    Epilogue at(int64_t j) const { return {add, cs ? cs + j : nullptr, bias ? bias + j : nullptr}; }
};

// acc = A-panel . B-panel (NV vectors wide) over kc steps, then stored through the epilogue into c
// (row stride ldc)
template <int NV = G_NV>
inline void ukernel(int64_t kc, const float* __restrict ap, const float* __restrict bp, float* c, int64_t ldc,
                    const Epilogue& e) {
    vf acc[G_MR][NV];
    for (int i = 0; i < G_MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = vf{};
    if (e.add)  // the tile written a K block ago: its lines arrive while the k loop runs
        for (int i = 0; i < G_MR; ++i)
            for (int j = 0; j < NV * VW; j += 16) __builtin_prefetch(c + i * ldc + j, 1);
    for (int64_t k = 0; k < kc; ++k) {
        vf b[NV];
        for (int v = 0; v < NV; ++v) b[v] = vload(bp + v * VW);
        __builtin_prefetch(bp + 8 * NV * VW);
        for (int i = 0; i < G_MR; ++i) {
            const float a = ap[i];
            for (int v = 0; v < NV; ++v) acc[i][v] += b[v] * a;
        }
        ap += G_MR;
        bp += NV * VW;
    }
    for (int i = 0; i < G_MR; ++i)
        for (int v = 0; v < NV; ++v) {
            float* p = c + i * ldc + v * VW;
            vf r = e.add ? vload(p) + acc[i][v] : acc[i][v];
            if (e.cs) r *= vload(e.cs + v * VW);
            if (e.bias) r += vload(e.bias + v * VW);
            vstore(p, r);
        }
}

// An edge tile (mr <= MR rows, nr <= NV * VW columns): the full microkernel into a scratch tile.
template <int NV = G_NV>
inline void ukernel_edge(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, const Epilogue& e,
                         int mr, int nr) {
    alignas(64) float t[G_MR * NV * VW];
    ukernel<NV>(kc, ap, bp, t, NV * VW, Epilogue{false, nullptr, nullptr});
    for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nr; ++j) {
            float r = e.add ? c[i * ldc + j] + t[i * NV * VW + j] : t[i * NV * VW + j];
            if (e.cs) r *= e.cs[j];
            if (e.bias) r += e.bias[j];
            c[i * ldc + j] = r;
        }
}

// dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 tile
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
#ifdef __AVX__
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    const __m256 u0 = _mm256_shuffle_ps(t[0], t[2], 0x44), u1 = _mm256_shuffle_ps(t[0], t[2], 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t[1], t[3], 0x44), u3 = _mm256_shuffle_ps(t[1], t[3], 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t[4], t[6], 0x44), u5 = _mm256_shuffle_ps(t[4], t[6], 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t[5], t[7], 0x44), u7 = _mm256_shuffle_ps(t[5], t[7], 0xEE);
    _mm256_storeu_ps(dst + 0 * ldd, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + 1 * ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
#else
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
#endif
}

// The 8 values W[n, k .. k + 8) of an NF4 weight (k % 8 == 0, the 8 within one block): code[nibble] *
// absmax[block], high nibble first (bitsandbytes' order).
inline void nf4_row8(const dk::GemmArgs& g, int64_t n, int64_t k, float* out) {
    const int64_t e = n * g.ldb + k;
    const uint8_t* p = g.b_nf4 + e / 2;
    const float s = g.absmax[e / g.blocksize];
    for (int q = 0; q < 4; ++q) {
        out[2 * q] = g.code[p[q] >> 4] * s;
        out[2 * q + 1] = g.code[p[q] & 15] * s;
    }
}

// Element e = row * ldb + column of an NF4 W: code[nibble] * absmax[block] (high nibble first).
inline float nf4_at(const dk::GemmArgs& g, int64_t e) {
    return g.code[(g.b_nf4[e / 2] >> (e % 2 ? 0 : 4)) & 15] * g.absmax[e / g.blocksize];
}

// Rows [p0, p0 + mr) of the A-side operand x[., ldx] over columns [k0, k0 + kc) into an MR-tall panel
// dst[k * MR + i] (rows past mr zero).
inline void pack_rows(const float* x, int64_t ldx, int mr, int64_t kc, float* dst) {
    int64_t k = 0;
    if (mr == G_MR)
        for (; k + 8 <= kc; k += 8) {
            int i = 0;
            for (; i + 8 <= G_MR; i += 8) transpose8(x + i * ldx + k, ldx, dst + k * G_MR + i, G_MR);
            for (; i < G_MR; ++i)
                for (int q = 0; q < 8; ++q) dst[(k + q) * G_MR + i] = x[i * ldx + k + q];
        }
    for (; k < kc; ++k)
        for (int i = 0; i < G_MR; ++i) dst[k * G_MR + i] = i < mr ? x[i * ldx + k] : 0.0f;
}

// One NR-wide panel of op(B): columns [n0, n0 + nr) over k in [k0, k0 + kc), then (ext) the R rows of
// scale2 * op2(B2): dst[k * NR + j] (columns past nr zero).
void pack_b_panel(const dk::GemmArgs& g, int64_t n0, int nr, int64_t k0, int64_t kc, bool ext, float* dst) {
    int64_t k = 0;
    if (g.b_nf4 && !g.b_nt) {  // W [K, N] rows as NF4 (dX = dY W): decode row segments
        for (; k < kc; ++k) {
            float* d = dst + k * G_NR;
            int j = 0;
            if (nr == G_NR)
                for (; j < G_NR; j += 8) nf4_row8(g, k0 + k, n0 + j, d + j);
            for (; j < G_NR; ++j) {
                const int64_t e = (k0 + k) * g.ldb + n0 + j;
                d[j] = j < nr ? nf4_at(g, e) : 0.0f;
            }
        }
    } else if (g.b_nf4) {  // W [N, K] as NF4 (nt): decode 8 x 8 tiles, transpose
        alignas(32) float tile[64];
        if (nr == G_NR)
            for (; k + 8 <= kc; k += 8)
                for (int j = 0; j < G_NR; j += 8) {
                    for (int i = 0; i < 8; ++i) nf4_row8(g, n0 + j + i, k0 + k, tile + 8 * i);
                    transpose8(tile, 8, dst + k * G_NR + j, G_NR);
                }
        for (; k < kc; ++k)
            for (int j = 0; j < G_NR; ++j) {
                const int64_t e = (n0 + j) * g.ldb + k0 + k;
                dst[k * G_NR + j] = j < nr ? nf4_at(g, e) : 0.0f;
            }
    } else if (g.b_nt) {  // B [N, K]: transpose
        const float* src = g.b + n0 * g.ldb + k0;
        if (nr == G_NR)
            for (; k + 8 <= kc; k += 8)
                for (int j = 0; j < G_NR; j += 8) transpose8(src + j * g.ldb + k, g.ldb, dst + k * G_NR + j, G_NR);
        for (; k < kc; ++k)
            for (int j = 0; j < G_NR; ++j) dst[k * G_NR + j] = j < nr ? src[j * g.ldb + k] : 0.0f;
    } else {  // B [K, N]: row segments
        const float* src = g.b + k0 * g.ldb + n0;
        for (; k < kc; ++k) {
            float* d = dst + k * G_NR;
            if (nr == G_NR) std::memcpy(d, src + k * g.ldb, sizeof(float) * G_NR);
            else
                for (int j = 0; j < G_NR; ++j) d[j] = j < nr ? src[k * g.ldb + j] : 0.0f;
        }
    }
    if (!ext) return;
    float* d = dst + kc * G_NR;
    for (int64_t q = 0; q < g.R; ++q)
        for (int j = 0; j < G_NR; ++j)
            d[q * G_NR + j] = j >= nr ? 0.0f
                              : g.scale2 * (g.b2_nt ? g.b2[(n0 + j) * g.ldb2 + q] : g.b2[q * g.ldb2 + n0 + j]);
}

// The projection a2 = a . op(proj) (R columns, op(proj) = proj^T for proj_t: proj [R, K]) is computed
// from the packed A tiles while they are in L1, one VW-wide panel of op(proj) at a time (rpack: its
// K block's ceil(R / VW) panels, kc x VW each), into a2_out's rows, K block by K block.
void pack_proj(const dk::GemmArgs& g, int64_t k0, int64_t kc, float* rpack) {
    for (int64_t q = 0; q * VW < g.R; ++q)
        for (int64_t k = 0; k < kc; ++k)
            for (int j = 0; j < VW; ++j) {
                const int64_t col = q * VW + j;
                float v = 0.0f;
                if (col < g.R) v = g.proj_t ? g.proj[col * g.ldp + k0 + k] : g.proj[(k0 + k) * g.ldp + col];
                rpack[(q * kc + k) * VW + j] = v;
            }
}

// Pack row tile [row, row + mr) of A for K block kb into dst (kc steps, then in the last block the
// tile's R rank-term steps from a2). With proj: first add the tile's a . op(proj) over this block
// into a2_out (so a2 is complete when the last block packs it).
void pack_tile(const dk::GemmArgs& g, int64_t kb, int64_t nkb, int64_t row, int mr, float* dst, const float* rpack,
               bool proj) {
    const int64_t k0 = kb * G_KC, kc = std::min(G_KC, g.K - k0);
    pack_rows(g.a + row * g.lda + k0, g.lda, mr, kc, dst);
    if (proj)
        for (int64_t q = 0; q * VW < g.R; ++q)
            ukernel_edge<1>(kc, dst, rpack + q * kc * VW, g.a2_out + row * g.R + q * VW, g.R,
                            Epilogue{kb > 0, nullptr, nullptr}, mr, (int)std::min<int64_t>(VW, g.R - q * VW));
    if (kb == nkb - 1 && g.a2) pack_rows(g.a2 + row * g.lda2, g.lda2, mr, g.R, dst + kc * G_MR);
}

// Rows [m_lo, m_hi) x panels [p_lo, p_hi) of the N block at n0 (nc columns) for K block kb; bpack holds
// the block's packed panels (kx = kc + the rank-R steps in the last block), panel p at p * NR * kx_max
// (a fixed place: in the N split a thread repacks its panels for the next K block while another
// still reads its own). proj: also compute these rows' projection (see pack_tile).
void gemm_block(const dk::GemmArgs& g, int64_t n0, int64_t nc, int64_t kb, int64_t nkb, int64_t m_lo, int64_t m_hi,
                int64_t p_lo, int64_t p_hi, const float* bpack, int64_t kx_max, float* apack, const float* rpack,
                bool proj) {
    const int64_t k0 = kb * G_KC, kc = std::min(G_KC, g.K - k0);
    const bool last = kb == nkb - 1, ext = last && g.a2;
    const int64_t kx = kc + (ext ? g.R : 0);
    const Epilogue e{g.accumulate || kb > 0, last ? g.cs : nullptr, last && g.bias ? g.bias + n0 : nullptr};
    for (int64_t m0 = m_lo; m0 < m_hi; m0 += G_MC) {
        const int64_t mc = std::min(G_MC, m_hi - m0);
        for (int64_t i = 0; i < mc; i += G_MR)
            pack_tile(g, kb, nkb, m0 + i, (int)std::min<int64_t>(G_MR, mc - i), apack + i * kx, rpack, proj);
        for (int64_t p = p_lo; p < p_hi; ++p) {
            const int nr = (int)std::min<int64_t>(G_NR, nc - p * G_NR);
            const float* bp = bpack + p * G_NR * kx_max;
            const Epilogue ep = e.at(p * G_NR);
            for (int64_t i = 0; i < mc; i += G_MR) {
                const int mr = (int)std::min<int64_t>(G_MR, mc - i);
                float* c = g.c + (m0 + i) * g.ldc + n0 + p * G_NR;
                if (mr == G_MR && nr == G_NR) ukernel(kx, apack + i * kx, bp, c, g.ldc, ep);
                else ukernel_edge(kx, apack + i * kx, bp, c, g.ldc, ep, mr, nr);
            }
        }
    }
}

// Threads split M (each a share of MR-row tiles over every panel; the panels of a K block are packed
// by all threads, then a barrier) when there are enough rows for every thread to have several MC
// blocks' worth; otherwise they split the panels of N (each packs and uses its own panels, and packs
// all of A: no barriers; a projection is then computed first, rows split, then a barrier). Either way
// each C element (and a2 element) has one writer and one summation order.
void gemm(const dk::GemmArgs& args, int nthreads) {
    dk::GemmArgs g = args;
    if (g.proj) {  // the rank term's A2 is the projection, computed here
        g.a2 = g.a2_out;
        g.lda2 = g.R;
    }
    const int64_t M = g.M, N = g.N, K = g.K;
    if (M <= 0 || N <= 0) return;
    const int64_t nkb = std::max<int64_t>(1, (K + G_KC - 1) / G_KC);
    const int64_t nc_max = std::min<int64_t>(N, G_NC), panels_max = (nc_max + G_NR - 1) / G_NR;
    const int64_t tiles = (M + G_MR - 1) / G_MR;
    const bool split_m = tiles >= 4 * (int64_t)nthreads;
    const int T = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, split_m ? tiles : panels_max));
    const int64_t kx_max = std::min(G_KC, K) + (g.a2 ? g.R : 0);
    const int64_t rpanels = g.proj ? (g.R + VW - 1) / VW : 0;
    float* bpack = scratch(0, panels_max * G_NR * kx_max);  // may throw std::bad_alloc (MemoryError)
    int no_memory = 0;
#pragma omp parallel num_threads(T)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float *apack = nullptr, *rpack = nullptr;
        try {  // no exception may leave a parallel region: every thread learns of a failure, then returns
            apack = scratch(1, G_MC * kx_max);
            if (g.proj) rpack = scratch(2, rpanels * VW * std::min(G_KC, K));
        } catch (const std::bad_alloc&) {
#pragma omp atomic write
            no_memory = 1;
        }
#pragma omp barrier
        int failed;
#pragma omp atomic read
        failed = no_memory;
        if (!failed) {  // the same branch for every thread: the worksharing and barriers below match
            const int64_t row_share = (tiles + nt - 1) / nt * G_MR;
            const int64_t m_lo = std::min(M, t * row_share), m_hi = std::min(M, m_lo + row_share);
            if (g.proj && !split_m) {  // the projection first: this thread's rows, every K block
                dk::GemmArgs only = g;
                only.a2 = nullptr;  // pack and project; the rank steps are packed in the main pass
                for (int64_t kb = 0; kb < nkb; ++kb) {
                    const int64_t k0 = kb * G_KC, kc = std::min(G_KC, K - k0);
                    pack_proj(g, k0, kc, rpack);
                    for (int64_t row = m_lo; row < m_hi; row += G_MR)
                        pack_tile(only, kb, nkb, row, (int)std::min<int64_t>(G_MR, m_hi - row), apack, rpack, true);
                }
#pragma omp barrier
            }
            for (int64_t n0 = 0; n0 < N; n0 += G_NC) {
                const int64_t nc = std::min(G_NC, N - n0), panels = (nc + G_NR - 1) / G_NR;
                const bool proj = g.proj && split_m && n0 == 0;  // projected in the first N block's passes
                for (int64_t kb = 0; kb < nkb; ++kb) {
                    const int64_t k0 = kb * G_KC, kc = std::min(G_KC, K - k0);
                    const bool ext = kb == nkb - 1 && g.a2;
                    if (proj) pack_proj(g, k0, kc, rpack);
                    if (split_m) {
#pragma omp for schedule(static)
                        for (int64_t p = 0; p < panels; ++p)
                            pack_b_panel(g, n0 + p * G_NR, (int)std::min<int64_t>(G_NR, nc - p * G_NR), k0, kc, ext,
                                         bpack + p * G_NR * kx_max);  // implicit barrier: every panel packed
                        gemm_block(g, n0, nc, kb, nkb, m_lo, m_hi, 0, panels, bpack, kx_max, apack, rpack, proj);
#pragma omp barrier
                    } else {
                        const int64_t share = (panels + nt - 1) / nt;
                        const int64_t p_lo = std::min(panels, t * share), p_hi = std::min(panels, p_lo + share);
                        for (int64_t p = p_lo; p < p_hi; ++p)
                            pack_b_panel(g, n0 + p * G_NR, (int)std::min<int64_t>(G_NR, nc - p * G_NR), k0, kc, ext,
                                         bpack + p * G_NR * kx_max);
                        gemm_block(g, n0, nc, kb, nkb, 0, M, p_lo, p_hi, bpack, kx_max, apack, nullptr, false);
                    }
                }
                if (!split_m && n0 + G_NC < N) {
#pragma omp barrier
                }  // the next N block's shares differ: no thread repacks a panel another still reads
            }
        }
    }
}

}  // namespace gemm_impl

}  // namespace
