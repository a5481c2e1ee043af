// MatMul speed against bounds measured in the same run:
//  - decode shapes (m = 1, 4; weights far larger than the caches): GB/s of weights read,
//    as a ratio of the streaming read bandwidth (a vector read-sum over a large buffer);
//  - prefill shapes (m = 16..512, K = 2048, N = 2816): GFLOP/s, as a ratio of the
//    micro-kernel's own rate on cache-resident packed data (the practical F32 FMA peak).
// It measures the path MatMul takes here; EPIC_CPU_ISA=avx2 or =plain picks a narrower one.
// Usage: matmul_bench [--seconds=S per figure, default 0.6] [--buffer-gib=G, default 1]
//                     [--only=decode|prefill|notrans]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/intrinsics.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/matmul_internal.h"

namespace epic::cpu {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// 64-byte aligned, first touched by the threads that will read it.
struct Buffer {
  explicit Buffer(size_t bytes)
      : size(bytes), data(static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64))) {
    if (data == nullptr) {
      std::fprintf(stderr, "cannot allocate %zu bytes\n", bytes);
      std::exit(1);
    }
  }
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  size_t size;
  char* data;
};

// Fills with small random BF16 or F32 values (no NaN/Inf), in parallel.
void FillRandom(Buffer& b, WeightType type) {
  const int64_t words = static_cast<int64_t>(b.size / 4);
  uint32_t* p = reinterpret_cast<uint32_t*>(b.data);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < words; ++i) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u + 12345u;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    const float f = (static_cast<float>(h & 0xffff) - 32768.0f) / 32768.0f;
    if (type == WeightType::kBF16) {
      const float g = (static_cast<float>(h >> 16) - 32768.0f) / 32768.0f;
      p[i] = static_cast<uint32_t>(FloatToBf16(f)) | (static_cast<uint32_t>(FloatToBf16(g)) << 16);
    } else {
      std::memcpy(&p[i], &f, 4);
    }
  }
}

// Sums `streams` equal parts of p[0, n) side by side (n a multiple of 64 * streams):
// one stream is the plain read, several keep more hardware prefetch streams busy, as a
// matrix product reading several weight rows at once does.
__attribute__((target("avx512f"))) float ReadSumAvx512(const float* p, int64_t n, int streams) {
  const int64_t part = n / streams;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < part; i += 64) {
    for (int s = 0; s < streams; ++s) {
      const float* q = p + s * part + i;
      a0 = _mm512_add_ps(a0, _mm512_load_ps(q));
      a1 = _mm512_add_ps(a1, _mm512_load_ps(q + 16));
      a2 = _mm512_add_ps(a2, _mm512_load_ps(q + 32));
      a3 = _mm512_add_ps(a3, _mm512_load_ps(q + 48));
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

__attribute__((target("avx2"))) float ReadSumAvx2(const float* p, int64_t n, int streams) {
  const int64_t part = n / streams;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < part; i += 32) {
    for (int s = 0; s < streams; ++s) {
      const float* q = p + s * part + i;
      a0 = _mm256_add_ps(a0, _mm256_load_ps(q));
      a1 = _mm256_add_ps(a1, _mm256_load_ps(q + 8));
      a2 = _mm256_add_ps(a2, _mm256_load_ps(q + 16));
      a3 = _mm256_add_ps(a3, _mm256_load_ps(q + 24));
    }
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float t = 0;
  for (float v : lanes) t += v;
  return t;
}

float ReadSumPlain(const float* p, int64_t n, int) {
  float s[16] = {};
  for (int64_t i = 0; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) s[j] += p[i + j];
  float t = 0;
  for (float v : s) t += v;
  return t;
}

// Best of several passes of a read-sum over the whole buffer on all threads, each
// thread reading its share as `streams` streams.
double ReadBandwidthGBs(Buffer& b, int streams, double seconds) {
  const int64_t unit = 64 * streams;
  const float* p = reinterpret_cast<const float*>(b.data);
  const Isa isa = internal::MatMulIsa();
  double best = 0;
  volatile float sink = 0;
  const auto start = Clock::now();
  for (int pass = 0; pass < 3 || Seconds(start) < seconds; ++pass) {
    const auto t0 = Clock::now();
    float total = 0;
    int64_t bytes = 0;
#pragma omp parallel reduction(+ : total, bytes)
    {
      const int64_t per_thread =
          static_cast<int64_t>(b.size / 4) / omp_get_num_threads() / unit * unit;
      const float* q = p + per_thread * omp_get_thread_num();
      total += isa == Isa::kAvx512 ? ReadSumAvx512(q, per_thread, streams)
               : isa == Isa::kAvx2 ? ReadSumAvx2(q, per_thread, streams)
                                   : ReadSumPlain(q, per_thread, 1);
      bytes += per_thread * 4;
    }
    sink = sink + total;
    best = std::max(best, static_cast<double>(bytes) / Seconds(t0) * 1e-9);
  }
  return best;
}

// Runs fn(call_index) repeatedly for about `seconds` after a warm-up; the median seconds
// per call, which keeps a call stretched by a descheduled thread (the 2 cores here are
// shared) from skewing the figure.
template <typename Fn>
double TimePerCall(double seconds, Fn fn) {
  fn(0);
  std::vector<double> times;
  const auto start = Clock::now();
  while (Seconds(start) < seconds || times.size() < 5) {
    const auto t0 = Clock::now();
    fn(static_cast<int64_t>(times.size()) + 1);
    times.push_back(Seconds(t0));
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return times[times.size() / 2];
}

const char* TypeName(WeightType t) { return t == WeightType::kBF16 ? "bf16" : "f32 "; }

// Decode: m rows of x against a rows x cols matrix, rotating through enough copies that
// every call reads its weights from memory, as each layer's step does.
void BenchDecode(int64_t m, int64_t rows, int64_t cols, WeightType type, double read_gbs,
                 double seconds) {
  WeightMatrix w{type, nullptr, rows, cols, cols};
  const size_t matrix_bytes = static_cast<size_t>(rows * cols * w.ElementBytes());
  const size_t copies = std::max<size_t>(1, (size_t{512} << 20) / matrix_bytes);
  Buffer weights(matrix_bytes * copies);
  FillRandom(weights, type);
  std::vector<float> x(static_cast<size_t>(m * cols), 0.5f), y(static_cast<size_t>(m * rows));
  const double t = TimePerCall(seconds, [&](int64_t call) {
    WeightMatrix wc = w;
    wc.data = weights.data + (call % copies) * matrix_bytes;
    MatMul(x.data(), m, cols, wc, y.data(), rows);
  });
  const double gbs = static_cast<double>(matrix_bytes) / t * 1e-9;
  std::printf("decode  %s m=%-3lld %5lld x %-5lld  %8.3f ms  %6.1f GB/s of weights  %.2f of read "
              "bandwidth (%.1f GB/s, measured just before)\n",
              TypeName(type), static_cast<long long>(m), static_cast<long long>(rows),
              static_cast<long long>(cols), t * 1e3, gbs, gbs / read_gbs, read_gbs);
}

// Prefill: y[m, n] = x[m, k] w[n, k]^T.
void BenchPrefill(int64_t m, int64_t n, int64_t k, WeightType type, double peak_gflops,
                  double seconds) {
  WeightMatrix w{type, nullptr, n, k, k};
  Buffer weights(static_cast<size_t>(n * k * w.ElementBytes()));
  FillRandom(weights, type);
  w.data = weights.data;
  std::vector<float> x(static_cast<size_t>(m * k), 0.25f), y(static_cast<size_t>(m * n));
  const double t = TimePerCall(seconds, [&](int64_t) { MatMul(x.data(), m, k, w, y.data(), n); });
  const double gflops = 2.0 * m * n * k / t * 1e-9;
  std::printf("prefill %s m=%-4lld N=%lld K=%lld  %8.3f ms  %6.1f GFLOP/s", TypeName(type),
              static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k),
              t * 1e3, gflops);
  // The plain path has no micro-kernel to bound it.
  if (peak_gflops > 0) std::printf("  %.2f of in-cache kernel rate", gflops / peak_gflops);
  std::printf("\n");
}

void BenchNoTrans(int64_t m, int64_t rows, int64_t cols, WeightType type, double seconds) {
  WeightMatrix w{type, nullptr, rows, cols, cols};
  Buffer weights(static_cast<size_t>(rows * cols * w.ElementBytes()));
  FillRandom(weights, type);
  w.data = weights.data;
  std::vector<float> x(static_cast<size_t>(m * rows), 0.25f), y(static_cast<size_t>(m * cols));
  const double t =
      TimePerCall(seconds, [&](int64_t) { MatMulNoTrans(x.data(), m, rows, w, y.data(), cols); });
  std::printf("notrans %s m=%-3lld %lld x %lld (cache-resident)  %8.4f ms  %6.1f GFLOP/s\n",
              TypeName(type), static_cast<long long>(m), static_cast<long long>(rows),
              static_cast<long long>(cols), t * 1e3, 2.0 * m * rows * cols / t * 1e-9);
}

int Main(int argc, char** argv) {
  double seconds = 0.6;
  double buffer_gib = 1.0;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--seconds=", 0) == 0) {
      seconds = std::atof(arg.c_str() + 10);
    } else if (arg.rfind("--buffer-gib=", 0) == 0) {
      buffer_gib = std::atof(arg.c_str() + 13);
    } else if (arg.rfind("--only=", 0) == 0) {
      only = arg.substr(7);
    } else {
      std::fprintf(stderr, "usage: %s [--seconds=S] [--buffer-gib=G] [--only=SECTION]\n",
                   argv[0]);
      return 2;
    }
  }
  const int threads = omp_get_max_threads();
  std::printf("matmul_bench: %d threads, %s kernels (active ISA %s; host offers %s)\n", threads,
              IsaName(internal::MatMulIsa()), IsaName(ActiveIsa()), AvailableIsas().c_str());

  // The bound is the better of a single stream and 8 side-by-side streams per thread.
  // The hosts' bandwidth drifts from minute to minute, so it is measured again next to
  // every decode figure and each ratio uses the measurement beside it.
  Buffer read_buffer(static_cast<size_t>(buffer_gib * (1 << 30)));
  FillRandom(read_buffer, WeightType::kF32);
  const auto measure_read = [&](double seconds_each, bool print) {
    const double one = ReadBandwidthGBs(read_buffer, 1, seconds_each);
    const double eight = ReadBandwidthGBs(read_buffer, 8, seconds_each);
    if (print) {
      std::printf("bound: streaming read bandwidth (%s read-sum, %.1f GiB, %d threads): "
                  "%.1f GB/s (1 stream a thread %.1f, 8 streams %.1f)\n",
                  IsaName(internal::MatMulIsa()), buffer_gib, threads, std::max(one, eight), one,
                  eight);
    }
    return std::max(one, eight);
  };
  measure_read(0.5, true);
  double peak_gflops = 0;
  if (internal::MatMulIsa() != Isa::kPlain) {
    peak_gflops = internal::MicroKernelInCacheGflops(threads, 1.0);
    std::printf("bound: %s micro-kernel on L1/L2-resident packed data (%d threads): %.1f GFLOP/s\n",
                IsaName(internal::MatMulIsa()), threads, peak_gflops);
    if (internal::MatMulIsa() == Isa::kAvx512) {
      std::printf("       expect MatMul near the F32 GEMM rate PERFORMANCE.md reports for"
                  " OpenBLAS/oneDNN on 2 cores (250-340 GFLOP/s on its Xeon)\n");
    }
  }

  const auto run = [&](const char* section) { return only.empty() || only == section; };
  if (run("decode")) {
    for (auto [rows, cols] :
         {std::pair<int64_t, int64_t>{2048, 2048}, {8192, 8192}, {11264, 2048}}) {
      for (int64_t m : {1, 4}) {
        BenchDecode(m, rows, cols, WeightType::kBF16, measure_read(0, false), seconds);
      }
    }
    BenchDecode(1, 4096, 4096, WeightType::kF32, measure_read(0, false), seconds);
  }
  if (run("prefill")) {
    for (WeightType type : {WeightType::kBF16, WeightType::kF32}) {
      for (int64_t m : {16, 32, 64, 128, 512}) BenchPrefill(m, 2816, 2048, type, peak_gflops, seconds);
    }
  }
  if (run("notrans")) {
    for (int64_t m : {1, 16, 64}) BenchNoTrans(m, 128, 512, WeightType::kBF16, seconds / 2);
  }
  return 0;
}

}  // namespace
}  // namespace epic::cpu

int main(int argc, char** argv) { return epic::cpu::Main(argc, argv); }
