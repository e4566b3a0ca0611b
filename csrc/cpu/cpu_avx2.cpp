// AVX2 + FMA + F16C kernels. Compiled with -mavx2 -mfma -mf16c.
//
// Decoding: a block's 16 decoded fp32 values sit in two ymm (entries 0-7, 8-15); vpermps picks by
// the low 3 bits of each dword index and a blend on bit 3 chooses the half. 16-bit outputs use
// byte shuffles of the low and high bytes of the 16 table entries. For the matmuls a 16-element chunk
// (8 bytes) decodes into the high nibbles (elements 0, 2, ..., 14) and the low nibbles (1, ..., 15);
// activation rows are permuted once per call into that order.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"

namespace {

constexpr int CH = 16;  // elements per decoded chunk

struct Tab { __m256 lo, hi; };

// tab[idx & 15] per dword; `sel` carries bit 3 of the index in its sign bit.
inline __m256 lookup(const Tab& t, __m256i idx, __m256i sel) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx), _mm256_castsi256_ps(sel));
}

inline __m256 round_table(__m256 t, int dt) {
    if (dt == dk::BF16) {
        __m256i u = _mm256_castps_si256(t);
        __m256i r = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
        return _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(u, r), _mm256_set1_epi32((int)0xffff0000u)));
    }
    if (dt == dk::F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return t;
}

inline Tab scaled_table(const float* code, float s, int dt) {
    __m256 sv = _mm256_set1_ps(s);
    return {round_table(_mm256_mul_ps(_mm256_loadu_ps(code), sv), dt), round_table(_mm256_mul_ps(_mm256_loadu_ps(code + 8), sv), dt)};
}

// 8 fp32 -> 8 bf16 / fp16 bit patterns, round to nearest even; NaN -> 0x7fc0 / sign | 0x7e00 (as
// to_bf16 / to_f16 and torch do).
inline __m128i to_16bit(__m256 v, int dt) {
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i u = _mm256_castps_si256(v);
    __m256i r;
    if (dt == dk::BF16) {
        r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
        r = _mm256_blendv_epi8(_mm256_srli_epi32(r, 16), _mm256_set1_epi32(0x7fc0), nan);
    } else {
        r = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i qnan = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)), _mm256_set1_epi32(0x7e00));
        r = _mm256_blendv_epi8(r, qnan, nan);
    }
    // 8 dwords holding 16-bit values -> 8 words (packus per lane, then the two lanes' halves joined)
    __m256i packed = _mm256_packus_epi32(r, r);
    return _mm_unpacklo_epi64(_mm256_castsi256_si128(packed), _mm256_extracti128_si256(packed, 1));
}

void dequantize(const dk::DequantArgs& a, int nthreads) {
    const int64_t bs = a.blocksize, nblocks = cdiv(a.n, bs), per_task = std::max<int64_t>(1, 65536 / bs);
    const __m256i shifts = _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    const bool nt = a.streaming;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(dynamic, per_task)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t i0 = b * bs;
            if (i0 + bs > a.n) {
                alignas(64) float tab32[16];
                alignas(64) uint16_t tab16[16];
                block_table(a, b, tab32, tab16);
                dequant_scalar_range(a, tab32, tab16, i0, a.n);
                continue;
            }
            const uint8_t* p = a.packed + i0 / 2;
            const Tab vals = scaled_table(a.code, block_scale(a, b), a.round_dtype);  // fp32(code * scale)
            if (a.out_dtype == dk::F32) {
                const Tab t = vals;
                float* o = static_cast<float*>(a.out) + i0;
                for (int64_t j = 0; j < bs; j += 16) {
                    __m128i v = _mm_loadl_epi64((const __m128i*)(p + j / 2));
                    __m128i d = _mm_unpacklo_epi8(v, v);  // b0 b0 b1 b1 ... b7 b7
                    __m256i i0v = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(d), shifts);
                    __m256i i1v = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(d, 8)), shifts);
                    __m256 r0 = lookup(t, i0v, _mm256_slli_epi32(i0v, 28)), r1 = lookup(t, i1v, _mm256_slli_epi32(i1v, 28));
                    if (nt) { _mm256_stream_ps(o + j, r0); _mm256_stream_ps(o + j + 8, r1); }
                    else { _mm256_storeu_ps(o + j, r0); _mm256_storeu_ps(o + j + 8, r1); }
                }
            } else {
                const __m128i w0 = to_16bit(vals.lo, a.out_dtype), w1 = to_16bit(vals.hi, a.out_dtype);  // entries 0-7, 8-15
                const __m128i lo_b = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
                const __m128i hi_b = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
                const __m256i L = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(_mm_shuffle_epi8(w0, lo_b), _mm_shuffle_epi8(w1, lo_b)));
                const __m256i H = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(_mm_shuffle_epi8(w0, hi_b), _mm_shuffle_epi8(w1, hi_b)));
                const __m128i m4 = _mm_set1_epi8(15);
                uint16_t* o = static_cast<uint16_t*>(a.out) + i0;
                for (int64_t j = 0; j < bs; j += 32) {
                    __m128i v = _mm_loadu_si128((const __m128i*)(p + j / 2));
                    __m128i vh = _mm_and_si128(_mm_srli_epi16(v, 4), m4), vl = _mm_and_si128(v, m4);
                    // nibble indices in element order: lane 0 elements 0-15, lane 1 elements 16-31
                    __m256i idx = _mm256_set_m128i(_mm_unpackhi_epi8(vh, vl), _mm_unpacklo_epi8(vh, vl));
                    __m256i lb = _mm256_shuffle_epi8(L, idx), hb = _mm256_shuffle_epi8(H, idx);
                    __m256i w0 = _mm256_unpacklo_epi8(lb, hb), w1 = _mm256_unpackhi_epi8(lb, hb);  // 0-7|16-23, 8-15|24-31
                    __m256i r0 = _mm256_permute2x128_si256(w0, w1, 0x20), r1 = _mm256_permute2x128_si256(w0, w1, 0x31);
                    if (nt) { _mm256_stream_si256((__m256i*)(o + j), r0); _mm256_stream_si256((__m256i*)(o + j + 16), r1); }
                    else { _mm256_storeu_si256((__m256i*)(o + j), r0); _mm256_storeu_si256((__m256i*)(o + j + 16), r1); }
                }
            }
        }
        if (nt) _mm_sfence();
    }
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

template <int MB, int NR>
inline void gemv_rows(const dk::MatArgs& a, const float* xp, int64_t n0, int64_t m0) {
    const int64_t K = a.K, bs = a.blocksize, bpr = K / bs;
    __m256 acc[NR][MB];
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
    const bool spread = n0 + 2 * NR <= a.N;  // a next group exists: prefetch it (prefetch_group_block)
    const char* nextp = spread ? (const char*)(a.packed + (n0 + NR) * K / 2) : nullptr;
    for (int64_t kb = 0; kb < bpr; ++kb) {
        Tab tab[NR];
        if (spread)
            prefetch_group_block(nextp, (const char*)(a.absmax + (n0 + NR) * bpr), NR * bs / 2, NR * bpr * 4, kb);
        for (int r = 0; r < NR; ++r) tab[r] = scaled_table(a.code, a.absmax[(n0 + r) * bpr + kb], a.wdtype);
        for (int64_t k = kb * bs; k < (kb + 1) * bs; k += CH) {
#pragma GCC unroll 4
            for (int r = 0; r < NR; ++r) {
                __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(a.packed + ((n0 + r) * K + k) / 2)));
                __m256 whi = lookup(tab[r], _mm256_srli_epi32(b, 4), _mm256_slli_epi32(b, 24));
                __m256 wlo = lookup(tab[r], b, _mm256_slli_epi32(b, 28));
#pragma GCC unroll 8
                for (int m = 0; m < MB; ++m) {
                    acc[r][m] = _mm256_fmadd_ps(whi, _mm256_loadu_ps(xp + k * MB + m * CH), acc[r][m]);
                    acc[r][m] = _mm256_fmadd_ps(wlo, _mm256_loadu_ps(xp + k * MB + m * CH + CH / 2), acc[r][m]);
                }
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB && m0 + m < a.M; ++m)
            a.out[(m0 + m) * a.N + n0 + r] = hsum(acc[r][m]) + (a.bias ? a.bias[n0 + r] : 0.f);
}

template <int MB, int NR>
void gemv_mb(const dk::MatArgs& a, const float* xp, int64_t m0, int nthreads) {
    for_row_groups<NR>(a.N, nthreads, [&](int64_t n0) { gemv_rows<MB, NR>(a, xp, n0, m0); },
                       [&](int64_t n) { gemv_rows<MB, 1>(a, xp, n, m0); });
}

// Rows of x in passes of at most 4; each pass decodes every W row once and feeds 2 rows of W per
// load of x (16 ymm registers: at most 8 accumulators beside the two rows' tables).
void gemv(const dk::MatArgs& a, int nthreads) {
    row_passes<4>(a.M, [&](int64_t m0, int64_t rows, int64_t mb) {
        std::vector<float> xp(mb * a.K);
        permute_rows<CH>(a.a + m0 * a.K, rows, a.K, mb, xp.data());
        switch (mb) {
            case 1: gemv_mb<1, 2>(a, xp.data(), m0, nthreads); break;
            case 2: gemv_mb<2, 2>(a, xp.data(), m0, nthreads); break;
            default: gemv_mb<4, 2>(a, xp.data(), m0, nthreads); break;
        }
    });
}

// dx[m0 + m, k] for m < MB: dyT is [N][MB]. A task owns SUB chunks (one 64-byte line of each W row)
// and walks W rows in tiles of NT (see cpu_avx512.cpp).
template <int MB>
void dx_mb(const dk::MatArgs& a, const float* dyT, int64_t m0, int nthreads) {
    constexpr int64_t SUB = 8, NT = 256;
    const int64_t N = a.N, K = a.K, bs = a.blocksize, bpr = K / bs, chunks = K / CH;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t t = 0; t < cdiv(chunks, SUB); ++t) {
        const int64_t c0 = t * SUB, c1 = std::min(c0 + SUB, chunks);
        __m256 sh[SUB][MB], sl[SUB][MB];
        for (int64_t s = 0; s < SUB; ++s)
            for (int m = 0; m < MB; ++m) sh[s][m] = sl[s][m] = _mm256_setzero_ps();
        for (int64_t n0 = 0; n0 < N; n0 += NT) {
            const int64_t n1 = std::min(n0 + NT, N);
            for (int64_t c = c0; c < c1; ++c) {
                const int64_t k = c * CH, kb = k / bs;
                __m256 ah[MB], al[MB];
                for (int m = 0; m < MB; ++m) ah[m] = al[m] = _mm256_setzero_ps();
                for (int64_t n = n0; n < n1; ++n) {
                    if (c == c0 && n + DX_PREFETCH_ROWS < N) prefetch_dx_row(a, n + DX_PREFETCH_ROWS, k, kb);
                    Tab tab = scaled_table(a.code, a.absmax[n * bpr + kb], a.wdtype);
                    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(a.packed + (n * K + k) / 2)));
                    __m256 whi = lookup(tab, _mm256_srli_epi32(b, 4), _mm256_slli_epi32(b, 24));
                    __m256 wlo = lookup(tab, b, _mm256_slli_epi32(b, 28));
#pragma GCC unroll 4
                    for (int m = 0; m < MB; ++m) {
                        __m256 d = _mm256_broadcast_ss(dyT + n * MB + m);
                        ah[m] = _mm256_fmadd_ps(d, whi, ah[m]);
                        al[m] = _mm256_fmadd_ps(d, wlo, al[m]);
                    }
                }
                for (int m = 0; m < MB; ++m) {
                    sh[c - c0][m] = _mm256_add_ps(sh[c - c0][m], ah[m]);
                    sl[c - c0][m] = _mm256_add_ps(sl[c - c0][m], al[m]);
                }
            }
        }
        for (int64_t c = c0; c < c1; ++c)
            for (int m = 0; m < MB && m0 + m < a.M; ++m) {
                float* o = a.out + (m0 + m) * K + c * CH;
                __m256 u0 = _mm256_unpacklo_ps(sh[c - c0][m], sl[c - c0][m]);  // 0-3 | 8-11
                __m256 u1 = _mm256_unpackhi_ps(sh[c - c0][m], sl[c - c0][m]);  // 4-7 | 12-15
                _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u1, 0x20));
                _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(u0, u1, 0x31));
            }
    }
}

void dx(const dk::MatArgs& a, int nthreads) {
    row_passes<4>(a.M, [&](int64_t m0, int64_t rows, int64_t mb) {
        const std::vector<float> dyT = transpose_rows(a.a, m0, rows, a.N, mb);
        switch (mb) {
            case 1: dx_mb<1>(a, dyT.data(), m0, nthreads); break;
            case 2: dx_mb<2>(a, dyT.data(), m0, nthreads); break;
            default: dx_mb<4>(a, dyT.data(), m0, nthreads); break;
        }
    });
}

}  // namespace

namespace dk {
const Kernels kernels_avx2 = {"avx2", dequantize, gemv, dx};
}
