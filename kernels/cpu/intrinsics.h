// <immintrin.h> for the CPU kernels and their benchmarks. GCC 12's AVX-512 headers trip
// -Wuninitialized on their own _mm512_undefined_*() placeholders once inlined (GCC bug
// 105593); the warning is about the header only.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)  // clang has no such warning (and warns of the unknown name)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>

namespace epic::cpu {

// The mask of a 16-lane vector's first min(N, 16) lanes: a loop's tail.
inline __mmask16 FirstLanes(int64_t n) {
  return n >= 16 ? __mmask16{0xffff} : static_cast<__mmask16>((1u << n) - 1);
}

// The same for 8 lanes of 32 bits on AVX2 (no mask registers): all ones in the first
// min(N, 8) lanes, for vmaskmov loads and stores.
__attribute__((target("avx2"), always_inline)) inline __m256i FirstLanes8(int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 8 ? n : 8)), lane);
}

// FloatToBf16 (common/half.h) on 16 lanes, bit for bit (round to nearest even, NaN kept
// NaN, made quiet): each lane's BF16 in its low 16 bits, the high ones zero.
__attribute__((target("avx512f"), always_inline)) inline __m512i RoundToBf16Words(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i high = _mm512_srli_epi32(bits, 16);
  const __m512i half_up = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(high, _mm512_set1_epi32(1)));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, half_up), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
}

// The 16 lanes narrowed to BF16s side by side.
__attribute__((target("avx512f"), always_inline)) inline __m256i RoundToBf16Lanes(__m512 v) {
  return _mm512_cvtepi32_epi16(RoundToBf16Words(v));
}

// The same by vcvtneps2bf16 (AVX512_BF16): one instruction for the seven above (the BF16
// attention rounds every probability, a decode every cache row and query). The
// instruction takes subnormals as zero; a vector with one is rounded as above.
__attribute__((target("avx512f,avx512dq,avx512bf16"), always_inline)) inline __m256i RoundToBf16LanesBf16(
    __m512 v) {
  constexpr int kSubnormal = 0x20;  // vfpclassps's class
  if (_mm512_fpclass_ps_mask(v, kSubnormal) != 0) [[unlikely]] {
    return RoundToBf16Lanes(v);
  }
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
}

// The same on 8 lanes of AVX2, in the low 128 bits.
__attribute__((target("avx2"), always_inline)) inline __m128i RoundToBf16Lanes8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i high = _mm256_srli_epi32(bits, 16);
  const __m256i half_up = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(high, _mm256_set1_epi32(1)));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, half_up), 16);
  // Magnitudes fit a signed compare.
  const __m256i nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  const __m256i words = _mm256_blendv_epi8(rounded, _mm256_or_si256(high, _mm256_set1_epi32(0x40)), nan);
  // Each lane's 16 bits: packed per 128-bit half (no saturation below 0x10000), halves joined.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(words, words), 0x08));
}

// The sum of an AVX vector's 8 lanes.
__attribute__((target("avx2"), always_inline)) inline float ReduceAdd8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace epic::cpu
