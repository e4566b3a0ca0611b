// C ABI of the deltakern CUDA kernels. Device pointers and streams travel as plain
// integers, so the Python binding needs neither CUDA headers nor the torch C++ API.
#pragma once
#include <cstdint>

extern "C" {

// Dequantize an NF4 tensor of n elements (see nf4.cu). Returns a cudaError_t value, 0 on success.
int deltakern_dequantize_nf4(const void* packed, const void* absmax, int absmax_is_u8,
                             const void* nested_absmax, const void* nested_code, float offset,
                             const void* code, void* out, int64_t n, int64_t blocksize,
                             int out_dtype, uintptr_t stream);

// cudaGetErrorString of a cudaError_t value.
const char* deltakern_error_string(int code);

// CUDART_VERSION the module was built against, e.g. 13000.
int deltakern_cudart_version();

// Architectures the module was built for, e.g. "80;86;89;90".
const char* deltakern_cuda_archs();

}  // extern "C"
