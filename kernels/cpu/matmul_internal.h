// Internals of kernels/cpu/matmul.cc exposed for its test and benchmark only: which path
// the public functions take, the portable path they fall back to, and the rate of the
// active path's micro-kernel on cache-resident data (the compute bound of MatMul).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/parallel.h"

namespace epic::cpu::internal {

// Threads worth waking for WORK multiply-adds (at least 2^16 each): 1 inside a team or
// an OpenMP region, active or not, where the caller already spread its work.
inline int TeamSize(double work) {
  constexpr double kMinWorkPerThread = 1 << 16;
  if (InTeam()) return 1;
  const double by_work = work / kMinWorkPerThread;
  if (by_work < 2) return 1;
  return static_cast<int>(std::min<double>(omp_get_max_threads(), by_work));
}

// The kernels MatMul and MatMulNoTrans run: kAvx512, kAvx2 or kPlain, the widest of those
// that ActiveIsa() allows (EPIC_CPU_ISA narrows it).
Isa MatMulIsa();

// The most rows of x whose AVX-512 BF16 products take the decode form (dot products,
// weights widened in registers) instead of the packed GEMM, which takes more (decode's
// 24 rows and fewer always take the dot form): every m on AMD Zen 4, 256 on Zen 5, 0
// elsewhere (AmdZenAvx512()); or what the environment variable EPIC_BF16_FORM asks (dot:
// every m, gemm: 0), so that both forms are tested on any AVX-512 host.
int64_t Bf16DotMaxRows();

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
