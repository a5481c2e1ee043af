// <immintrin.h> for the CPU kernels and their benchmarks. GCC 12's AVX-512 headers trip
// -Wuninitialized on their own _mm512_undefined_*() placeholders once inlined (GCC bug
// 105593); the warning is about the header only.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
