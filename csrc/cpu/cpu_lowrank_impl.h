// The rank-r kernels of cpu_lowrank.h, written once over GCC vectors of VW floats. A unit includes
// this after defining DK_LOWRANK_VW and DK_LOWRANK_NAME (the LowRankKernels object it defines), and
// compiles with its instruction set's -m flags and -ffp-contract=fast (a * b + c becomes one FMA).
//
// Register tiles (accumulators, not counting the operands loaded per step):
//   xat  MR rows of x x JR rows of a, vectors along K, one horizontal sum per output at the end
//   gtx  JR rows of the output x KV vectors along K, one pass over all M rows of g and x (summed in
//        chunks of MCHUNK rows)
//   gb   MR rows of the output x NV vectors along N, R steps
// AVX-512 (32 registers) takes 4x4, 8x3, 4x4; the 16-register units 2x4, 4x2, 2x4. Edges run the
// same code with 1-wide tiles; the last K % VW columns of xat / gtx in scalar code, gb's last N % VW
// columns as a zero-padded vector.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_lowrank.h"

namespace {

constexpr int VW = DK_LOWRANK_VW;
constexpr bool WIDE = VW >= 16;
typedef float vf __attribute__((vector_size(VW * sizeof(float))));

inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf vset(float s) { vf v = {}; return v + s; }
inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VW; ++i) s += v[i];
    return s;
}

// Calls smaller than this many multiply-adds per thread run on fewer threads (a team wake-up costs
// about as much as 0.1 M FMAs of work).
constexpr int64_t GRAIN = int64_t(1) << 18;

inline int team(int64_t work, int nthreads) {
    return (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, work / GRAIN));
}

// ---- xat: y = x a^T ---------------------------------------------------------------------------

// pf: also prefetch the next MR rows (the next tile's), in the tile's first pass (its first JR rows of
// a): each row starts a new page, where the hardware prefetchers start cold.
template <int MR, int JR>
inline void xat_tile(const float* x, int64_t ldx, const float* a, float* y, int64_t K, int64_t R, bool pf = false) {
    vf acc[MR][JR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < JR; ++j) acc[i][j] = vf{};
    int64_t k = 0;
    for (; k + VW <= K; k += VW) {
        vf xv[MR];
        for (int i = 0; i < MR; ++i) xv[i] = vload(x + i * ldx + k);
        if (pf)
            for (int i = 0; i < MR; ++i) __builtin_prefetch(x + (MR + i) * ldx + k);
        for (int j = 0; j < JR; ++j) {
            const vf av = vload(a + j * K + k);
            for (int i = 0; i < MR; ++i) acc[i][j] += xv[i] * av;
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < JR; ++j) {
            float s = hsum(acc[i][j]);
            for (int64_t kk = k; kk < K; ++kk) s += x[i * ldx + kk] * a[j * K + kk];
            y[i * R + j] = s;
        }
}

template <int MR>
inline void xat_rows(const float* x, int64_t ldx, const float* a, float* y, int64_t K, int64_t R, bool pf = false) {
    constexpr int JR = 4;
    int64_t j = 0;
    for (; j + JR <= R; j += JR) xat_tile<MR, JR>(x, ldx, a + j * K, y + j, K, R, pf && j == 0);
    for (; j < R; ++j) xat_tile<MR, 1>(x, ldx, a + j * K, y + j, K, R);
}

void xat(const float* x, int64_t ldx, const float* a, float* y, int64_t M, int64_t K, int64_t R, int nthreads) {
    constexpr int MR = WIDE ? 4 : 2;
    const int64_t tiles = (M + MR - 1) / MR;
#pragma omp parallel for num_threads(team(M * K * R, nthreads)) schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m = t * MR;
        if (m + MR <= M) {
            xat_rows<MR>(x + m * ldx, ldx, a, y + m * R, K, R, m + 2 * MR <= M);
        } else {
            for (int64_t i = m; i < M; ++i) xat_rows<1>(x + i * ldx, ldx, a, y + i * R, K, R);
        }
    }
}

// ---- gtx: out = scale g^T x (and the column sums of x) ------------------------------------------

// Output rows j0 .. j0 + JR, columns k0 .. k0 + KV * VW. The sum over M runs in chunks of MCHUNK rows
// (register accumulators), the chunks added into a second sum: rounding error grows like
// MCHUNK + M / MCHUNK terms instead of M (fp32 gradients summed over thousands of tokens).
constexpr int64_t MCHUNK = 64;

// Each row of a column strip lies in its own 4 KiB page when rows are long, and hardware prefetchers
// stop at page boundaries: every row would be a demand miss. The strip's rows this far ahead are
// prefetched instead (measured in the LoRA layer step at M 512, K = N 1024: 2-3% of the step).
constexpr int64_t GTX_PREFETCH_ROWS = 16;

template <int JR, int KV>
inline void gtx_tile(const float* g, int64_t gsm, int64_t gsj, const float* x, int64_t ldx, float* out, int out_t,
                     float* colsum, float scale, int64_t M, int64_t R, int64_t K, int64_t j0, int64_t k0) {
    vf tot[JR][KV], cst[KV];
    for (int v = 0; v < KV; ++v) {
        cst[v] = vf{};
        for (int j = 0; j < JR; ++j) tot[j][v] = vf{};
    }
    for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
        vf acc[JR][KV], cs[KV];
        for (int v = 0; v < KV; ++v) {
            cs[v] = vf{};
            for (int j = 0; j < JR; ++j) acc[j][v] = vf{};
        }
        const int64_t m1 = std::min(M, m0 + MCHUNK);
        const float* gp = g + m0 * gsm + j0 * gsj;
        const float* xp = x + m0 * ldx + k0;
        for (int64_t m = m0; m < m1; ++m, gp += gsm, xp += ldx) {
            if (m + GTX_PREFETCH_ROWS < M)
                for (int v = 0; v < KV; ++v) __builtin_prefetch(xp + GTX_PREFETCH_ROWS * ldx + v * VW);
            vf xv[KV];
            for (int v = 0; v < KV; ++v) xv[v] = vload(xp + v * VW);
            for (int j = 0; j < JR; ++j) {
                const vf b = vset(gp[j * gsj]);
                for (int v = 0; v < KV; ++v) acc[j][v] += b * xv[v];
            }
            if (colsum)
                for (int v = 0; v < KV; ++v) cs[v] += xv[v];
        }
        for (int v = 0; v < KV; ++v) {
            cst[v] += cs[v];
            for (int j = 0; j < JR; ++j) tot[j][v] += acc[j][v];
        }
    }
    for (int j = 0; j < JR; ++j)
        for (int v = 0; v < KV; ++v) {
            const vf r = tot[j][v] * scale;
            if (!out_t) {
                vstore(out + (j0 + j) * K + k0 + v * VW, r);
            } else {
                for (int l = 0; l < VW; ++l) out[(k0 + v * VW + l) * R + j0 + j] = r[l];
            }
        }
    if (colsum)
        for (int v = 0; v < KV; ++v) vstore(colsum + k0 + v * VW, cst[v]);
}

// Every output row for the columns k0 .. k0 + KV * VW (the column sums with the first tile).
template <int KV>
inline void gtx_cols(const float* g, int64_t gsm, int64_t gsj, const float* x, int64_t ldx, float* out, int out_t,
                     float* colsum, float scale, int64_t M, int64_t R, int64_t K, int64_t k0) {
    constexpr int JR = WIDE ? 8 : 4;
    int64_t j = 0;
    for (; j + JR <= R; j += JR, colsum = nullptr)
        gtx_tile<JR, KV>(g, gsm, gsj, x, ldx, out, out_t, colsum, scale, M, R, K, j, k0);
    for (; j < R; ++j, colsum = nullptr)
        gtx_tile<1, KV>(g, gsm, gsj, x, ldx, out, out_t, colsum, scale, M, R, K, j, k0);
}

void gtx(const float* g, int64_t gsm, int64_t gsj, const float* x, int64_t ldx, float* out, int out_t, float* colsum,
         float scale, int64_t M, int64_t R, int64_t K, int nthreads) {
    constexpr int KV = WIDE ? 3 : 2;
    constexpr int64_t W = KV * VW;
    const int64_t wide = K / W, narrow = (K - wide * W) / VW, k_tail = wide * W + narrow * VW;
#pragma omp parallel num_threads(team(M * K * R, nthreads))
    {
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t t = 0; t < wide + narrow; ++t) {
            if (t < wide) gtx_cols<KV>(g, gsm, gsj, x, ldx, out, out_t, colsum, scale, M, R, K, t * W);
            else gtx_cols<1>(g, gsm, gsj, x, ldx, out, out_t, colsum, scale, M, R, K, wide * W + (t - wide) * VW);
        }
#pragma omp single
        for (int64_t k = k_tail; k < K; ++k) {  // the last K % VW columns
            for (int64_t j = 0; j < R; ++j) {
                float s = 0.0f;
                for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
                    float c = 0.0f;
                    for (int64_t m = m0; m < std::min(M, m0 + MCHUNK); ++m) c += g[m * gsm + j * gsj] * x[m * ldx + k];
                    s += c;
                }
                out[out_t ? k * R + j : j * K + k] = s * scale;
            }
            if (colsum) {
                float s = 0.0f;
                for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
                    float c = 0.0f;
                    for (int64_t m = m0; m < std::min(M, m0 + MCHUNK); ++m) c += x[m * ldx + k];
                    s += c;
                }
                colsum[k] = s;
            }
        }
    }
}

// ---- gb: out = bias + scale g bt ----------------------------------------------------------------

// Output rows 0 .. MR (row stride ldo), columns n0 .. n0 + NV * VW; bt rows have stride ldb. With
// `accumulate`, the output's previous values are kept, times cs[n] when cs is given.
template <int MR, int NV>
inline void gb_tile(const float* g, int64_t gsm, int64_t gsj, const float* bt, int64_t ldb, const float* bias,
                    const float* cs, bool accumulate, float scale, float* out, int64_t ldo, int64_t R, int64_t n0) {
    vf acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = vf{};
    for (int64_t j = 0; j < R; ++j) {
        vf b[NV];
        for (int v = 0; v < NV; ++v) b[v] = vload(bt + j * ldb + n0 + v * VW);
        for (int i = 0; i < MR; ++i) {
            const vf gi = vset(g[i * gsm + j * gsj]);
            for (int v = 0; v < NV; ++v) acc[i][v] += gi * b[v];
        }
    }
    for (int v = 0; v < NV; ++v) {
        const vf bv = bias ? vload(bias + n0 + v * VW) : vf{};
        if (!accumulate) {
            for (int i = 0; i < MR; ++i) vstore(out + i * ldo + n0 + v * VW, bv + acc[i][v] * scale);
        } else {
            const vf cv = cs ? vload(cs + n0 + v * VW) : vset(1.0f);
            for (int i = 0; i < MR; ++i) {
                float* o = out + i * ldo + n0 + v * VW;
                vstore(o, (vload(o) * cv + bv) + acc[i][v] * scale);
            }
        }
    }
}

// MR rows of the output. The last N % VW columns run the same vector code on zero-padded copies of
// their part of bt, bias and cs (bt_tail [R, VW], tail [2 * VW]: bias, then cs) and of the output.
template <int MR>
inline void gb_rows(const float* g, int64_t gsm, int64_t gsj, const float* bt, const float* bias, const float* cs,
                    bool accumulate, const float* bt_tail, const float* tail, float scale, float* out, int64_t N,
                    int64_t R) {
    constexpr int NV = 4;
    int64_t n = 0;
    for (; n + NV * VW <= N; n += NV * VW)
        gb_tile<MR, NV>(g, gsm, gsj, bt, N, bias, cs, accumulate, scale, out, N, R, n);
    for (; n + VW <= N; n += VW) gb_tile<MR, 1>(g, gsm, gsj, bt, N, bias, cs, accumulate, scale, out, N, R, n);
    if (n < N) {
        float tmp[MR * VW] = {};
        if (accumulate)
            for (int i = 0; i < MR; ++i) std::memcpy(tmp + i * VW, out + i * N + n, (N - n) * sizeof(float));
        gb_tile<MR, 1>(g, gsm, gsj, bt_tail, VW, bias ? tail : nullptr, cs ? tail + VW : nullptr, accumulate, scale,
                       tmp, VW, R, 0);
        for (int i = 0; i < MR; ++i) std::memcpy(out + i * N + n, tmp + i * VW, (N - n) * sizeof(float));
    }
}

void gb(const float* g, int64_t gsm, int64_t gsj, const float* bt, const float* bias, const float* cs, int accumulate,
        float scale, float* out, int64_t M, int64_t N, int64_t R, int nthreads) {
    constexpr int MR = WIDE ? 4 : 2;
    const int64_t tiles = (M + MR - 1) / MR, n_tail = N - N % VW;
    std::vector<float> bt_tail(R * VW, 0.0f), tail(2 * VW, 0.0f);
    for (int64_t j = 0; j < R; ++j)
        for (int64_t n = n_tail; n < N; ++n) bt_tail[j * VW + n - n_tail] = bt[j * N + n];
    for (int64_t n = n_tail; n < N; ++n) {
        if (bias) tail[n - n_tail] = bias[n];
        if (cs) tail[VW + n - n_tail] = cs[n];
    }
    const bool acc = accumulate != 0;
#pragma omp parallel for num_threads(team(M * N * std::max<int64_t>(R, 4), nthreads)) schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m = t * MR;
        if (m + MR <= M) {
            gb_rows<MR>(g + m * gsm, gsm, gsj, bt, bias, cs, acc, bt_tail.data(), tail.data(), scale, out + m * N, N, R);
        } else {
            for (int64_t i = m; i < M; ++i)
                gb_rows<1>(g + i * gsm, gsm, gsj, bt, bias, cs, acc, bt_tail.data(), tail.data(), scale, out + i * N, N,
                           R);
        }
    }
}

// ---- colsums: DoRA's per-column sums over dY (and dY * g) ---------------------------------------

// Columns n0 .. n0 + KV * VW over all M rows (chunks of MCHUNK rows, as gtx): db += d, c += d (y - b),
// dg = d * g. Each column has one writer.
template <int KV>
inline void colsums_strip(const float* d, int64_t ldd, const float* y, int64_t ldy, const float* bias, const float* g,
                          float* dg, float* db, float* c, int64_t M, int64_t N, int64_t n0) {
    vf bv[KV], gv[KV], tdb[KV], tc[KV];
    for (int v = 0; v < KV; ++v) {
        bv[v] = bias ? vload(bias + n0 + v * VW) : vf{};
        gv[v] = g ? vload(g + n0 + v * VW) : vf{};
        tdb[v] = vf{};
        tc[v] = vf{};
    }
    for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
        vf adb[KV], ac[KV];
        for (int v = 0; v < KV; ++v) adb[v] = ac[v] = vf{};
        const int64_t m1 = std::min(M, m0 + MCHUNK);
        for (int64_t m = m0; m < m1; ++m) {
            const float* dp = d + m * ldd + n0;
            const float* yp = y ? y + m * ldy + n0 : nullptr;
            if (m + GTX_PREFETCH_ROWS < M)
                for (int v = 0; v < KV; ++v) {
                    __builtin_prefetch(dp + GTX_PREFETCH_ROWS * ldd + v * VW);
                    if (y) __builtin_prefetch(yp + GTX_PREFETCH_ROWS * ldy + v * VW);
                }
            for (int v = 0; v < KV; ++v) {
                const vf dv = vload(dp + v * VW);
                adb[v] += dv;
                if (y) ac[v] += dv * (vload(yp + v * VW) - bv[v]);
                if (dg) vstore(dg + m * N + n0 + v * VW, dv * gv[v]);
            }
        }
        for (int v = 0; v < KV; ++v) {
            tdb[v] += adb[v];
            tc[v] += ac[v];
        }
    }
    for (int v = 0; v < KV; ++v) {
        if (db) vstore(db + n0 + v * VW, tdb[v]);
        if (c) vstore(c + n0 + v * VW, tc[v]);
    }
}

void colsums(const float* d, int64_t ldd, const float* y, int64_t ldy, const float* bias, const float* g, float* dg,
             float* db, float* c, int64_t M, int64_t N, int nthreads) {
    constexpr int KV = 4;
    const int64_t wide = N / (KV * VW), narrow = (N - wide * KV * VW) / VW, n_tail = wide * KV * VW + narrow * VW;
#pragma omp parallel num_threads(team(4 * M * N, nthreads))
    {
#pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < wide + narrow; ++t) {
            if (t < wide) colsums_strip<KV>(d, ldd, y, ldy, bias, g, dg, db, c, M, N, t * KV * VW);
            else colsums_strip<1>(d, ldd, y, ldy, bias, g, dg, db, c, M, N, wide * KV * VW + (t - wide) * VW);
        }
#pragma omp single
        for (int64_t n = n_tail; n < N; ++n) {  // the last N % VW columns, summed in the same order
            const float b = bias ? bias[n] : 0.0f;
            float tdb = 0.0f, tc = 0.0f;
            for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
                float adb = 0.0f, ac = 0.0f;
                for (int64_t m = m0; m < std::min(M, m0 + MCHUNK); ++m) {
                    const float dv = d[m * ldd + n];
                    adb += dv;
                    if (y) ac += dv * (y[m * ldy + n] - b);
                    if (dg) dg[m * N + n] = dv * g[n];
                }
                tdb += adb;
                tc += ac;
            }
            if (db) db[n] = tdb;
            if (c) c[n] = tc;
        }
    }
}

}  // namespace

#include "cpu_gemm_impl.h"

namespace dk {
extern const LowRankKernels DK_LOWRANK_NAME;
const LowRankKernels DK_LOWRANK_NAME = {DK_LOWRANK_ISA, xat, gtx, gb, colsums, gemm_impl::gemm};
}  // namespace dk
