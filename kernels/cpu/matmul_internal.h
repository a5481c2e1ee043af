// Internals of kernels/cpu/matmul.cc exposed for its test and benchmark only: the
// portable path that the public functions fall back to without AVX-512, and the rate
// of the AVX-512 micro-kernel on cache-resident data (the compute bound of MatMul).
#pragma once

#include <cstdint>

#include "kernels/cpu/matmul.h"

namespace epic::cpu::internal {

// True when the processor runs the AVX-512 kernels (F, BW and VL).
bool HaveAvx512();

// The plain C++ path, single-threaded, with the same contract as MatMul.
void MatMulPlain(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
                 int64_t ldy, bool accumulate);

// The plain C++ path with the same contract as MatMulNoTrans.
void MatMulNoTransPlain(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w,
                        float* y, int64_t ldy, bool accumulate);

// GFLOP/s of the MatMul micro-kernel on packed operands that stay in L1/L2, run for
// about `seconds` on `threads` threads: the practical F32 FMA peak that MatMul's
// prefill rate is compared against. REQUIRES: HaveAvx512().
double MicroKernelInCacheGflops(int threads, double seconds);

}  // namespace epic::cpu::internal
