// NF4 dequantization, bit-exact with bitsandbytes.
//
// Format: n elements; packed byte i holds element 2i in its HIGH nibble and 2i+1 in its low
// nibble (odd n: the last low nibble is padding). Blocks of `blocksize` consecutive elements
// (power of two, 32..4096; the last may be partial) share one scale:
//   non-nested: s = absmax_f32[b]
//   nested:     s = __fadd_rn(__fmul_rn(nested_code[absmax_u8[b]], nested_absmax[b / 256]), offset)
//   out[e]      = cast_rn(__fmul_rn(code[nibble(e)], s))        (fp32 | fp16 | bf16, RNE)
// Explicit _rn intrinsics keep every product and sum separately rounded (no FMA contraction).
//
// Algorithm: one thread per 4-byte word of packed input = 8 elements; a warp reads 128 contiguous
// bytes and writes 512 (bf16/fp16) or 1024 (fp32) contiguous bytes per instruction, so loads and
// stores are fully coalesced. Each thread handles kUnroll words a block-width apart and issues all
// their loads before decoding. blocksize is a power of two >= 32, so a word never straddles a
// block: the scale is decoded once per word. The 16-entry code table sits in shared memory. Fast
// path: 32-bit load, 8 products, one 128-bit store (two for fp32). Scalar path: the last partial
// word, and all words when `packed` is not 4-byte or `out` not 16-byte aligned.
//
// Bound: memory. Bytes = n/2 (packed) + nblocks * (4 | 1) (absmax) [+ nblocks/256 * 4] + n * sizeof(out).
// E.g. 14336 x 4096 to bf16, blocksize 64, nested: 29.4 MB + 0.9 MB + 117.4 MB = 148 MB.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "ops.h"

#define DK_STR2(x) #x
#define DK_STR(x) DK_STR2(x)
#ifndef DELTAKERN_CUDA_ARCHS
#define DELTAKERN_CUDA_ARCHS unknown
#endif

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;                     // words per thread per tile
constexpr int kTileWords = kThreads * kUnroll;  // 4 KiB of packed input per block per iteration

__device__ __forceinline__ void store8(float* out, const float (&v)[8]) {
  float4* o = reinterpret_cast<float4*>(out);
  o[0] = make_float4(v[0], v[1], v[2], v[3]);
  o[1] = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half*) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16*) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>  // 16-bit outputs: 8 values = one 128-bit store
__device__ __forceinline__ void store8(T* out, const float (&v)[8]) {
  T* tag = nullptr;
  *reinterpret_cast<uint4*>(out) =
      make_uint4(pack2(v[0], v[1], tag), pack2(v[2], v[3], tag), pack2(v[4], v[5], tag), pack2(v[6], v[7], tag));
}

__device__ __forceinline__ float to_out(float x, float*) { return x; }
__device__ __forceinline__ __half to_out(float x, __half*) { return __float2half_rn(x); }
__device__ __forceinline__ __nv_bfloat16 to_out(float x, __nv_bfloat16*) { return __float2bfloat16_rn(x); }

template <typename T>
__global__ void __launch_bounds__(kThreads)
nf4_dequant_kernel(const uint8_t* __restrict__ packed, const void* __restrict__ absmax, int absmax_is_u8,
                   const float* __restrict__ nested_absmax, const float* __restrict__ nested_code, float offset,
                   const float* __restrict__ code, T* __restrict__ out, int64_t n, int log2_blocksize, int vec) {
  __shared__ float s_code[16];
  if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
  __syncthreads();

  const int64_t nwords = (n + 7) / 8;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kTileWords; base < nwords;
       base += static_cast<int64_t>(gridDim.x) * kTileWords) {
    uint32_t word[kUnroll];
    float scale[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {  // issue every load of the tile first
      const int64_t w = base + threadIdx.x + k * kThreads;
      word[k] = 0;
      scale[k] = 0.f;
      if (w >= nwords) continue;
      if (vec && 8 * w + 8 <= n) word[k] = __ldg(reinterpret_cast<const uint32_t*>(packed) + w);
      const int64_t blk = (8 * w) >> log2_blocksize;
      if (absmax_is_u8) {
        const uint8_t q = static_cast<const uint8_t*>(absmax)[blk];
        scale[k] = __fadd_rn(__fmul_rn(nested_code[q], nested_absmax[blk >> 8]), offset);
      } else {
        scale[k] = static_cast<const float*>(absmax)[blk];
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t w = base + threadIdx.x + k * kThreads;
      const int64_t e0 = 8 * w;
      if (w >= nwords) continue;
      if (vec && e0 + 8 <= n) {
        float v[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // byte j holds elements 2j (high nibble) and 2j+1 (low nibble)
          const uint32_t byte = (word[k] >> (8 * j)) & 0xFFu;
          v[2 * j] = __fmul_rn(s_code[byte >> 4], scale[k]);
          v[2 * j + 1] = __fmul_rn(s_code[byte & 0xFu], scale[k]);
        }
        store8(out + e0, v);
      } else {
        const int64_t end = e0 + 8 < n ? e0 + 8 : n;
#pragma unroll 1
        for (int64_t e = e0; e < end; ++e) {
          const uint32_t byte = packed[e >> 1];
          const uint32_t nib = (e & 1) ? (byte & 0xFu) : (byte >> 4);
          out[e] = to_out(__fmul_rn(s_code[nib], scale[k]), static_cast<T*>(nullptr));
        }
      }
    }
  }
}

template <typename T>
void launch(const void* packed, const void* absmax, int absmax_is_u8, const void* nested_absmax,
            const void* nested_code, float offset, const void* code, void* out, int64_t n, int log2_bs,
            cudaStream_t stream) {
  const bool aligned = (reinterpret_cast<uintptr_t>(packed) % 4 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const int64_t nwords = (n + 7) / 8;
  const int64_t blocks = (nwords + kTileWords - 1) / kTileWords;
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));  // grid-stride beyond
  nf4_dequant_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(packed), absmax, absmax_is_u8, static_cast<const float*>(nested_absmax),
      static_cast<const float*>(nested_code), offset, static_cast<const float*>(code), static_cast<T*>(out), n,
      log2_bs, aligned ? 1 : 0);
}

// Checked once per process: without a usable device, report its error instead of launching.
cudaError_t device_status() {
  static std::atomic<bool> ok{false};
  if (ok.load(std::memory_order_relaxed)) return cudaSuccess;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // do not leave it sticky for the next call
    return err;
  }
  if (count == 0) return cudaErrorNoDevice;
  ok.store(true, std::memory_order_relaxed);
  return cudaSuccess;
}

}  // namespace

extern "C" int deltakern_dequantize_nf4(const void* packed, const void* absmax, int absmax_is_u8,
                                        const void* nested_absmax, const void* nested_code, float offset,
                                        const void* code, void* out, int64_t n, int64_t blocksize, int out_dtype,
                                        uintptr_t stream) {
  if (n < 0 || blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0) return cudaErrorInvalidValue;
  if (out_dtype < 0 || out_dtype > 2) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (!packed || !absmax || !code || !out || (absmax_is_u8 && (!nested_absmax || !nested_code)))
    return cudaErrorInvalidValue;
  if (cudaError_t err = device_status(); err != cudaSuccess) return err;

  int log2_bs = 0;
  while ((int64_t{1} << log2_bs) < blocksize) ++log2_bs;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case 0: launch<float>(packed, absmax, absmax_is_u8, nested_absmax, nested_code, offset, code, out, n, log2_bs, s); break;
    case 1: launch<__half>(packed, absmax, absmax_is_u8, nested_absmax, nested_code, offset, code, out, n, log2_bs, s); break;
    default: launch<__nv_bfloat16>(packed, absmax, absmax_is_u8, nested_absmax, nested_code, offset, code, out, n, log2_bs, s); break;
  }
  return cudaGetLastError();
}

extern "C" const char* deltakern_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

extern "C" int deltakern_cudart_version() { return CUDART_VERSION; }

extern "C" const char* deltakern_cuda_archs() { return DK_STR(DELTAKERN_CUDA_ARCHS); }
