// deltakern._cpu: native CPU NF4 quantize (4-bit codes + fp32 absmax) and the 8-bit dynamic-map
// quantize of double quantization, bit-exact with triton_kernels/nf4_ref.py (bitsandbytes' CUDA
// rule with the correctly rounded reciprocal).
//
// One implementation per instruction set, each in its own translation unit: cpu_quantize.cpp
// (portable; the loops every other unit must agree with) and cpu_quantize_avx2.cpp (AVX2+F16C,
// also used on AVX-512 CPUs). cpu_module.cpp picks one at run time. There is no AVX-512 unit: a
// 16-lane version (vpermps binary search, k-masks) ran only 1.1-1.2x faster than the AVX2 one on
// 4096x4096 fp32/bf16 (one thread, round-robin, a busy 2-core machine), not worth a third copy.
//
// The rule, per block of `blocksize` consecutive elements of the flat input (the last block padded
// with zeros), with ftz(t) = +0 when t is subnormal (exponent bits all zero), else t:
//     v      = ftz(fp32(x))
//     absmax = max |v|                       (stored; max of |bits| as integers, NaN wins)
//     inv    = ftz(1 / absmax)               (IEEE division: correctly rounded; +inf when absmax = 0)
//     z      = fp32(v * inv)                 (NaN when v = 0 and inv = +inf, or on NaN input)
//     NF4:    code = #{ j : t_j < z }        over the 15 sorted thresholds t (strict: a tie takes
//                                            the lower code; NaN compares false, code 0)
//     8-bit:  q    = #{ j : m_j < z }        over the 255 sorted fp32 midpoints m of the map, then
//                                            q + 1 if q is odd and m_q == z (a tie goes to the
//                                            even index); NaN -> 0
// NF4 packs byte i = code(2i) << 4 | code(2i + 1); an odd n packs the code of the pad z = 0 * inv.
// A subnormal z is not flushed: it gets the code of 0 either way (every threshold and midpoint is
// at least 2.7e-7 in magnitude), and the result does not depend on the MXCSR FTZ/DAZ bits.
//
// Threads: OpenMP teams of the caller's size (torch.get_num_threads()); blocks are taken
// dynamically in chunks of about 64K elements; each block is written by one thread, so the output
// never depends on the thread count. Bounds: reads 2 or 4 bytes and writes 0.5 byte per element;
// the AVX2 code does 6 compares and 3 permutes per 8 elements (a two-level search over the
// thresholds) and, for the 8-bit step, 9 gathers per 8 elements (a binary search).
#pragma once

#include <cstdint>
#include <cstring>

namespace dk {

struct QuantArgs {
    const void* x;        // [n] fp32 / fp16 / bf16 (dk::Dtype), contiguous
    int x_dtype;
    int64_t n;
    int64_t blocksize;    // a power of two in [32, 4096] for NF4; 256 for the 8-bit step
    const float* table;   // NF4: the 15 thresholds; 8-bit: the 255 midpoints (sorted ascending)
    uint8_t* out;         // NF4: packed [(n + 1) / 2]; 8-bit: codes [n]
    float* absmax;        // [ceil(n / blocksize)]
};

struct QuantKernels {
    const char* name;
    void (*nf4)(const QuantArgs&, int nthreads);
    void (*nested)(const QuantArgs&, int nthreads);  // fp32 x only
};

extern const QuantKernels quant_kernels_scalar;
extern const QuantKernels quant_kernels_avx2;

}  // namespace dk

namespace dkq {  // helpers shared by the quantize units (internal linkage: see cpu_kernels.h)
namespace {

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Element i of x as fp32 (exact for every input dtype). 0 = fp32, 1 = fp16, 2 = bf16 (dk::Dtype).
inline float load(const void* x, int dt, int64_t i) {
    if (dt == 2) return float_of((uint32_t)static_cast<const uint16_t*>(x)[i] << 16);
    if (dt == 1) {
        const uint16_t h = static_cast<const uint16_t*>(x)[i];
        const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu;
        if (e == 0x1f) return float_of(sign | 0x7f800000u | (m << 13));
        if (e == 0) return float_of(sign | bits_of((float)m * float_of(0x33800000u)));  // m * 2^-24, exact
        return float_of(sign | ((e + 112) << 23) | (m << 13));
    }
    return static_cast<const float*>(x)[i];
}

inline float ftz(float v) { return (bits_of(v) & 0x7f800000u) == 0 ? 0.f : v; }

// max |ftz(v)| of elements [i0, i1) as fp32: the largest |bits| (monotone in the value for
// non-negative floats; a NaN's bits exceed every number's), 0 when that is subnormal.
inline float absmax_of(const void* x, int dt, int64_t i0, int64_t i1) {
    uint32_t m = 0;
    for (int64_t i = i0; i < i1; ++i) {
        const uint32_t b = bits_of(load(x, dt, i)) & 0x7fffffffu;
        m = b > m ? b : m;
    }
    return m < 0x00800000u ? 0.f : float_of(m);
}

inline float inverse(float absmax) { return ftz(1.0f / absmax); }

// #{j : t_j < z} over the 15 thresholds (a NaN z compares false everywhere: 0).
inline int nf4_code(float z, const float* t) {
    int c = 0;
    for (int j = 0; j < 15; ++j) c += z > t[j];
    return c;
}

// #{j : m_j < z} over the 255 midpoints by a branchless binary search, then the tie to even.
inline int dynamic_code(float z, const float* m) {
    int q = 0;
    for (int s = 128; s; s >>= 1) q += m[q + s - 1] < z ? s : 0;  // index <= 254
    return q + ((q & 1) && q < 255 && m[q] == z);
}

// NF4 of block b, element by element (the portable path, and the partial last block).
inline void nf4_block(const dk::QuantArgs& a, int64_t b) {
    const int64_t i0 = b * a.blocksize, i1 = i0 + a.blocksize < a.n ? i0 + a.blocksize : a.n;
    const float absmax = absmax_of(a.x, a.x_dtype, i0, i1), inv = inverse(absmax);
    a.absmax[b] = absmax;
    int64_t i = i0;
    for (; i + 1 < i1; i += 2) {
        const int hi = nf4_code(ftz(load(a.x, a.x_dtype, i)) * inv, a.table);
        const int lo = nf4_code(ftz(load(a.x, a.x_dtype, i + 1)) * inv, a.table);
        a.out[i >> 1] = (uint8_t)(hi << 4 | lo);
    }
    if (i < i1)  // odd n: the pad element is a 0 of this block
        a.out[i >> 1] = (uint8_t)(nf4_code(ftz(load(a.x, a.x_dtype, i)) * inv, a.table) << 4 | nf4_code(0.f * inv, a.table));
}

// 8-bit code of block b (fp32 x), element by element.
inline void nested_block(const dk::QuantArgs& a, int64_t b) {
    const float* x = static_cast<const float*>(a.x);
    const int64_t i0 = b * a.blocksize, i1 = i0 + a.blocksize < a.n ? i0 + a.blocksize : a.n;
    const float absmax = absmax_of(x, 0, i0, i1), inv = inverse(absmax);
    a.absmax[b] = absmax;
    for (int64_t i = i0; i < i1; ++i) a.out[i] = (uint8_t)dynamic_code(ftz(x[i]) * inv, a.table);
}

// Blocks per OpenMP task: about 64K elements.
inline int64_t blocks_per_task(int64_t blocksize) { return blocksize >= 65536 ? 1 : 65536 / blocksize; }

}  // namespace
}  // namespace dkq
