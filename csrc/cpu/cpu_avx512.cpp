// AVX-512 (F, BW, VL, DQ) kernels. Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma.
//
// Decoding: a block's 16 decoded values sit in one zmm; vpermps picks 16 of them by the low 4 bits
// of 16 dword indices. For the matmuls, a 32-element chunk (16 bytes) decodes into two vectors, the
// high nibbles (elements 0, 2, ..., 30) and the low nibbles (1, 3, ..., 31); the activation rows are
// permuted once per call into the same order, so no interleave is needed in the inner loop.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"

namespace {

constexpr int CH = 32;  // elements per decoded chunk

inline __m512 round_table(__m512 t, int dt) {
    if (dt == dk::BF16) {
        __m512i u = _mm512_castps_si512(t);
        __m512i r = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
        return _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(u, r), _mm512_set1_epi32((int)0xffff0000u)));
    }
    if (dt == dk::F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return t;
}

// The block's 16 values fp32(code[j] * scale) (rounded to a.round_dtype) in one vector: the same
// products as block_table, without its scalar loop.
inline __m512 vector_table(const dk::DequantArgs& a, int64_t b) {
    return round_table(_mm512_mul_ps(_mm512_loadu_ps(a.code), _mm512_set1_ps(block_scale(a, b))), a.round_dtype);
}

// 16 fp32 -> 16 bf16 / fp16 bit patterns, round to nearest even; NaN -> 0x7fc0 / sign | 0x7e00 (as
// to_bf16 / to_f16 and torch do).
inline __m256i to_16bit(__m512 v, int dt) {
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i u = _mm512_castps_si512(v);
    if (dt == dk::BF16) {
        __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
        r = _mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16), nan, _mm512_set1_epi32(0x7fc0));
        return _mm512_cvtepi32_epi16(r);
    }
    __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i qnan = _mm256_or_si256(_mm512_cvtepi32_epi16(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000))),
                                         _mm256_set1_epi16(0x7e00));
    return _mm256_mask_mov_epi16(h, nan, qnan);
}

void dequantize(const dk::DequantArgs& a, int nthreads) {
    const int64_t bs = a.blocksize, nblocks = cdiv(a.n, bs), per_task = std::max<int64_t>(1, 65536 / bs);
    const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const __m512i shifts16 = _mm512_set_epi16(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4,
                                              0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const bool nt = a.streaming;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(dynamic, per_task)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t i0 = b * bs;
            if (i0 + bs > a.n) {  // partial last block
                alignas(64) float tab32[16];
                alignas(64) uint16_t tab16[16];
                block_table(a, b, tab32, tab16);
                dequant_scalar_range(a, tab32, tab16, i0, a.n);
                continue;
            }
            const uint8_t* p = a.packed + i0 / 2;
            const __m512 vals = vector_table(a, b);
            if (a.out_dtype == dk::F32) {
                const __m512 tab = vals;
                float* o = static_cast<float*>(a.out) + i0;
                for (int64_t j = 0; j < bs; j += CH) {
                    __m128i v = _mm_loadu_si128((const __m128i*)(p + j / 2));
                    __m512i i_lo = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(v, v)), shifts);
                    __m512i i_hi = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(v, v)), shifts);
                    __m512 r0 = _mm512_permutexvar_ps(i_lo, tab), r1 = _mm512_permutexvar_ps(i_hi, tab);
                    if (nt) { _mm512_stream_ps(o + j, r0); _mm512_stream_ps(o + j + 16, r1); }
                    else { _mm512_storeu_ps(o + j, r0); _mm512_storeu_ps(o + j + 16, r1); }
                }
            } else {
                const __m512i tab = _mm512_castsi256_si512(to_16bit(vals, a.out_dtype));
                uint16_t* o = static_cast<uint16_t*>(a.out) + i0;
                for (int64_t j = 0; j < bs; j += CH) {
                    __m128i v = _mm_loadu_si128((const __m128i*)(p + j / 2));
                    __m256i d = _mm256_set_m128i(_mm_unpackhi_epi8(v, v), _mm_unpacklo_epi8(v, v));
                    __m512i idx = _mm512_and_si512(_mm512_srlv_epi16(_mm512_cvtepu8_epi16(d), shifts16), _mm512_set1_epi16(15));
                    __m512i r = _mm512_permutexvar_epi16(idx, tab);
                    if (nt) _mm512_stream_si512((__m512i*)(o + j), r);
                    else _mm512_storeu_si512((void*)(o + j), r);
                }
            }
        }
        if (nt) _mm_sfence();
    }
}

// y[m, n0 + r] for r < NR, m < MB (rows of xp beyond M are zero and not written).
template <int MB, int NR>
inline void gemv_rows(const dk::MatArgs& a, const float* xp, int64_t n0, int64_t m0) {
    const int64_t K = a.K, bs = a.blocksize, bpr = K / bs;
    const __m512 code = _mm512_loadu_ps(a.code);
    __m512 acc[NR][MB];
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    const bool spread = n0 + 2 * NR <= a.N;  // a next group exists: prefetch it (prefetch_group_block)
    const char* nextp = spread ? (const char*)(a.packed + (n0 + NR) * K / 2) : nullptr;
    for (int64_t kb = 0; kb < bpr; ++kb) {
        __m512 tab[NR];
        if (spread)
            prefetch_group_block(nextp, (const char*)(a.absmax + (n0 + NR) * bpr), NR * bs / 2, NR * bpr * 4, kb);
        for (int r = 0; r < NR; ++r)
            tab[r] = round_table(_mm512_mul_ps(code, _mm512_set1_ps(a.absmax[(n0 + r) * bpr + kb])), a.wdtype);
        for (int64_t k = kb * bs; k < (kb + 1) * bs; k += CH) {
#pragma GCC unroll 4
            for (int r = 0; r < NR; ++r) {
                __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(a.packed + ((n0 + r) * K + k) / 2)));
                __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab[r]);
                __m512 wlo = _mm512_permutexvar_ps(b, tab[r]);
#pragma GCC unroll 16
                for (int m = 0; m < MB; ++m) {
                    acc[r][m] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xp + k * MB + m * CH), acc[r][m]);
                    acc[r][m] = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xp + k * MB + m * CH + CH / 2), acc[r][m]);
                }
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB && m0 + m < a.M; ++m)
            a.out[(m0 + m) * a.N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]) + (a.bias ? a.bias[n0 + r] : 0.f);
}

template <int MB, int NR>
void gemv_mb(const dk::MatArgs& a, const float* xp, int64_t m0, int nthreads) {
    for_row_groups<NR>(a.N, nthreads, [&](int64_t n0) { gemv_rows<MB, NR>(a, xp, n0, m0); },
                       [&](int64_t n) { gemv_rows<MB, 1>(a, xp, n, m0); });
}

// Rows of x in passes of at most 8; each pass decodes every W row once and feeds NR rows of W per
// load of x (NR * MB accumulators: 16 or 24 of the 32 zmm registers).
void gemv(const dk::MatArgs& a, int nthreads) {
    row_passes<8>(a.M, [&](int64_t m0, int64_t rows, int64_t mb) {
        std::vector<float> xp(mb * a.K);
        permute_rows<CH>(a.a + m0 * a.K, rows, a.K, mb, xp.data());
        switch (mb) {
            case 1: gemv_mb<1, 4>(a, xp.data(), m0, nthreads); break;
            case 2: gemv_mb<2, 4>(a, xp.data(), m0, nthreads); break;
            case 4: gemv_mb<4, 4>(a, xp.data(), m0, nthreads); break;
            default: gemv_mb<8, 2>(a, xp.data(), m0, nthreads); break;
        }
    });
}

// dx[m0 + m, k] for m < MB: dyT is [N][MB] (rows past M are zero). A task owns SUB chunks (one 64-byte
// line of each W row) and walks W rows in tiles of NT, so the tile's lines stay in cache across the
// SUB chunks; per-chunk register sums are added into the task's fp32 accumulator after each tile.
template <int MB>
void dx_mb(const dk::MatArgs& a, const float* dyT, int64_t m0, int nthreads) {
    constexpr int64_t SUB = 4, NT = 256;
    const int64_t N = a.N, K = a.K, bs = a.blocksize, bpr = K / bs, chunks = K / CH;
    const __m512i ilo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i ihi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t t = 0; t < cdiv(chunks, SUB); ++t) {
        const __m512 code = _mm512_loadu_ps(a.code);
        const int64_t c0 = t * SUB, c1 = std::min(c0 + SUB, chunks);
        __m512 sh[SUB][MB], sl[SUB][MB];  // running sums (even / odd elements)
        for (int64_t s = 0; s < SUB; ++s)
            for (int m = 0; m < MB; ++m) sh[s][m] = sl[s][m] = _mm512_setzero_ps();
        for (int64_t n0 = 0; n0 < N; n0 += NT) {
            const int64_t n1 = std::min(n0 + NT, N);
            for (int64_t c = c0; c < c1; ++c) {
                const int64_t k = c * CH, kb = k / bs;
                __m512 ah[MB], al[MB];
                for (int m = 0; m < MB; ++m) ah[m] = al[m] = _mm512_setzero_ps();
                for (int64_t n = n0; n < n1; ++n) {
                    if (c == c0 && n + DX_PREFETCH_ROWS < N) prefetch_dx_row(a, n + DX_PREFETCH_ROWS, k, kb);
                    __m512 tab = round_table(_mm512_mul_ps(code, _mm512_set1_ps(a.absmax[n * bpr + kb])), a.wdtype);
                    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(a.packed + (n * K + k) / 2)));
                    __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab);
                    __m512 wlo = _mm512_permutexvar_ps(b, tab);
#pragma GCC unroll 8
                    for (int m = 0; m < MB; ++m) {
                        __m512 d = _mm512_set1_ps(dyT[n * MB + m]);
                        ah[m] = _mm512_fmadd_ps(d, whi, ah[m]);
                        al[m] = _mm512_fmadd_ps(d, wlo, al[m]);
                    }
                }
                for (int m = 0; m < MB; ++m) {
                    sh[c - c0][m] = _mm512_add_ps(sh[c - c0][m], ah[m]);
                    sl[c - c0][m] = _mm512_add_ps(sl[c - c0][m], al[m]);
                }
            }
        }
        for (int64_t c = c0; c < c1; ++c)
            for (int m = 0; m < MB && m0 + m < a.M; ++m) {
                float* o = a.out + (m0 + m) * K + c * CH;
                _mm512_storeu_ps(o, _mm512_permutex2var_ps(sh[c - c0][m], ilo, sl[c - c0][m]));
                _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(sh[c - c0][m], ihi, sl[c - c0][m]));
            }
    }
}

void dx(const dk::MatArgs& a, int nthreads) {
    row_passes<8>(a.M, [&](int64_t m0, int64_t rows, int64_t mb) {
        const std::vector<float> dyT = transpose_rows(a.a, m0, rows, a.N, mb);
        switch (mb) {
            case 1: dx_mb<1>(a, dyT.data(), m0, nthreads); break;
            case 2: dx_mb<2>(a, dyT.data(), m0, nthreads); break;
            case 4: dx_mb<4>(a, dyT.data(), m0, nthreads); break;
            default: dx_mb<8>(a, dyT.data(), m0, nthreads); break;
        }
    });
}

}  // namespace

namespace dk {
const Kernels kernels_avx512 = {"avx512", dequantize, gemv, dx};
}
