#include "bench/bounds.h"

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <random>
#include <thread>
#include <vector>

#include "bench/timing.h"
#include "common/half.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/matmul_int8.h"
#include "kernels/cpu/parallel.h"

#ifdef EPIC_HAVE_CBLAS
#include <cblas.h>
#endif

namespace epic::bench {
namespace {

// Integer sums vectorise without reassociation flags; AVX-512 where present. STREAMS
// equal parts of [p, p + n) are read side by side, a 64-byte line of each in turn.
template <int kStreams>
uint64_t SumStreams(const uint64_t* p, int64_t n) {
  const int64_t part = n / kStreams / 8 * 8;
  uint64_t s = 0;
  for (int64_t i = 0; i < part; i += 8) {
    for (int j = 0; j < kStreams; ++j) {
      const uint64_t* line = p + j * part + i;
      s += line[0] + line[1] + line[2] + line[3] + line[4] + line[5] + line[6] + line[7];
    }
  }
  for (int64_t i = kStreams * part; i < n; ++i) s += p[i];
  return s;
}

using SumFn = uint64_t (*)(const uint64_t*, int64_t);

template <int kStreams>
__attribute__((target("avx512f"))) uint64_t SumStreamsAvx512(const uint64_t* p, int64_t n) {
  return SumStreams<kStreams>(p, n);
}

SumFn Summer(int streams, bool avx512) {
  switch (streams) {
    case 1: return avx512 ? SumStreamsAvx512<1> : SumStreams<1>;
    case 2: return avx512 ? SumStreamsAvx512<2> : SumStreams<2>;
    case 4: return avx512 ? SumStreamsAvx512<4> : SumStreams<4>;
    case 8: return avx512 ? SumStreamsAvx512<8> : SumStreams<8>;
    default: return avx512 ? SumStreamsAvx512<16> : SumStreams<16>;
  }
}

// The probe's source and destination, kept from call to call and grown when asked for
// more: a program that probes around each of its rounds (model_bench) spent a third of
// its run having the kernel zero a fresh pair of buffers.
struct ProbeBuffers {
  uint64_t* src = nullptr;
  uint64_t* dst = nullptr;
  int64_t bytes = 0;
  ~ProbeBuffers() {
    std::free(src);
    std::free(dst);
  }
  void Reserve(int64_t want) {
    if (want <= bytes) return;
    std::free(src);
    std::free(dst);
    // 2 MiB aligned and advised to use huge pages, as the model's weights are.
    const int64_t huge = 2 << 20;
    const int64_t padded = (want + huge - 1) / huge * huge;
    src = static_cast<uint64_t*>(std::aligned_alloc(huge, static_cast<size_t>(padded)));
    dst = static_cast<uint64_t*>(std::aligned_alloc(huge, static_cast<size_t>(padded)));
    if (src == nullptr || dst == nullptr) throw std::bad_alloc();
    ::madvise(src, static_cast<size_t>(padded), MADV_HUGEPAGE);
    ::madvise(dst, static_cast<size_t>(padded), MADV_HUGEPAGE);
    const int64_t words = padded / 8;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < words; ++i) {
      src[i] = static_cast<uint64_t>(i);
      dst[i] = 0;
    }
    bytes = padded;
  }
};

// The one pair of probe buffers, shared by the probes.
ProbeBuffers& Probe() {
  static ProbeBuffers buffers;
  return buffers;
}

// SUM over WORDS words at SRC, each thread taking an equal contiguous share.
uint64_t SumShares(SumFn sum, const uint64_t* src, int64_t words) {
  uint64_t total = 0;
#pragma omp parallel reduction(+ : total)
  {
    const int n = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t begin = words * id / n, end = words * (id + 1) / n;
    total += sum(src + begin, end - begin);
  }
  return total;
}

}  // namespace

Bandwidth MeasureBandwidth(double gib, int repeats) {
  const int64_t bytes = static_cast<int64_t>(gib * (1ll << 30)) / 64 * 64;
  const int64_t words = bytes / 8;
  ProbeBuffers& buffers = Probe();
  buffers.Reserve(bytes);
  const uint64_t* src = buffers.src;
  uint64_t* dst = buffers.dst;
  const bool avx512 = __builtin_cpu_supports("avx512f");
  Bandwidth best;
  volatile uint64_t sink = 0;
  for (int r = 0; r < repeats; ++r) {
    for (const int streams : {1, 2, 4, 8, 16}) {
      const SumFn sum = Summer(streams, avx512);
      const auto t0 = Clock::now();
      sink = sink + SumShares(sum, src, words);
      const double gbs = bytes / Since(t0) / 1e9;
      if (streams == 1) best.one_stream_gbs = std::max(best.one_stream_gbs, gbs);
      if (gbs > best.read_gbs) {
        best.read_gbs = gbs;
        best.read_streams = streams;
      }
    }

    const auto t1 = Clock::now();
#pragma omp parallel
    {
      const int n = omp_get_num_threads(), id = omp_get_thread_num();
      const int64_t begin = words * id / n, end = words * (id + 1) / n;
      std::memcpy(dst + begin, src + begin, static_cast<size_t>(end - begin) * 8);
    }
    best.copy_gbs = std::max(best.copy_gbs, 2.0 * bytes / Since(t1) / 1e9);
  }
  return best;
}

double PlainReadGbs(const std::vector<std::vector<Region>>& groups, int repeats) {
  // Each region's whole 8-byte words (a matrix's scales may start at any 4 bytes).
  struct Words {
    const uint64_t* p;
    int64_t n;
  };
  std::vector<std::vector<Words>> words;
  int64_t bytes = 0;
  for (const std::vector<Region>& group : groups) {
    words.emplace_back();
    for (const Region& r : group) {
      const auto at = reinterpret_cast<uintptr_t>(r.data);
      const uintptr_t begin = (at + 7) / 8 * 8, end = (at + static_cast<uintptr_t>(r.bytes)) / 8 * 8;
      if (end <= begin) continue;
      words.back().push_back({reinterpret_cast<const uint64_t*>(begin), static_cast<int64_t>(end - begin) / 8});
      bytes += static_cast<int64_t>(end - begin);
    }
  }
  if (bytes == 0) return 0;
  constexpr int64_t kEvictBytes = int64_t{256} << 20;
  ProbeBuffers& buffers = Probe();
  buffers.Reserve(kEvictBytes);
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const SumFn evict = Summer(1, avx512);
  volatile uint64_t sink = 0;
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    for (const int streams : {1, 4}) {
      uint64_t total = SumShares(evict, buffers.src, kEvictBytes / 8);
      const SumFn sum = Summer(streams, avx512);
      const auto t0 = Clock::now();
      for (const std::vector<Words>& group : words) {
        std::atomic<size_t> next{0};
#pragma omp parallel reduction(+ : total)
        {
          for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < group.size();) {
            total += sum(group[i].p, group[i].n);
          }
        }
      }
      best = std::max(best, static_cast<double>(bytes) / Since(t0) / 1e9);
      sink = sink + total;
    }
  }
  return best;
}

namespace {

// The bounds' GEMM shape, M x N x K: prefill's tokens through V2-Lite's expert width.
constexpr int64_t kM = 512, kN = 2816, kK = 2048;

struct GemmOperands {
  std::vector<float> a, b, c;  // [M, K], [N, K], [M, N]
  GemmOperands() : a(kM * kK), b(kN * kK), c(kM * kN) {
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> d(-1, 1);
    for (float& v : a) v = d(rng);
    for (float& v : b) v = d(rng);
  }
};

// Best of REPEATS epic MatMul calls of A against W, as GOP/s.
double MatMulRate(GemmOperands& o, const cpu::WeightMatrix& w, int repeats) {
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = Clock::now();
    cpu::MatMul(o.a.data(), kM, kK, w, o.c.data(), kN);
    best = std::min(best, Since(t0));
  }
  return 2.0 * kM * kN * kK / best / 1e9;
}

}  // namespace

GemmRate MeasureF32GemmRate(int repeats) {
  GemmOperands o;
  GemmRate rate;
  char how[160];
#ifdef EPIC_HAVE_CBLAS
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, kM, kN, kK, 1.0f, o.a.data(), kK, o.b.data(), kK, 0.0f,
                o.c.data(), kN);
    best = std::min(best, Since(t0));
  }
  const double f32 = 2.0 * kM * kN * kK / best / 1e9;
  const char* f32_how = "OpenBLAS cblas_sgemm";
#else
  const double f32 = MatMulRate(o, {cpu::WeightType::kF32, o.b.data(), kN, kK, kK}, repeats);
  const char* f32_how = "epic MatMul, F32 weights";
#endif
  // The same F32 arithmetic on BF16 weights, where epic's kernel for them runs faster (on
  // Zen 4 its dot form beat the F32-weight GEMM): the model's products must not beat
  // their bound.
  std::vector<uint16_t> b16(o.b.size());
  for (size_t i = 0; i < b16.size(); ++i) b16[i] = FloatToBf16(o.b[i]);
  const double bf16 = MatMulRate(o, {cpu::WeightType::kBF16, b16.data(), kN, kK, kK}, repeats);
  rate.gflops = std::max(f32, bf16);
  std::snprintf(how, sizeof(how), "best of %s %.1f and epic MatMul, BF16 weights %.1f; 512x2816x2048", f32_how, f32,
                bf16);
  rate.how = how;
  return rate;
}

GemmRate MeasureInt8GemmRate(int repeats) {
  GemmRate rate;
  if (!cpu::HasInt8Products()) return rate;
  GemmOperands o;
  const cpu::QuantizedMatrix w({cpu::WeightType::kF32, o.b.data(), kN, kK, kK});
  rate.how = std::string("epic int8 MatMul (") + cpu::internal::Int8PathName(cpu::internal::ActiveInt8Path()) +
             ") 512x2816x2048";
  rate.gflops = MatMulRate(o, w.matrix(), repeats);
  return rate;
}

TeamCost MeasureTeamCost() {
  TeamCost cost;
  constexpr int kSteps = 20000;
  const int threads = omp_get_max_threads();
  // Each kind after the others' threads have gone to sleep: spinning beside these they
  // would share their cores.
  auto settle = [] { std::this_thread::sleep_for(std::chrono::milliseconds(200)); };
  auto median_us = [&](auto&& step) {
    std::vector<double> us;
    for (int r = 0; r < 3; ++r) {
      const auto t0 = Clock::now();
      for (int i = 0; i < kSteps; ++i) step(i + r * kSteps + 1);
      us.push_back(Since(t0) / kSteps * 1e6);
    }
    return Median(us);
  };
  settle();
  cost.team_us = median_us([&](int) { cpu::OnTeam(threads, [](int, int) { asm volatile(""); }); });
  settle();
  cost.region_us = median_us([](int) {
#pragma omp parallel
    { asm volatile(""); }
  });
  if (threads < 2) return cost;
  settle();
  struct alignas(64) Line {
    std::atomic<int64_t> value{0};
  };
  Line go, done;
  std::thread other([&] {
    for (int64_t step = 1; step <= 3 * kSteps; ++step) {
      while (go.value.load(std::memory_order_acquire) != step) {
      }
      done.value.store(step, std::memory_order_release);
    }
  });
  cost.handoff_us = median_us([&](int64_t step) {
    go.value.store(step, std::memory_order_release);
    while (done.value.load(std::memory_order_acquire) != step) {
    }
  });
  other.join();
  return cost;
}

}  // namespace epic::bench
