// precision_bench: the fast products (BF16 activations, kernels/cpu/matmul_fast.h) against
// the exact ones on prefill and expert shapes of V2-Lite, measured alternately in one run:
// GFLOP/s of each, median of the repeats, and fast / exact. The fast path is the best the
// host offers (EPIC_CPU_ISA narrows it).
#include <omp.h>

#include <cstdio>
#include <random>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench/timing.h"
#include "common/half.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/matmul_fast.h"

int main(int argc, char** argv) {
  CLI::App app{"precision_bench: fast (BF16 activations) against exact (F32) matrix products, GFLOP/s"};
  int repeats = 5;
  app.add_option("--repeats", repeats, "timed calls per shape and precision")->check(CLI::PositiveNumber)->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  using namespace epic;
  const char* fast = cpu::internal::FastPath();
  std::printf("precision_bench: %d threads, ISA %s, fast path %s\n", omp_get_max_threads(),
              cpu::IsaName(cpu::ActiveIsa()), fast ? fast : "none (fast runs exactly)");
  struct Shape {
    const char* what;
    int64_t m, n, k;
  };
  const Shape shapes[] = {{"prefill 512, q/o projection", 512, 2048, 2048},
                          {"prefill 512, expert up", 512, 1408, 2048},
                          {"prefill 512, expert down", 512, 2048, 1408},
                          {"19 tokens of an expert, up", 19, 1408, 2048},
                          {"64 tokens of an expert, up", 64, 1408, 2048}};
  std::printf("%-30s %10s %10s %8s\n", "shape (m x n x k, BF16 weights)", "exact", "fast", "ratio");
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-1, 1);
  for (const Shape& s : shapes) {
    std::vector<float> x(static_cast<size_t>(s.m * s.k)), y(static_cast<size_t>(s.m * s.n));
    std::vector<uint16_t> w(static_cast<size_t>(s.n * s.k));
    for (float& v : x) v = dist(rng);
    for (uint16_t& v : w) v = FloatToBf16(dist(rng));
    const cpu::WeightMatrix weights{cpu::WeightType::kBF16, w.data(), s.n, s.k, s.k};
    std::vector<double> seconds[2];
    for (int r = 0; r <= repeats; ++r) {
      for (const cpu::Precision p : {cpu::Precision::kExact, cpu::Precision::kFast}) {
        const auto t0 = bench::Clock::now();
        cpu::MatMul(x.data(), s.m, s.k, weights, y.data(), s.n, false, p);
        if (r > 0) seconds[static_cast<int>(p)].push_back(bench::Since(t0));  // the first is a warm-up
      }
    }
    const double flops = 2.0 * static_cast<double>(s.m) * static_cast<double>(s.n) * static_cast<double>(s.k);
    const double exact = flops / bench::Median(seconds[0]) / 1e9, fast_rate = flops / bench::Median(seconds[1]) / 1e9;
    std::printf("%-30s %9.1fG %9.1fG %7.2fx   (%lld x %lld x %lld)\n", s.what, exact, fast_rate, fast_rate / exact,
                static_cast<long long>(s.m), static_cast<long long>(s.n), static_cast<long long>(s.k));
  }
  return 0;
}
