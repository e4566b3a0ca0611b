// pybind11 module deltakern._C: thin wrappers over the C ABI in ops.h. Device pointers and the
// cudaStream_t are Python ints (tensor.data_ptr(), stream.cuda_stream); every kernel entry point
// returns a cudaError_t value (0 = OK) that deltakern/_ext.py turns into a Python exception.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "ops.h"

namespace py = pybind11;

#define DK_STR2(x) #x
#define DK_STR(x) DK_STR2(x)
#ifndef DELTAKERN_VERSION
#define DELTAKERN_VERSION 0.0.0
#endif

namespace {

const void* ptr(std::uintptr_t p) { return reinterpret_cast<const void*>(p); }

int dequantize_nf4(std::uintptr_t packed, std::uintptr_t absmax, int absmax_is_u8, std::uintptr_t nested_absmax,
                   std::uintptr_t nested_code, float offset, std::uintptr_t code, std::uintptr_t out, int64_t n,
                   int64_t blocksize, int out_dtype, std::uintptr_t stream) {
  return deltakern_dequantize_nf4(ptr(packed), ptr(absmax), absmax_is_u8, ptr(nested_absmax), ptr(nested_code), offset,
                                  ptr(code), reinterpret_cast<void*>(out), n, blocksize, out_dtype, stream);
}

std::string version() {
  const int v = deltakern_cudart_version();
  std::string archs = deltakern_cuda_archs();  // "80_86_89_90"
  std::string s = std::string(DK_STR(DELTAKERN_VERSION)) + " (CUDA runtime " + std::to_string(v / 1000) + "." +
                  std::to_string((v % 1000) / 10) + ", sm_";
  for (char ch : archs) s += (ch == '_') ? std::string(" sm_") : std::string(1, ch);
  return s + ")";
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deltakern CUDA kernels (pointer-based C ABI; no torch C++ API)";
  m.def("dequantize_nf4", &dequantize_nf4, py::arg("packed_ptr"), py::arg("absmax_ptr"), py::arg("absmax_is_u8"),
        py::arg("nested_absmax_ptr"), py::arg("nested_code_ptr"), py::arg("offset"), py::arg("code_ptr"),
        py::arg("out_ptr"), py::arg("n"), py::arg("blocksize"), py::arg("out_dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Dequantize n NF4 elements into out (out_dtype 0=fp32, 1=fp16, 2=bf16) on `stream`. "
        "Returns a cudaError_t value, 0 on success.");
  m.def("error_string", [](int code) { return std::string(deltakern_error_string(code)); }, py::arg("code"),
        "cudaGetErrorString(code).");
  m.def("version", &version, "Package version, CUDA runtime and architectures this module was built for.");
}
