// deltakern._cpu: native CPU kernels for NF4 weights (dequantize, small-M matmul y = x W^T, dx = dy W).
//
// Every kernel exists once per instruction set, in its own translation unit compiled with that
// ISA's -m flags: cpu_scalar.cpp (portable), cpu_avx2.cpp (AVX2+FMA+F16C), cpu_avx512.cpp
// (AVX-512 F/BW/VL/DQ). cpu_module.cpp picks one at run time with __builtin_cpu_supports.
// The helpers below sit in an anonymous namespace so that each translation unit keeps its own copy
// (an inline function shared across units could be linked from the AVX-512 unit into the scalar one).
//
// NF4 layout: weight flattened row-major, element i in byte i/2 (even i: high nibble), one scale per
// `blocksize` consecutive flat elements. Every kernel first builds, per block, the 16-entry table
//     tab[j] = fp32(code[j] * scale)                         (rounded to the output/compute dtype)
// so a decoded element is tab[nibble]: exactly the reference's cast(fp32(code[nibble] * absmax)).
//
// Threads: OpenMP teams of the size the caller passes (torch.get_num_threads()); work is taken
// dynamically (a busy core does not stall the other), and every output element has one writer that
// sums in a fixed order, so results never depend on the thread count or the schedule.
// Bounds: dequantize writes 4 or 2 bytes per element and reads 0.5 (write bandwidth; non-temporal
// stores for large outputs); the decode matmuls read W once (0.5 byte per weight) and do M FMAs per
// weight, so small M is bound by the 16-entry lookups and M = 16 by FMA throughput.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace dk {

enum Dtype : int { F32 = 0, F16 = 1, BF16 = 2 };

struct DequantArgs {
    const uint8_t* packed;
    const void* absmax;          // fp32 [nblocks], or uint8 [nblocks] when nested
    int nested;
    const float* nested_absmax;  // fp32 [ceil(nblocks / 256)]
    const float* nested_code;    // fp32 [256]
    float offset;
    const float* code;           // fp32 [16]
    void* out;                   // [n] of out_dtype
    int64_t n;
    int64_t blocksize;
    int out_dtype;
    int streaming;               // non-temporal stores (out 64-byte aligned)
    int round_dtype;             // fp32 out only: values rounded to this dtype first (F32 = none)
};

struct MatArgs {                 // y[M, N] = x[M, K] . W[N, K]^T      or     dx[M, K] = dy[M, N] . W[N, K]
    const float* a;              // x [M, K] (gemv) or dy [M, N] (dx), fp32 contiguous
    const uint8_t* packed;       // W: N*K elements, K % blocksize == 0
    const float* absmax;         // fp32 [N*K / blocksize]
    const float* code;           // fp32 [16]
    const float* bias;           // fp32 [N] or null (gemv only)
    float* out;                  // fp32 y [M, N] or dx [M, K]
    int64_t M, N, K, blocksize;
    int wdtype;                  // the weight is rounded to this dtype after decoding (the input dtype)
};

struct Kernels {
    const char* name;
    void (*dequantize)(const DequantArgs&, int nthreads);
    void (*gemv)(const MatArgs&, int nthreads);
    void (*dx)(const MatArgs&, int nthreads);
};

extern const Kernels kernels_scalar;
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;

}  // namespace dk

namespace {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// fp32 -> bf16, round to nearest even; NaN -> 0x7fc0 (as torch does)
inline uint16_t to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

// fp32 -> fp16 (IEEE binary16), round to nearest even, overflow -> inf, NaN -> sign | 0x7e00.
inline uint16_t to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00;
    if (ax >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to inf (and inf itself)
    if (ax < 0x38800000u) {                        // below 2^-14: fp16 subnormal or zero
        // adding 0.5 aligns the binary point at 2^-24 (fp16's subnormal step); the fp32 add rounds
        // to nearest even, and the low mantissa bits are then the fp16 subnormal value
        float t = bits_f32(ax) + 0.5f;
        return sign | (uint16_t)(f32_bits(t) - 0x3f000000u);
    }
    uint32_t odd = (ax >> 13) & 1u;
    ax += 0xc8000fffu + odd;  // rebias the exponent (127 - 15) << 23 and round to nearest even
    return sign | (uint16_t)(ax >> 13);
}

inline float from_bf16(uint16_t h) { return bits_f32((uint32_t)h << 16); }

inline float from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu;
    if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));
    if (e == 0) {  // zero or subnormal: m * 2^-24, exact in fp32
        float v = (float)m * bits_f32(0x33800000u);
        return bits_f32(sign | f32_bits(v));
    }
    return bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

// The value an fp32 takes after rounding to `dt` and back (the weight in the input dtype).
inline float round_to(float v, int dt) {
    if (dt == dk::BF16) return from_bf16(to_bf16(v));
    if (dt == dk::F16) return from_f16(to_f16(v));
    return v;
}

// Scale of block b: absmax[b], or fp32(nested_code[q] * nested_absmax[b / 256]) then + offset
// (two roundings: these units compile with -ffp-contract=off).
inline float block_scale(const dk::DequantArgs& a, int64_t b) {
    if (!a.nested) return static_cast<const float*>(a.absmax)[b];
    float s = a.nested_code[static_cast<const uint8_t*>(a.absmax)[b]] * a.nested_absmax[b / 256];
    return s + a.offset;
}

// The 16 decoded values of a block in the output dtype's bits (fp32 bits, or 16-bit in the low half).
inline void block_table(const dk::DequantArgs& a, int64_t b, float* tab32, uint16_t* tab16) {
    float s = block_scale(a, b);
    for (int j = 0; j < 16; ++j) {
        float v = a.code[j] * s;
        tab32[j] = round_to(v, a.round_dtype);
        if (a.out_dtype == dk::BF16) tab16[j] = to_bf16(v);
        else if (a.out_dtype == dk::F16) tab16[j] = to_f16(v);
    }
}

// Elements [i0, i1) of block b decoded with the scalar table (partial blocks, scalar fallback).
inline void dequant_scalar_range(const dk::DequantArgs& a, const float* tab32, const uint16_t* tab16,
                                 int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
        uint8_t byte = a.packed[i >> 1];
        int nib = (i & 1) ? (byte & 0xf) : (byte >> 4);
        if (a.out_dtype == dk::F32) static_cast<float*>(a.out)[i] = tab32[nib];
        else static_cast<uint16_t*>(a.out)[i] = tab16[nib];
    }
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- the small-M matmul drivers shared by the vector units (cpu_avx2.cpp, cpu_avx512.cpp) -------

// x rows (K floats each) -> dst[chunk][m][CH]: per CH-element chunk and row, the CH / 2 even elements,
// then the odd ones (the order the decoders yield: high nibbles, then low; rows of a chunk adjacent,
// rows >= `rows` zero).
template <int CH>
void permute_rows(const float* src, int64_t rows, int64_t K, int64_t pad_rows, float* dst) {
    for (int64_t c = 0; c < K; c += CH)
        for (int64_t m = 0; m < pad_rows; ++m) {
            float* d = dst + c * pad_rows + m * CH;
            for (int j = 0; j < CH / 2; ++j) {
                d[j] = m < rows ? src[m * K + c + 2 * j] : 0.f;
                d[CH / 2 + j] = m < rows ? src[m * K + c + 2 * j + 1] : 0.f;
            }
        }
}

// The M rows of the activations in passes of at most PASS rows: pass(m0, rows, mb) with mb the pass
// padded to a power of two (1, 2, 4, ... PASS), the register tile the kernels are instantiated for.
template <int PASS, class Pass>
void row_passes(int64_t M, Pass&& pass) {
    for (int64_t m0 = 0; m0 < M; m0 += PASS) {
        const int64_t rows = std::min<int64_t>(PASS, M - m0);
        int64_t mb = 1;
        while (mb < rows) mb *= 2;
        pass(m0, rows, mb);
    }
}

// group(n0) for each full group of NR W rows (dynamic schedule), then one(n) for the N % NR rest.
template <int NR, class Group, class One>
void for_row_groups(int64_t N, int nthreads, Group&& group, One&& one) {
    const int64_t groups = N / NR;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(dynamic, 8) nowait
        for (int64_t g = 0; g < groups; ++g) group(g * NR);
#pragma omp for schedule(static)
        for (int64_t n = groups * NR; n < N; ++n) one(n);
    }
}

// The GEMV kernels stream each W row once, a group of NR rows at a time, and a group's rows start pages
// the hardware prefetchers have not seen. While a group runs block kb, this asks for block kb's share
// (`step` bytes) of the next group's packed codes, and with block 0 for its scales, into L2. Measured
// with cold weights on the 2-core AVX-512 machine: M = 1 ran 10-20% faster (AVX-512), ~25% (AVX2).
inline void prefetch_group_block(const char* packed, const char* scales, int64_t step, int64_t scale_bytes,
                                 int64_t kb) {
    for (int64_t off = kb * step; off < (kb + 1) * step; off += 64) __builtin_prefetch(packed + off, 0, 1);
    if (kb == 0)
        for (int64_t off = 0; off < scale_bytes; off += 64) __builtin_prefetch(scales + off, 0, 1);
}

// The dX kernels read one 64-byte line of each W row per task: a strided walk down the rows, each a
// page or part of one apart, where the hardware prefetchers do not follow. In a task's first pass
// over a row tile they ask for the line (and block scale) DX_PREFETCH_ROWS rows ahead, into L2;
// measured with cold weights on the 2-core AVX-512 machine, M = 1 and 4 ran 25-38% faster (64 rows
// ahead beat 8, 16, 32 and 128).
constexpr int64_t DX_PREFETCH_ROWS = 64;

inline void prefetch_dx_row(const dk::MatArgs& a, int64_t n, int64_t k, int64_t kb) {
    __builtin_prefetch(a.packed + (n * a.K + k) / 2, 0, 1);
    __builtin_prefetch(a.absmax + n * (a.K / a.blocksize) + kb, 0, 1);
}

// dy rows m0 .. m0 + rows as dyT[N][mb] (columns past `rows` zero): the dX kernels' broadcast order.
inline std::vector<float> transpose_rows(const float* dy, int64_t m0, int64_t rows, int64_t N, int64_t mb) {
    std::vector<float> dyT(N * mb, 0.f);
    for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < rows; ++m) dyT[n * mb + m] = dy[(m0 + m) * N + n];
    return dyT;
}

}  // namespace
