// Portable kernels (any x86-64 / other CPU): the reference loops every ISA unit must agree with.
#include <omp.h>

#include <vector>

#include "cpu_kernels.h"

namespace {

void dequantize(const dk::DequantArgs& a, int nthreads) {
    const int64_t nblocks = cdiv(a.n, a.blocksize);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
        float tab32[16];
        uint16_t tab16[16];
        block_table(a, b, tab32, tab16);
        const int64_t i0 = b * a.blocksize, i1 = i0 + a.blocksize < a.n ? i0 + a.blocksize : a.n;
        dequant_scalar_range(a, tab32, tab16, i0, i1);
    }
}

// Decoded, dtype-rounded table of block `blk`.
inline void weight_table(const dk::MatArgs& a, int64_t blk, float* tab) {
    const float s = a.absmax[blk];
    for (int j = 0; j < 16; ++j) tab[j] = round_to(a.code[j] * s, a.wdtype);
}

// y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]), one output row n per task.
void gemv(const dk::MatArgs& a, int nthreads) {
    const int64_t M = a.M, N = a.N, K = a.K, bs = a.blocksize, bpr = K / bs;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        float acc[16] = {0};
        float tab[16];
        for (int64_t kb = 0; kb < bpr; ++kb) {
            weight_table(a, n * bpr + kb, tab);
            const uint8_t* p = a.packed + (n * K + kb * bs) / 2;
            for (int64_t m = 0; m < M; ++m) {
                const float* x = a.a + m * K + kb * bs;
                float s = 0.f;
                for (int64_t j = 0; j < bs / 2; ++j) {
                    s += tab[p[j] >> 4] * x[2 * j];
                    s += tab[p[j] & 0xf] * x[2 * j + 1];
                }
                acc[m] += s;
            }
        }
        for (int64_t m = 0; m < M; ++m) a.out[m * N + n] = acc[m] + (a.bias ? a.bias[n] : 0.f);
    }
}

// dx[m, k] = sum_n dy[m, n] W[n, k]; each task owns a range of one block's columns for all n.
void dx(const dk::MatArgs& a, int nthreads) {
    const int64_t M = a.M, N = a.N, K = a.K, bs = a.blocksize, bpr = K / bs;
#pragma omp parallel num_threads(nthreads)
    {
        std::vector<float> acc(M * bs);
        float tab[16];
#pragma omp for schedule(static)
        for (int64_t kb = 0; kb < bpr; ++kb) {
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t n = 0; n < N; ++n) {
                weight_table(a, n * bpr + kb, tab);
                const uint8_t* p = a.packed + (n * K + kb * bs) / 2;
                for (int64_t m = 0; m < M; ++m) {
                    const float d = a.a[m * N + n];
                    float* r = acc.data() + m * bs;
                    for (int64_t j = 0; j < bs / 2; ++j) {
                        r[2 * j] += d * tab[p[j] >> 4];
                        r[2 * j + 1] += d * tab[p[j] & 0xf];
                    }
                }
            }
            for (int64_t m = 0; m < M; ++m)
                std::memcpy(a.out + m * K + kb * bs, acc.data() + m * bs, bs * sizeof(float));
        }
    }
}

}  // namespace

namespace dk {
const Kernels kernels_scalar = {"scalar", dequantize, gemv, dx};
}
