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

}  // namespace epic::cpu
