// Internals of kernels/cpu/matmul.cc exposed for its test and benchmark only: which path
// the public functions take, the portable path they fall back to, and the rate of the
// active path's micro-kernel on cache-resident data (the compute bound of MatMul).
#pragma once

#include <cstdint>

#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/matmul.h"

namespace epic::cpu::internal {

// The kernels MatMul and MatMulNoTrans run: kAvx512, kAvx2 or kPlain, the widest of those
// that ActiveIsa() allows (EPIC_CPU_ISA narrows it).
Isa MatMulIsa();

// The plain C++ path, single-threaded, with the same contract as MatMul.
void MatMulPlain(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
                 int64_t ldy, bool accumulate);

// The plain C++ path with the same contract as MatMulNoTrans.
void MatMulNoTransPlain(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w,
                        float* y, int64_t ldy, bool accumulate);

// GFLOP/s of MatMulIsa()'s GEMM micro-kernel on packed operands that stay in L1/L2, run
// for about `seconds` on `threads` threads: the practical F32 FMA peak that MatMul's
// prefill rate is compared against. 0 on the plain path, which has no micro-kernel.
double MicroKernelInCacheGflops(int threads, double seconds);

}  // namespace epic::cpu::internal
