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

// The sum of an AVX vector's 8 lanes.
__attribute__((target("avx2"), always_inline)) inline float ReduceAdd8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace epic::cpu
