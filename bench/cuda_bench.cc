// The CUDA kernels at DeepSeek-V2's shapes against the GPU's own ceilings, measured in
// the same run:
//   copy bandwidth  a large device-to-device cudaMemcpy, bytes read plus bytes written;
//   BF16 GEMM rate  cuBLAS through cuda::MatMul at 8192 x 8192 x 8192 (F32 output).
// MLA decode (MlaAbsorbedAttention over a paged, shuffled BF16 cache) is bandwidth
// bound: its figure is GB/s moved as a ratio of the copy bandwidth. The grouped expert
// product (GroupedMatMul) is bandwidth bound for few tokens and compute bound for many:
// its figures are TFLOP/s against the GEMM rate, GB/s against the bandwidth, and the
// roofline ratio, the larger of the two.
// Every time is the median of --reps calls, each between its own pair of CUDA events,
// after warm-up calls. Without a GPU the bench says it was skipped and exits 0.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench/cuda_bounds.h"
#include "common/half.h"
#include "common/status.h"
#include "kernels/cuda/buffer.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/mla.h"

namespace epic::cuda {
namespace {

constexpr double kGiB = 1073741824.0;

// DeepSeek-V2's attention and expert shapes.
constexpr int64_t kLora = 512;            // kv_lora_rank: c_kv
constexpr int64_t kRope = 64;             // qk_rope_head_dim: k_pe
constexpr int64_t kRowWidth = kLora + kRope;
constexpr int64_t kBlockSize = 64;        // cache rows per block
constexpr double kSoftmaxScale = 0.07216878364870323;  // 1 / sqrt(qk_nope 128 + rope 64)
constexpr int64_t kHidden = 5120;
constexpr int64_t kMoeInter = 1536;
constexpr int64_t kExperts = 160;
constexpr int64_t kTopK = 6;

struct Options {
  int reps = 20;
  bool quick = false;
  double copy_gib = 2.0;
  double zipf_s = 1.0;
};

using bench::MedianMs;
using bench::RandomBf16;

StatusOr<DeviceBuffer<float>> RandomF32(int64_t count, uint64_t seed) {
  std::vector<float> values(static_cast<size_t>(count));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (float& v : values) v = uniform(rng);
  return DeviceBuffer<float>::FromHost(values);
}

// A result that must be finite (random inputs in [-1, 1) give no overflow): the first
// COUNT values at Y.
Status CheckFinite(const float* y, int64_t count, const std::string& what) {
  std::vector<float> host(static_cast<size_t>(count));
  EPIC_CUDA_RETURN_IF_ERROR(cudaMemcpy(host.data(), y, host.size() * sizeof(float), cudaMemcpyDeviceToHost),
                            "copy of " + what + " to the host");
  for (size_t i = 0; i < host.size(); ++i) {
    if (!std::isfinite(host[i])) {
      return InternalError(what + ": value " + std::to_string(i) + " is " + std::to_string(host[i]));
    }
  }
  return OkStatus();
}

StatusOr<size_t> FreeDeviceBytes() {
  size_t free_bytes = 0, total_bytes = 0;
  EPIC_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  return free_bytes;
}

// Room left for the allocator and cuBLAS next to the buffers a configuration asks for.
constexpr size_t kMemoryMargin = size_t{512} << 20;

// --- Ceilings --------------------------------------------------------------------

struct Ceilings {
  double copy_gbs = 0;     // device-to-device copy, read + write bytes per second
  double gemm_tflops = 0;  // cuBLAS BF16 8192^3 through cuda::MatMul
};

// --- MLA decode ------------------------------------------------------------------

struct MlaCase {
  int64_t heads = 0;
  int64_t batch = 0;    // sequences, one query token each
  int64_t context = 0;  // cached rows every sequence sees
};

// One decode step's attention: BATCH tokens, each over CONTEXT rows of its own
// sequence, the sequences' blocks scattered over the pool in a random order.
Status RunMla(const Options& o, const Ceilings& ceilings, const RandomBf16& random, int sm_count,
              const MlaCase& m) {
  const int64_t blocks_per_seq = (m.context + kBlockSize - 1) / kBlockSize;
  const int64_t num_blocks = m.batch * blocks_per_seq;
  const size_t cache_bytes = static_cast<size_t>(num_blocks * kBlockSize * kRowWidth * 2);
  const MlaSplits splits = PlanMlaSplits(m.batch, m.heads, m.context, sm_count);
  const int64_t workspace_floats = MlaWorkspaceFloats(m.batch, m.heads, kLora, splits);
  const int64_t q_floats = m.batch * m.heads * kRowWidth;  // q_latent then q_pe
  const int64_t out_floats = m.batch * m.heads * kLora;
  const size_t needed = cache_bytes + static_cast<size_t>(q_floats + out_floats + workspace_floats) * 4 +
                        static_cast<size_t>(num_blocks + 2 * m.batch) * 4;
  std::printf("%-5s %5lld %5lld %7lld ", "mla", static_cast<long long>(m.heads), static_cast<long long>(m.batch),
              static_cast<long long>(m.context));
  EPIC_ASSIGN_OR_RETURN(const size_t free_bytes, FreeDeviceBytes());
  if (needed + kMemoryMargin > free_bytes) {
    std::printf("skipped: needs %.2f GiB, %.2f GiB free\n", needed / kGiB, free_bytes / kGiB);
    return OkStatus();
  }

  EPIC_ASSIGN_OR_RETURN(DeviceMemory pool, DeviceMemory::Allocate(cache_bytes));  // [blocks, 64, 576] BF16
  EPIC_RETURN_IF_ERROR(random.Fill(pool.data(), pool.bytes()));
  std::mt19937_64 rng(static_cast<uint64_t>(m.heads * 1000003 + m.batch * 1009 + m.context));
  std::vector<int32_t> table(static_cast<size_t>(num_blocks));  // [batch, blocks_per_seq]
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  std::vector<int32_t> starts(static_cast<size_t>(m.batch)), contexts(static_cast<size_t>(m.batch));
  for (int64_t t = 0; t < m.batch; ++t) {
    starts[static_cast<size_t>(t)] = static_cast<int32_t>(t * blocks_per_seq);
    contexts[static_cast<size_t>(t)] = static_cast<int32_t>(m.context);
  }
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<int32_t> block_tables, DeviceBuffer<int32_t>::FromHost(table));
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<int32_t> table_start, DeviceBuffer<int32_t>::FromHost(starts));
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<int32_t> context, DeviceBuffer<int32_t>::FromHost(contexts));
  // q_latent [batch, heads, 512], then q_pe [batch, heads, 64].
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<float> q, RandomF32(q_floats, rng()));
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<float> out, DeviceBuffer<float>::Allocate(out_floats));  // [batch, heads, 512]
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<float> workspace, DeviceBuffer<float>::Allocate(workspace_floats));

  MlaAttentionParams p;
  p.tokens = m.batch;
  p.num_heads = m.heads;
  p.kv_lora_rank = kLora;
  p.rope_dim = kRope;
  p.scale = static_cast<float>(kSoftmaxScale);
  p.q_latent = q.data();
  p.q_pe = q.data() + m.batch * m.heads * kLora;
  p.q_pe_token_stride = m.heads * kRope;
  p.q_pe_head_stride = kRope;
  p.cache = {static_cast<const uint16_t*>(pool.data()), kBlockSize, block_tables.data()};
  p.table_start = table_start.data();
  p.context = context.data();
  p.max_context = m.context;
  p.out_latent = out.data();
  EPIC_ASSIGN_OR_RETURN(const double ms, MedianMs(o.reps, [&] {
                          return MlaAbsorbedAttention(p, splits, workspace.data(), workspace.size());
                        }));
  EPIC_RETURN_IF_ERROR(CheckFinite(out.data(), m.heads * kLora, "MLA output of the first token"));

  // The least a call moves: every cached row once, q in, the output out.
  const double bytes = static_cast<double>(m.batch) * m.context * kRowWidth * 2 +
                       static_cast<double>(q_floats + out_floats) * 4;
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  std::printf("%6lld %6lld %10.1f %9.1f %8.1f %6.2f\n", static_cast<long long>(splits.max_splits),
              static_cast<long long>(splits.split_rows), ms * 1e3, bytes / 1e6, gbs, gbs / ceilings.copy_gbs);
  return OkStatus();
}

// --- Grouped expert product ------------------------------------------------------

enum class Routing { kBalanced, kZipf };

// Rows per expert when TOKENS tokens each choose kTopK distinct experts: balanced,
// token t takes experts 6t .. 6t + 5 modulo 160 (every expert within one row of the
// mean); Zipf, each choice is drawn with weight 1 / rank^S over the experts in a
// shuffled order, a token drawing again when it hits an expert it already has.
std::vector<int32_t> ExpertCounts(int64_t tokens, Routing routing, double s, uint64_t seed) {
  std::vector<int32_t> counts(static_cast<size_t>(kExperts), 0);
  if (routing == Routing::kBalanced) {
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t j = 0; j < kTopK; ++j) ++counts[static_cast<size_t>((t * kTopK + j) % kExperts)];
    }
    return counts;
  }
  std::mt19937_64 rng(seed);
  std::vector<int> order(static_cast<size_t>(kExperts));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<double> weight(static_cast<size_t>(kExperts));
  for (int64_t i = 0; i < kExperts; ++i) weight[static_cast<size_t>(i)] = 1.0 / std::pow(i + 1, s);
  std::discrete_distribution<int> rank(weight.begin(), weight.end());
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int> chosen;
    while (static_cast<int64_t>(chosen.size()) < kTopK) {
      const int e = order[static_cast<size_t>(rank(rng))];
      if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
    }
    for (int e : chosen) ++counts[static_cast<size_t>(e)];
  }
  return counts;
}

// All experts' gate|up ([2 * 1536, 5120] each) and down ([5120, 1536] each) matrices,
// one allocation per product, and the grouped activations for the most tokens.
struct ExpertBank {
  DeviceMemory gate_up;
  DeviceMemory down;
  DeviceBuffer<const uint16_t*> gate_up_ptrs;
  DeviceBuffer<const uint16_t*> down_ptrs;
  DeviceMemory x;          // [max_rows, 5120] BF16 (down reads it as [max_rows, 1536])
  DeviceBuffer<float> y;   // [max_rows, 5120] F32
};

StatusOr<DeviceBuffer<const uint16_t*>> ExpertPointers(const DeviceMemory& weights, int64_t expert_values) {
  std::vector<const uint16_t*> ptrs(static_cast<size_t>(kExperts));
  for (int64_t e = 0; e < kExperts; ++e) {
    ptrs[static_cast<size_t>(e)] = static_cast<const uint16_t*>(weights.data()) + e * expert_values;
  }
  return DeviceBuffer<const uint16_t*>::FromHost(ptrs);
}

StatusOr<ExpertBank> MakeExpertBank(const RandomBf16& random, int64_t max_rows) {
  ExpertBank b;
  EPIC_ASSIGN_OR_RETURN(b.gate_up, DeviceMemory::Allocate(kExperts * 2 * kMoeInter * kHidden * 2));
  EPIC_ASSIGN_OR_RETURN(b.down, DeviceMemory::Allocate(kExperts * kHidden * kMoeInter * 2));
  EPIC_ASSIGN_OR_RETURN(b.gate_up_ptrs, ExpertPointers(b.gate_up, 2 * kMoeInter * kHidden));
  EPIC_ASSIGN_OR_RETURN(b.down_ptrs, ExpertPointers(b.down, kHidden * kMoeInter));
  EPIC_ASSIGN_OR_RETURN(b.x, DeviceMemory::Allocate(max_rows * kHidden * 2));
  EPIC_ASSIGN_OR_RETURN(b.y, DeviceBuffer<float>::Allocate(max_rows * kHidden));
  EPIC_RETURN_IF_ERROR(random.Fill(b.gate_up.data(), b.gate_up.bytes()));
  EPIC_RETURN_IF_ERROR(random.Fill(b.down.data(), b.down.bytes()));
  EPIC_RETURN_IF_ERROR(random.Fill(b.x.data(), b.x.bytes()));
  return StatusOr<ExpertBank>(std::move(b));
}

Status RunGrouped(const Options& o, const Ceilings& ceilings, ExpertBank& bank, int64_t tokens, Routing routing) {
  const std::vector<int32_t> counts = ExpertCounts(tokens, routing, o.zipf_s, static_cast<uint64_t>(tokens));
  std::vector<int32_t> offsets(static_cast<size_t>(kExperts + 1), 0);  // [experts + 1]
  for (int64_t e = 0; e < kExperts; ++e) {
    offsets[static_cast<size_t>(e + 1)] = offsets[static_cast<size_t>(e)] + counts[static_cast<size_t>(e)];
  }
  const int64_t rows = offsets.back();
  const int64_t touched = std::count_if(counts.begin(), counts.end(), [](int32_t c) { return c > 0; });
  const int32_t busiest = *std::max_element(counts.begin(), counts.end());
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<int32_t> device_offsets, DeviceBuffer<int32_t>::FromHost(offsets));
  EPIC_ASSIGN_OR_RETURN(DeviceBuffer<int32_t> scratch,
                        DeviceBuffer<int32_t>::Allocate(GroupedScratchCount(rows, kExperts)));

  struct Product {
    const char* name;
    GroupedWeights w;
  };
  const Product products[] = {
      {"gate_up", {bank.gate_up_ptrs.data(), kExperts, 2 * kMoeInter, kHidden, kHidden}},
      {"down", {bank.down_ptrs.data(), kExperts, kHidden, kMoeInter, kMoeInter}},
  };
  for (const Product& product : products) {
    const GroupedWeights& w = product.w;
    const auto* x = static_cast<const uint16_t*>(bank.x.data());
    EPIC_ASSIGN_OR_RETURN(const double ms, MedianMs(o.reps, [&] {
                            return GroupedMatMul(x, rows, w.k, device_offsets.data(), w, bank.y.data(), w.n,
                                                 scratch.data(), scratch.size());
                          }));
    EPIC_RETURN_IF_ERROR(CheckFinite(bank.y.data(), w.n, std::string("GroupedMatMul ") + product.name + " row 0"));
    const double flops = 2.0 * static_cast<double>(rows) * w.n * w.k;
    // The least a call moves: the matrices of the experts with rows, x in, y out.
    const double bytes = static_cast<double>(touched) * w.n * w.k * 2 + static_cast<double>(rows) * w.k * 2 +
                         static_cast<double>(rows) * w.n * 4;
    const double tflops = flops / (ms * 1e-3) / 1e12;
    const double gbs = bytes / (ms * 1e-3) / 1e9;
    const double flop_ratio = tflops / ceilings.gemm_tflops;
    const double byte_ratio = gbs / ceilings.copy_gbs;
    std::printf("%-5s %6lld %-8s %-7s %6lld %4lld %5d %10.1f %8.1f %7.3f %8.1f %6.2f %6.2f\n", "moe",
                static_cast<long long>(tokens), routing == Routing::kBalanced ? "balanced" : "zipf", product.name,
                static_cast<long long>(rows), static_cast<long long>(touched), busiest, ms * 1e3, tflops,
                flop_ratio, gbs, byte_ratio, std::max(flop_ratio, byte_ratio));
  }
  return OkStatus();
}

// --- The run ---------------------------------------------------------------------

Status Run(const Options& o) {
  EPIC_ASSIGN_OR_RETURN(const std::string name, DeviceName(0));
  EPIC_ASSIGN_OR_RETURN(const int sm_count, MultiprocessorCount());
  EPIC_ASSIGN_OR_RETURN(const RandomBf16 random, RandomBf16::Create(2024));

  Ceilings c;
  EPIC_ASSIGN_OR_RETURN(c.copy_gbs, bench::MeasureDeviceBandwidth(o.copy_gib, o.reps));
  EPIC_ASSIGN_OR_RETURN(c.gemm_tflops, bench::MeasureBf16GemmTflops(random, o.reps));
  std::printf("cuda_bench: %s, %d SMs; median of %d timed calls after %d warm-up calls\n", name.c_str(), sm_count,
              o.reps, bench::kCudaWarmup);
  std::printf("ceilings: copy bandwidth %.1f GB/s (%.2f GiB device-to-device cudaMemcpy, read + write bytes); "
              "BF16 GEMM %.1f TFLOP/s (cuBLAS via cuda::MatMul, 8192^3, random data, F32 out)\n",
              c.copy_gbs, o.copy_gib, c.gemm_tflops);

  // MLA decode at V2 (128 heads) and V2-Lite (16 heads).
  std::vector<int64_t> batches = {64, 128};
  std::vector<int64_t> contexts = {4096, 8192, 16384, 32768};
  if (o.quick) {
    batches = {64};
    contexts = {4096, 32768};
  }
  std::printf("\nMLA decode: kv_lora_rank %lld + rope %lld, BF16 paged cache (block %lld, shuffled), one token per "
              "sequence;\nsplits, rows: PlanMlaSplits' split of each context; MB = cache rows + q + out; "
              "of-bw = GB/s / copy bandwidth\n",
              static_cast<long long>(kLora), static_cast<long long>(kRope), static_cast<long long>(kBlockSize));
  std::printf("%-5s %5s %5s %7s %6s %6s %10s %9s %8s %6s\n", "op", "heads", "batch", "context", "splits", "rows",
              "us/call", "MB", "GB/s", "of-bw");
  for (int64_t heads : {128, 16}) {
    for (int64_t batch : batches) {
      for (int64_t context : contexts) {
        EPIC_RETURN_IF_ERROR(RunMla(o, c, random, sm_count, {heads, batch, context}));
      }
    }
  }

  // Routed experts at V2's sizes.
  std::vector<int64_t> token_counts = {64, 512, 4096};
  if (o.quick) token_counts = {64, 4096};
  const int64_t max_rows = *std::max_element(token_counts.begin(), token_counts.end()) * kTopK;
  std::printf("\nGrouped expert GEMM (GroupedMatMul): hidden %lld, moe_intermediate %lld, %lld experts, top-%lld; "
              "zipf s = %.2f;\nGB = weights of experts with rows + x + y; of-peak, of-bw: ratios to the ceilings; "
              "roof = the larger\n",
              static_cast<long long>(kHidden), static_cast<long long>(kMoeInter), static_cast<long long>(kExperts),
              static_cast<long long>(kTopK), o.zipf_s);
  const size_t bank_bytes = static_cast<size_t>(kExperts * 3 * kMoeInter * kHidden * 2 + max_rows * kHidden * 6);
  EPIC_ASSIGN_OR_RETURN(const size_t free_bytes, FreeDeviceBytes());
  if (bank_bytes + kMemoryMargin > free_bytes) {
    std::printf("moe skipped: the experts and activations need %.2f GiB, %.2f GiB free\n", bank_bytes / kGiB,
                free_bytes / kGiB);
    return OkStatus();
  }
  EPIC_ASSIGN_OR_RETURN(ExpertBank bank, MakeExpertBank(random, max_rows));
  std::printf("%-5s %6s %-8s %-7s %6s %4s %5s %10s %8s %7s %8s %6s %6s\n", "op", "tokens", "routing", "product", "rows",
              "used", "most", "us/call", "TFLOP/s", "of-peak", "GB/s", "of-bw", "roof");
  for (int64_t tokens : token_counts) {
    for (Routing routing : {Routing::kBalanced, Routing::kZipf}) {
      EPIC_RETURN_IF_ERROR(RunGrouped(o, c, bank, tokens, routing));
    }
  }
  return OkStatus();
}

}  // namespace
}  // namespace epic::cuda

int main(int argc, char** argv) {
  CLI::App app{"cuda_bench: epic's CUDA kernels at DeepSeek-V2 shapes (MLA decode over a paged latent cache,\n"
               "the grouped routed-expert GEMM) against the GPU's copy bandwidth and cuBLAS BF16 GEMM rate,\n"
               "both measured in the same run. Prints one line per configuration. Without a CUDA device\n"
               "it prints that it was skipped and exits 0."};
  epic::cuda::Options o;
  app.add_option("--reps", o.reps, "timed calls per figure; each figure is their median")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  app.add_flag("--quick", o.quick,
               "fewer configurations: MLA at batch 64, context 4096 and 32768; experts at 64 and 4096 tokens");
  app.add_option("--copy-gib", o.copy_gib, "GiB copied device-to-device for the bandwidth ceiling")
      ->capture_default_str()
      ->check(CLI::Range(0.0625, 64.0));
  app.add_option("--zipf-s", o.zipf_s, "exponent of the skewed expert routing (choice weight 1 / rank^s)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 8.0));
  CLI11_PARSE(app, argc, argv);

  const epic::StatusOr<int> devices = epic::cuda::DeviceCount();
  if (!devices.ok()) {
    std::printf("cuda_bench: skipped: no CUDA device is visible (%s)\n", devices.status().ToString().c_str());
    return 0;
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each configuration's line as it is measured
  const epic::Status s = epic::cuda::Run(o);
  if (!s.ok()) {
    std::fflush(stdout);
    std::fprintf(stderr, "cuda_bench: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
