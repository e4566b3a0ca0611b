// Portable NF4 / 8-bit quantize kernels (see cpu_quantize.h), blocks shared dynamically among the
// threads. Whole NF4 blocks run loops written for the compiler to vectorise (a load templated on
// the input dtype, 32 codes at a time into a small array); the partial last block and the 8-bit
// step run the header's element-by-element loops.
#include <omp.h>

#include "cpu_quantize.h"

namespace {

template <int DT>
inline float load_as(const void* x, int64_t i) {
    if (DT == 2) return dkq::float_of((uint32_t)static_cast<const uint16_t*>(x)[i] << 16);
    if (DT == 0) return static_cast<const float*>(x)[i];
    return dkq::load(x, 1, i);
}

template <int DT>
void nf4_whole_block(const dk::QuantArgs& a, int64_t b) {
    const int64_t bs = a.blocksize, i0 = b * bs;
    uint32_t m = 0;
    for (int64_t i = i0; i < i0 + bs; ++i) {
        const uint32_t v = dkq::bits_of(load_as<DT>(a.x, i)) & 0x7fffffffu;
        m = v > m ? v : m;
    }
    const float absmax = m < 0x00800000u ? 0.f : dkq::float_of(m), inv = dkq::inverse(absmax);
    a.absmax[b] = absmax;
    float t[15];
    for (int j = 0; j < 15; ++j) t[j] = a.table[j];
    for (int64_t i = i0; i < i0 + bs; i += 32) {
        uint8_t c[32];
        for (int k = 0; k < 32; ++k) {
            const float z = dkq::ftz(load_as<DT>(a.x, i + k)) * inv;
            int code = 0;
            for (int j = 0; j < 15; ++j) code += z > t[j];
            c[k] = (uint8_t)code;
        }
        for (int k = 0; k < 16; ++k) a.out[i / 2 + k] = (uint8_t)(c[2 * k] << 4 | c[2 * k + 1]);
    }
}

template <int DT>
void nf4_blocks(const dk::QuantArgs& a, int nthreads) {
    const int64_t nblocks = (a.n + a.blocksize - 1) / a.blocksize;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, dkq::blocks_per_task(a.blocksize))
    for (int64_t b = 0; b < nblocks; ++b) {
        if ((b + 1) * a.blocksize > a.n || a.blocksize % 32) dkq::nf4_block(a, b);
        else nf4_whole_block<DT>(a, b);
    }
}

void nf4(const dk::QuantArgs& a, int nthreads) {
    if (a.x_dtype == 2) nf4_blocks<2>(a, nthreads);
    else if (a.x_dtype == 1) nf4_blocks<1>(a, nthreads);
    else nf4_blocks<0>(a, nthreads);
}

void nested(const dk::QuantArgs& a, int nthreads) {
    const int64_t nblocks = (a.n + a.blocksize - 1) / a.blocksize;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, dkq::blocks_per_task(a.blocksize))
    for (int64_t b = 0; b < nblocks; ++b) dkq::nested_block(a, b);
}

}  // namespace

namespace dk {
const QuantKernels quant_kernels_scalar = {"scalar", nf4, nested};
}
