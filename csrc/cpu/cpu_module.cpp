// pybind11 module deltakern._cpu: raw pointers (uintptr_t) and sizes in, no torch C++ API.
// The Python launchers in deltakern/_cpu_ext.py validate every tensor before calling these.
// DK_HAVE_AVX2 / DK_HAVE_AVX512 are defined by setup.py when those units were compiled (x86-64).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu_kernels.h"
#include "cpu_lowrank.h"

namespace py = pybind11;

namespace {

bool supports(const std::string& isa) {
    if (isa == "scalar") return true;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
#ifdef DK_HAVE_AVX2
    if (isa == "avx2")
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
#ifdef DK_HAVE_AVX512
    if (isa == "avx512")
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
#endif
    return false;
}

std::string best() {
    for (const char* isa : {"avx512", "avx2"})
        if (supports(isa)) return isa;
    return "scalar";
}

// `isa`, or this CPU's best for ""; ValueError if it is unknown or this CPU or build lacks it.
std::string checked_isa(const std::string& isa) {
    const std::string name = isa.empty() ? best() : isa;
    if (name != "scalar" && name != "avx2" && name != "avx512")
        throw py::value_error("unknown ISA '" + name + "' (expected scalar, avx2 or avx512)");
    if (!supports(name)) throw py::value_error("this CPU or build does not support ISA '" + name + "'");
    return name;
}

// The kernels for `isa` ("" = the best this CPU runs); ValueError as `checked_isa`.
const dk::Kernels& pick(const std::string& isa) {
    const std::string name = checked_isa(isa);
#ifdef DK_HAVE_AVX512
    if (name == "avx512") return dk::kernels_avx512;
#endif
#ifdef DK_HAVE_AVX2
    if (name == "avx2") return dk::kernels_avx2;
#endif
    return dk::kernels_scalar;
}

// Ask for transparent huge pages on the 2 MiB-aligned part of [p, p + nbytes): a fresh large output
// then takes one page fault per 2 MiB instead of per 4 KiB (the faults, not the writes, dominate a
// first touch). Returns whether the advice was given and accepted.
bool advise_hugepages(uintptr_t p, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = uintptr_t(2) << 20, lo = (p + huge - 1) & ~(huge - 1), hi = (p + nbytes) & ~(huge - 1);
    return hi > lo && madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#else
    (void)p; (void)nbytes;
    return false;
#endif
}

template <class T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void bind_quantize(py::module_& m);  // NF4 / 8-bit quantize bindings, defined at the end of this file

// The rank-r kernels for `isa` ("" = the best this CPU runs); ValueError as `pick`.
const dk::LowRankKernels& pick_lowrank(const std::string& isa) {
    const std::string name = pick(isa).name;
#ifdef DK_HAVE_LOWRANK_AVX512
    if (name == "avx512") return dk::lowrank_avx512;
#endif
#ifdef DK_HAVE_LOWRANK_AVX2
    if (name == "avx2" || name == "avx512") return dk::lowrank_avx2;
#endif
    return dk::lowrank_scalar;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "deltakern native CPU kernels (NF4 dequantize, small-M NF4 matmuls)";
    m.def("best_isa", &best, "The ISA the kernels use by default on this CPU.");
    m.def("advise_hugepages", &advise_hugepages, py::arg("ptr"), py::arg("nbytes"),
          "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of a buffer (Linux); whether it was applied.");
    m.def("supports", &supports, py::arg("isa"), "Whether this build and CPU can run `isa`.");
    m.def(
        "dequantize_nf4",
        [](uintptr_t packed, uintptr_t absmax, int nested, uintptr_t nested_absmax, uintptr_t nested_code,
           float offset, uintptr_t code, uintptr_t out, int64_t n, int64_t blocksize, int out_dtype, int streaming,
           int round_dtype, int nthreads, const std::string& isa) {
            const dk::Kernels& k = pick(isa);
            dk::DequantArgs a{ptr<const uint8_t>(packed), ptr<const void>(absmax), nested, ptr<const float>(nested_absmax),
                              ptr<const float>(nested_code), offset, ptr<const float>(code), ptr<void>(out),
                              n, blocksize, out_dtype, streaming, round_dtype};
            py::gil_scoped_release nogil;
            k.dequantize(a, nthreads);
        },
        "out[n] = cast(fp32(code[nibble] * scale[block])) (see cpu_kernels.h); with an fp32 out, round_dtype "
        "(fp16 / bf16) rounds the values to that dtype first");
    m.def(
        "gemv_nf4",
        [](uintptr_t x, uintptr_t packed, uintptr_t absmax, uintptr_t code, uintptr_t bias, uintptr_t out, int64_t M,
           int64_t N, int64_t K, int64_t blocksize, int wdtype, int nthreads, const std::string& isa) {
            const dk::Kernels& k = pick(isa);
            dk::MatArgs a{ptr<const float>(x), ptr<const uint8_t>(packed), ptr<const float>(absmax), ptr<const float>(code),
                          ptr<const float>(bias), ptr<float>(out), M, N, K, blocksize, wdtype};
            py::gil_scoped_release nogil;
            k.gemv(a, nthreads);
        },
        "y[M, N] (fp32) = x[M, K] (fp32) . W^T (+ bias), M <= 16, K % blocksize == 0");
    m.def(
        "dx_nf4",
        [](uintptr_t dy, uintptr_t packed, uintptr_t absmax, uintptr_t code, uintptr_t out, int64_t M, int64_t N,
           int64_t K, int64_t blocksize, int wdtype, int nthreads, const std::string& isa) {
            const dk::Kernels& k = pick(isa);
            dk::MatArgs a{ptr<const float>(dy), ptr<const uint8_t>(packed), ptr<const float>(absmax), ptr<const float>(code),
                          nullptr, ptr<float>(out), M, N, K, blocksize, wdtype};
            py::gil_scoped_release nogil;
            k.dx(a, nthreads);
        },
        "dx[M, K] (fp32) = dy[M, N] (fp32) . W, M <= 16, K % blocksize == 0");
    m.def("lowrank_isa", [](const std::string& isa) { return std::string(pick_lowrank(isa).name); }, py::arg("isa"),
          "The unit the rank-r kernels run for `isa` (\"\" = this CPU's best).");
    m.def(
        "lowrank_xat",
        [](uintptr_t x, int64_t ldx, uintptr_t a, uintptr_t y, int64_t M, int64_t K, int64_t R, int nthreads,
           const std::string& isa) {
            const dk::LowRankKernels& k = pick_lowrank(isa);
            py::gil_scoped_release nogil;
            k.xat(ptr<const float>(x), ldx, ptr<const float>(a), ptr<float>(y), M, K, R, nthreads);
        },
        "y[M, R] = x[M, K] (row stride ldx) . a[R, K]^T, fp32");
    m.def(
        "lowrank_gtx",
        [](uintptr_t g, int64_t gsm, int64_t gsj, uintptr_t x, int64_t ldx, uintptr_t out, int out_t, uintptr_t colsum,
           float scale, int64_t M, int64_t R, int64_t K, int nthreads, const std::string& isa) {
            const dk::LowRankKernels& k = pick_lowrank(isa);
            py::gil_scoped_release nogil;
            k.gtx(ptr<const float>(g), gsm, gsj, ptr<const float>(x), ldx, ptr<float>(out), out_t, ptr<float>(colsum), scale,
                  M, R, K, nthreads);
        },
        "out[R, K] (out_t: [K, R]) = scale * g[M, R]^T . x[M, K]; colsum[K] = sum of x's rows (if not 0), fp32");
    m.def(
        "lowrank_gb",
        [](uintptr_t g, int64_t gsm, int64_t gsj, uintptr_t bt, uintptr_t bias, uintptr_t cs, int accumulate, float scale,
           uintptr_t out, int64_t M, int64_t N, int64_t R, int nthreads, const std::string& isa) {
            const dk::LowRankKernels& k = pick_lowrank(isa);
            py::gil_scoped_release nogil;
            k.gb(ptr<const float>(g), gsm, gsj, ptr<const float>(bt), ptr<const float>(bias), ptr<const float>(cs),
                 accumulate, scale, ptr<float>(out), M, N, R, nthreads);
        },
        "out[M, N] = (accumulate: out * cs[N] (if not 0)) + bias[N] (if not 0) + scale * g[M, R] . bt[R, N], fp32");
    m.def(
        "lowrank_colsums",
        [](uintptr_t d, int64_t ldd, uintptr_t y, int64_t ldy, uintptr_t bias, uintptr_t g, uintptr_t dg, uintptr_t db,
           uintptr_t c, int64_t M, int64_t N, int nthreads, const std::string& isa) {
            const dk::LowRankKernels& k = pick_lowrank(isa);
            py::gil_scoped_release nogil;
            k.colsums(ptr<const float>(d), ldd, ptr<const float>(y), ldy, ptr<const float>(bias), ptr<const float>(g),
                      ptr<float>(dg), ptr<float>(db), ptr<float>(c), M, N, nthreads);
        },
        "db[N] = sum of d's rows, c[N] = sum_m d * (y - bias), dg[M, N] = d * g (each if not 0), fp32");
    m.def(
        "gemm",
        [](uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, int b_nt, uintptr_t b_nf4, uintptr_t absmax, uintptr_t code,
           int64_t blocksize, uintptr_t a2, int64_t lda2, uintptr_t b2, int64_t ldb2, int b2_nt, int64_t R, float scale2,
           uintptr_t proj, int64_t ldp, int proj_t, uintptr_t a2_out, uintptr_t cs, uintptr_t bias, uintptr_t c, int64_t ldc, int accumulate, int64_t M, int64_t N, int64_t K,
           int nthreads,
           const std::string& isa) {
            const dk::LowRankKernels& k = pick_lowrank(isa);
            dk::GemmArgs g{ptr<const float>(a), lda, ptr<const float>(b), ldb, b_nt, ptr<const uint8_t>(b_nf4),
                           ptr<const float>(absmax), ptr<const float>(code), blocksize, ptr<const float>(a2), lda2,
                           ptr<const float>(b2), ldb2, b2_nt, R, scale2, ptr<const float>(proj), ldp, proj_t,
                           ptr<float>(a2_out), ptr<const float>(cs), ptr<const float>(bias),
                           ptr<float>(c), ldc,
                           accumulate, M, N, K};
            py::gil_scoped_release nogil;
            k.gemm(g, nthreads);
        },
        "c[M, N] = ((accumulate: c) + a . op(b) + scale2 * a2 . op2(b2)) * cs + bias, fp32; a2 = a . op(proj) "
        "computed (into a2_out) when proj is given (cpu_lowrank.h GemmArgs)");
    bind_quantize(m);
}

// ---- NF4 quantize and the 8-bit (double quantization) quantize: cpu_quantize*.cpp ---------------

#include "cpu_quantize.h"

namespace {

// The quantize kernels for `isa` ("" = the best this CPU runs): the AVX2 unit serves avx2 and
// avx512 (it has no AVX-512 variant), the portable one scalar. ValueError as `pick`.
const dk::QuantKernels& pick_quantize(const std::string& isa) {
    const std::string name = checked_isa(isa);
#ifdef DK_HAVE_QUANTIZE_AVX2
    if (name != "scalar" && supports("avx2")) return dk::quant_kernels_avx2;
#endif
    return dk::quant_kernels_scalar;
}

void bind_quantize(py::module_& m) {
    m.def("quantize_isa", [](const std::string& isa) { return std::string(pick_quantize(isa).name); }, py::arg("isa"),
          "The unit the quantize kernels run for `isa` (\"\" = this CPU's best).");
    m.def(
        "quantize_nf4",
        [](uintptr_t x, int x_dtype, int64_t n, int64_t blocksize, uintptr_t thresholds, uintptr_t packed,
           uintptr_t absmax, int nthreads, const std::string& isa) {
            const dk::QuantKernels& k = pick_quantize(isa);
            dk::QuantArgs a{ptr<const void>(x), x_dtype, n, blocksize, ptr<const float>(thresholds), ptr<uint8_t>(packed),
                            ptr<float>(absmax)};
            py::gil_scoped_release nogil;
            k.nf4(a, nthreads);
        },
        "packed[(n+1)/2] (uint8), absmax[ceil(n/blocksize)] (fp32) = NF4 of x[n] (fp32/fp16/bf16); see cpu_quantize.h");
    m.def(
        "quantize_nested",
        [](uintptr_t x, int64_t n, uintptr_t midpoints, uintptr_t codes, uintptr_t absmax, int nthreads,
           const std::string& isa) {
            const dk::QuantKernels& k = pick_quantize(isa);
            dk::QuantArgs a{ptr<const void>(x), dk::F32, n, 256, ptr<const float>(midpoints), ptr<uint8_t>(codes),
                            ptr<float>(absmax)};
            py::gil_scoped_release nogil;
            k.nested(a, nthreads);
        },
        "codes[n] (uint8), absmax[ceil(n/256)] (fp32) = 8-bit dynamic-map quantize of x[n] (fp32); see cpu_quantize.h");
}

}  // namespace
