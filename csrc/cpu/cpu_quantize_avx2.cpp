// AVX2 + F16C NF4 / 8-bit quantize kernels (see cpu_quantize.h). Compiled with -mavx2 -mfma -mf16c
// (and -ffp-contract=off: no FMA is formed; there is no product to fuse here anyway).
//
// Whole blocks run 8 lanes at a time; the partial last block runs the header's portable loop.
//   absmax  the largest |bits| as int32 (vpmaxsd), so NaN wins and subnormals count as 0, exactly
//           as the portable loop
//   NF4     two-level search: b = #{t3, t7, t11 below z} (0..3), then
//           code = 4b + #{k in 0..2 : t[4b + k] < z}, the three t[4b + k] picked by vpermps from
//           registers holding them for b = 0..3; equal to counting all 15 (the t are sorted)
//   pack    32 codes -> 32 bytes in element order (vpackusdw, vpackuswb, vpermd), then
//           vpmaddubsw by (16, 1) forms code(2i) * 16 + code(2i + 1) per pair
//   8-bit   the same branchless binary search over the 255 midpoints, one vgatherdps per step
#include <immintrin.h>
#include <omp.h>

#include "cpu_quantize.h"

namespace {

template <int DT>
inline __m256 load8(const void* x, int64_t i) {
    if (DT == 2) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (DT == 1)
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
    return _mm256_loadu_ps(static_cast<const float*>(x) + i);
}

inline __m256 ftz8(__m256 v) {
    const __m256i e = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7f800000));
    return _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(e, _mm256_setzero_si256())), v);
}

inline uint32_t hmax(__m256i m) {
    __m128i r = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    r = _mm_max_epi32(r, _mm_shuffle_epi32(r, 0x4e));
    r = _mm_max_epi32(r, _mm_shuffle_epi32(r, 0xb1));
    return (uint32_t)_mm_cvtsi128_si32(r);
}

// absmax of the whole block at x[i0, i0 + bs) (see cpu_quantize.h), as the portable absmax_of.
template <int DT>
inline float block_absmax(const void* x, int64_t i0, int64_t bs) {
    const __m256i mask = _mm256_set1_epi32(0x7fffffff);
    __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
    for (int64_t j = 0; j < bs; j += 16) {
        m0 = _mm256_max_epi32(m0, _mm256_and_si256(_mm256_castps_si256(load8<DT>(x, i0 + j)), mask));
        m1 = _mm256_max_epi32(m1, _mm256_and_si256(_mm256_castps_si256(load8<DT>(x, i0 + j + 8)), mask));
    }
    const uint32_t m = hmax(_mm256_max_epi32(m0, m1));
    return m < 0x00800000u ? 0.f : dkq::float_of(m);
}

// 4 x 8 int32 codes (elements 0-7, 8-15, 16-23, 24-31) -> 32 bytes in element order.
inline __m256i pack32(__m256i c0, __m256i c1, __m256i c2, __m256i c3) {
    const __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
    return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

struct Nf4Search {
    __m256 t3, t7, t11;  // the separators
    __m256 sub[3];       // lane b (0..3): t[4b + k]
};

inline Nf4Search nf4_search(const float* t) {
    Nf4Search s{_mm256_set1_ps(t[3]), _mm256_set1_ps(t[7]), _mm256_set1_ps(t[11]), {}};
    for (int k = 0; k < 3; ++k) s.sub[k] = _mm256_setr_ps(t[k], t[4 + k], t[8 + k], t[12 + k], 0.f, 0.f, 0.f, 0.f);
    return s;
}

// #{j : t_j < z} per lane (cmp masks are -1: subtracting them counts).
inline __m256i nf4_codes(const Nf4Search& s, __m256 z) {
    __m256i b = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_castps_si256(_mm256_cmp_ps(z, s.t3, _CMP_GT_OQ)));
    b = _mm256_sub_epi32(b, _mm256_castps_si256(_mm256_cmp_ps(z, s.t7, _CMP_GT_OQ)));
    b = _mm256_sub_epi32(b, _mm256_castps_si256(_mm256_cmp_ps(z, s.t11, _CMP_GT_OQ)));
    __m256i c = _mm256_slli_epi32(b, 2);
    for (int k = 0; k < 3; ++k)
        c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(z, _mm256_permutevar8x32_ps(s.sub[k], b), _CMP_GT_OQ)));
    return c;
}

template <int DT>
void nf4_blocks(const dk::QuantArgs& a, int nthreads) {
    const int64_t bs = a.blocksize, nblocks = (a.n + bs - 1) / bs;
    const Nf4Search s = nf4_search(a.table);
    const __m256i pair = _mm256_set1_epi16(0x0110);  // bytes (16, 1): even code * 16 + odd code
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, dkq::blocks_per_task(bs))
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t i0 = b * bs;
        if (i0 + bs > a.n) {
            dkq::nf4_block(a, b);
            continue;
        }
        const float absmax = block_absmax<DT>(a.x, i0, bs);
        a.absmax[b] = absmax;
        const __m256 inv = _mm256_set1_ps(dkq::inverse(absmax));
        uint8_t* o = a.out + i0 / 2;
        for (int64_t j = 0; j < bs; j += 32) {
            __m256i c[4];
            for (int k = 0; k < 4; ++k)
                c[k] = nf4_codes(s, _mm256_mul_ps(ftz8(load8<DT>(a.x, i0 + j + 8 * k)), inv));
            const __m256i w = _mm256_maddubs_epi16(pack32(c[0], c[1], c[2], c[3]), pair);  // 16 x 16-bit, 0..255
            const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j / 2), bytes);
        }
    }
}

void nf4(const dk::QuantArgs& a, int nthreads) {
    if (a.x_dtype == 2) nf4_blocks<2>(a, nthreads);
    else if (a.x_dtype == 1) nf4_blocks<1>(a, nthreads);
    else nf4_blocks<0>(a, nthreads);
}

// 8-bit codes of 8 lanes: #{j : m_j < z} by binary search (indices <= 254), then the tie to even.
inline __m256i dynamic_codes(const float* m, __m256 z) {
    __m256i q = _mm256_setzero_si256();
    for (int s = 128; s; s >>= 1) {
        const __m256 mv = _mm256_i32gather_ps(m, _mm256_add_epi32(q, _mm256_set1_epi32(s - 1)), 4);
        q = _mm256_add_epi32(q, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(mv, z, _CMP_LT_OQ)), _mm256_set1_epi32(s)));
    }
    const __m256i one = _mm256_set1_epi32(1);
    const __m256 mq = _mm256_i32gather_ps(m, _mm256_min_epi32(q, _mm256_set1_epi32(254)), 4);
    const __m256i tie = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(mq, z, _CMP_EQ_OQ)),
                                         _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(255), q), _mm256_and_si256(q, one)));
    return _mm256_add_epi32(q, _mm256_and_si256(tie, one));
}

void nested(const dk::QuantArgs& a, int nthreads) {
    const int64_t bs = a.blocksize, nblocks = (a.n + bs - 1) / bs;
    const float* x = static_cast<const float*>(a.x);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, dkq::blocks_per_task(bs))
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t i0 = b * bs;
        if (i0 + bs > a.n || bs % 32) {
            dkq::nested_block(a, b);
            continue;
        }
        const float absmax = block_absmax<0>(x, i0, bs);
        a.absmax[b] = absmax;
        const __m256 inv = _mm256_set1_ps(dkq::inverse(absmax));
        for (int64_t j = 0; j < bs; j += 32) {
            __m256i c[4];
            for (int k = 0; k < 4; ++k) c[k] = dynamic_codes(a.table, _mm256_mul_ps(ftz8(_mm256_loadu_ps(x + i0 + j + 8 * k)), inv));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.out + i0 + j), pack32(c[0], c[1], c[2], c[3]));
        }
    }
}

}  // namespace

namespace dk {
const QuantKernels quant_kernels_avx2 = {"avx2", nf4, nested};
}
