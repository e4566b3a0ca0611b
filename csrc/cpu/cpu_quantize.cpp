// Portable NF4 / 8-bit quantize kernels (see cpu_quantize.h): the block loops of the header, one
// block per iteration, blocks shared dynamically among the threads.
#include <omp.h>

#include "cpu_quantize.h"

namespace {

void nf4(const dk::QuantArgs& a, int nthreads) {
    const int64_t nblocks = (a.n + a.blocksize - 1) / a.blocksize;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, dkq::blocks_per_task(a.blocksize))
    for (int64_t b = 0; b < nblocks; ++b) dkq::nf4_block(a, b);
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
