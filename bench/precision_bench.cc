// precision_bench: the reduced-precision products against the exact ones on prefill,
// expert and decode shapes of V2-Lite (and the small experts' of v2-small-experts),
// measured alternately in one run: BF16 activations
// (kernels/cpu/matmul_fast.h, AMX or AVX512_BF16) and int8 weights and activations
// (kernels/cpu/matmul_int8.h, what --precision fast runs) on each int8 path the host
// has. GFLOP/s of each, median of the repeats, and each over exact. EPIC_CPU_ISA
// narrows the paths (and the exact products: avx2 compares AVX2 with AVX2).
#include <omp.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench/timing.h"
#include "common/half.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/matmul_fast.h"
#include "kernels/cpu/matmul_int8.h"

int main(int argc, char** argv) {
  CLI::App app{"precision_bench: BF16-activation and int8 matrix products against exact (F32) ones, GFLOP/s"};
  int repeats = 5;
  app.add_option("--repeats", repeats, "timed calls per shape and precision")->check(CLI::PositiveNumber)->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  using namespace epic;
  const char* fast = cpu::internal::FastPath();
  std::printf("precision_bench: %d threads, ISA %s, BF16 path %s, int8 path %s\n", omp_get_max_threads(),
              cpu::IsaName(cpu::ActiveIsa()), fast ? fast : "none (runs exactly)",
              cpu::internal::Int8PathName(cpu::internal::ActiveInt8Path()));
  struct Shape {
    const char* what;
    int64_t m, n, k;
  };
  const Shape shapes[] = {{"prefill 512, q/o projection", 512, 2048, 2048},
                          {"prefill 512, expert up", 512, 1408, 2048},
                          {"prefill 512, expert down", 512, 2048, 1408},
                          {"19 tokens of an expert, up", 19, 1408, 2048},
                          {"64 tokens of an expert, up", 64, 1408, 2048},
                          {"decode, 1 token, expert up", 1, 1408, 2048},
                          {"19 tokens, small expert gate|up", 19, 512, 1024},
                          {"19 tokens, small expert down", 19, 1024, 256},
                          {"64 tokens, small expert gate|up", 64, 512, 1024},
                          {"decode, 4 tokens, q projection", 4, 3072, 2048},
                          {"decode, 1 token, lm_head", 1, 102400, 2048},
                          {"decode, 64 tokens, lm_head", 64, 102400, 2048}};
  // Exact, BF16, then every vector int8 path the host has (the plain one is a reference).
  std::vector<std::string> names = {"exact", "bf16"};
  std::vector<cpu::internal::Int8Path> int8_paths;
  for (cpu::internal::Int8Path p : cpu::internal::Int8Paths()) {
    if (p == cpu::internal::Int8Path::kPlain) continue;
    int8_paths.push_back(p);
    names.push_back(std::string("i8 ") + cpu::internal::Int8PathName(p));
  }
  std::printf("%-31s", "shape (m x n x k, BF16 weights)");
  for (const std::string& name : names) std::printf(" %15s", name.c_str());
  std::printf("   over exact:");
  for (size_t c = 1; c < names.size(); ++c) std::printf(" %15s", names[c].c_str());
  std::printf("\n");
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-1, 1);
  for (const Shape& s : shapes) {
    std::vector<float> x(static_cast<size_t>(s.m * s.k)), y(static_cast<size_t>(s.m * s.n));
    std::vector<uint16_t> w(static_cast<size_t>(s.n * s.k));
    for (float& v : x) v = dist(rng);
    for (uint16_t& v : w) v = FloatToBf16(dist(rng));
    const cpu::WeightMatrix weights{cpu::WeightType::kBF16, w.data(), s.n, s.k, s.k};
    const cpu::QuantizedMatrix quantized(weights);
    const cpu::WeightMatrix& int8 = quantized.matrix();
    std::vector<std::vector<double>> seconds(names.size());
    for (int r = 0; r <= repeats; ++r) {
      for (size_t c = 0; c < names.size(); ++c) {
        const auto t0 = bench::Clock::now();
        if (c >= 2) {
          cpu::internal::MatMulInt8On(int8_paths[c - 2], x.data(), s.m, s.k, int8, y.data(), s.n, false);
        } else {
          cpu::MatMul(x.data(), s.m, s.k, weights, y.data(), s.n, false,
                      c == 0 ? cpu::Precision::kExact : cpu::Precision::kFast);
        }
        if (r > 0) seconds[c].push_back(bench::Since(t0));  // the first is a warm-up
      }
    }
    const double flops = 2.0 * static_cast<double>(s.m) * static_cast<double>(s.n) * static_cast<double>(s.k);
    std::vector<double> rate(names.size());
    for (size_t c = 0; c < names.size(); ++c) rate[c] = flops / bench::Median(seconds[c]) / 1e9;
    std::printf("%-31s", s.what);
    for (double v : rate) std::printf(" %14.1fG", v);
    std::printf("   %11s", "");
    for (size_t c = 1; c < names.size(); ++c) std::printf(" %14.2fx", rate[c] / rate[0]);
    std::printf("   (%lld x %lld x %lld)\n", static_cast<long long>(s.m), static_cast<long long>(s.n),
                static_cast<long long>(s.k));
  }
  return 0;
}
