// deltakern._cpu: the rank-r products of a LoRA layer and the packed GEMM of its large products,
// fp32, row-major.
//
//     xat   y[M, R]    = x[M, K] . a[R, K]^T                  xa = x A^T, dyb = dY B (a = B^T)
//     gtx   out[R, K]  = scale * g[M, R]^T . x[M, K]           dA = s dyb^T x, dB^T = s xa^T dY
//           colsum[K]  = sum_m x[m, :]                         (optional: db = sum of dY's rows)
//     gb    out[M, N]  = bias[N] + scale * g[M, R] . bt[R, N]   the rank-r term of y and of dX
//           (or, in place, out * cs[N] + that)                    DoRA's forward epilogue
//     colsums  db = sum_m dY, c = sum_m dY (y - b), dY * g     DoRA's backward: one pass over dY and y
//
// R is small (the LoRA rank, <= 64 here) and M, K, N large: BLAS packs and blocks for square-ish
// products and runs these at 25-45 GFLOP/s on two cores; each is instead one streaming pass over
// its large operand (x, or the output of gb) with the small one held in L1, register tiles of
// MR x JR accumulators (vector FMAs; two loads per tile row). M K R multiply-adds per call.
//
// Arithmetic: fp32 multiply-adds (contracted to FMA), summed in a fixed order for every thread count
// (each output element has one writer), so results never depend on the schedule; they differ from
// BLAS's by fp32 rounding only (the tests bound both against float64).
//
// The same source (cpu_lowrank_impl.h) compiles once per instruction set, with vectors of VW
// floats: cpu_lowrank_scalar.cpp (SSE2, VW 4), cpu_lowrank_avx2.cpp (VW 8), cpu_lowrank_avx512.cpp
// (VW 16); cpu_module.cpp picks one at run time as it picks the NF4 kernels.
#pragma once

#include <cstdint>

namespace dk {

// The GEMM of the layers (cpu_gemm_impl.h), fp32, cs and bias optional (null: 1 and 0):
//     C[M, N] = ((accumulate ? C : 0) + A[M, K] . op(B) + scale2 * A2[M, R] . op2(B2)) * cs[N] + bias[N]
// op(B) = B^T for b_nt (B [N, K] rows, stride ldb) else B ([K, N] rows). B is fp32 at b, or (b_nf4
// not null) an NF4 W: 4-bit codes with absmax[e / blocksize] for element e = row * ldb + column of
// its row-major [rows, ldb] layout (fp32 scales, code[16]; ldb % 8 == 0, so each aligned run of 8
// lies in one block). op2(B2) = B2^T for b2_nt (B2 [N, R], stride ldb2) else B2 ([R, N]); a2 null:
// no rank-R term. R <= 64. With proj (then a2 is null): the kernel computes A2 = A . op(proj) itself
// into a2_out [M, R] (contiguous) and uses it, op(proj) = proj^T for proj_t (proj [R, K], stride ldp)
// else proj ([K, R]): xa = x A^T in the forward, dyb = dY B in dX's GEMM, from A's packed tiles.
struct GemmArgs {
    const float* a; int64_t lda;
    const float* b; int64_t ldb; int b_nt;
    const uint8_t* b_nf4; const float* absmax; const float* code; int64_t blocksize;
    const float* a2; int64_t lda2; const float* b2; int64_t ldb2; int b2_nt; int64_t R; float scale2;
    const float* proj; int64_t ldp; int proj_t; float* a2_out;
    const float* cs; const float* bias;
    float* c; int64_t ldc; int accumulate;
    int64_t M, N, K;
};

struct LowRankKernels {
    const char* name;
    // y[m * R + j] = sum_k x[m * ldx + k] * a[j * K + k]
    void (*xat)(const float* x, int64_t ldx, const float* a, float* y, int64_t M, int64_t K, int64_t R, int nthreads);
    // out[j * K + k] (out_t: out[k * R + j]) = scale * sum_m g[m * gsm + j * gsj] * x[m * ldx + k];
    // colsum (if not null)[k] = sum_m x[m * ldx + k]
    void (*gtx)(const float* g, int64_t gsm, int64_t gsj, const float* x, int64_t ldx, float* out, int out_t,
                float* colsum, float scale, int64_t M, int64_t R, int64_t K, int nthreads);
    // out[m * N + n] = (bias ? bias[n] : 0) + scale * sum_j g[m * gsm + j * gsj] * bt[j * N + n]; with
    // accumulate, out[m * N + n] * (cs ? cs[n] : 1) + that (in place: DoRA's y = (x W^T) g + b + s xa (gB)^T)
    void (*gb)(const float* g, int64_t gsm, int64_t gsj, const float* bt, const float* bias, const float* cs,
               int accumulate, float scale, float* out, int64_t M, int64_t N, int64_t R, int nthreads);
    // DoRA's column sums over dY = d: db[n] = sum_m d[m, n], c[n] = sum_m d[m, n] * (y[m, n] - bias[n]) (y and
    // c null: skipped; bias null: 0) and, if dg is not null, dg[m * N + n] = d[m, n] * g[n]; summed in
    // MCHUNK-row chunks as gtx
    void (*colsums)(const float* d, int64_t ldd, const float* y, int64_t ldy, const float* bias, const float* g,
                    float* dg, float* db, float* c, int64_t M, int64_t N, int nthreads);
    void (*gemm)(const GemmArgs& args, int nthreads);
};

extern const LowRankKernels lowrank_scalar;
extern const LowRankKernels lowrank_avx2;
extern const LowRankKernels lowrank_avx512;

}  // namespace dk
