#include "kernels/cuda/moe.h"

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <initializer_list>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/common.cuh"

namespace epic::cuda {
namespace {

using detail::BlockSum;
using detail::CheckPointers;
using detail::kFullMask;
using detail::kThreads;
using detail::kWarps;
using detail::Str;
// PermuteByExpert counts and places the choices in chunks of this many, one block each.
constexpr int kChunk = kThreads;
// The offsets scan gives each expert one thread of one block.
static_assert(kMaxGateExperts <= 1024, "one thread per expert in the offsets scan");


// The gate's sizes as the kernel reads them; the host pointer in GateParams stays behind.
struct GateShape {
  int experts;
  int top_k;
  int groups;
  int topk_groups;
  int group_size;
  cpu::GroupRanking ranking;
  bool sigmoid;
  bool normalize;
  float scale;
};

// expf rounded from double: nearer the host's (almost correctly rounded) expf than
// CUDA's own 2-ulp expf, so that scores agree to the last bit far more often.
__device__ float ExpF(float x) { return static_cast<float>(exp(static_cast<double>(x))); }

__device__ float BlockMax(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(kFullMask, v, o));
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : shared[0];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(kFullMask, v, o));
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const float result = shared[0];
  __syncthreads();  // every thread has read it before a later call writes SHARED again
  return result;
}

// How many of VALUES[0, n) rank before VALUES[i]: larger, or equal at a lower index.
// This is a strict total order on finite values and -inf, so the ranks are a
// permutation and rank r is exactly the CPU's partial_sort position r.
__device__ int RankOf(const float* values, int n, int i) {
  const float v = values[i];
  int rank = 0;
  for (int j = 0; j < n; ++j) {
    const float u = values[j];
    rank += (u > v || (u == v && j < i)) ? 1 : 0;
  }
  return rank;
}

// One block per token.
__global__ void __launch_bounds__(kThreads)
    TopKGatingKernel(const float* logits, GateShape g, const float* bias, int32_t* ids, float* weights) {
  __shared__ float score[kMaxGateExperts];
  __shared__ float choice[kMaxGateExperts];
  __shared__ float group_score[kMaxGateExperts];
  __shared__ bool group_kept[kMaxGateExperts];
  __shared__ int32_t chosen[kMaxGateExperts];
  __shared__ float max_partial[kWarps];
  __shared__ double sum_partial[kWarps];
  __shared__ double weight_norm;

  const int n = g.experts;
  const float* l = logits + static_cast<int64_t>(blockIdx.x) * n;
  // Explicit roundings throughout keep nvcc from fusing into FMAs the CPU does not use.
  if (g.sigmoid) {
    for (int e = threadIdx.x; e < n; e += blockDim.x) score[e] = __fdiv_rn(1.0f, __fadd_rn(1.0f, ExpF(-l[e])));
  } else {
    // cpu::Softmax: fmax (order-free), exp of the F32 difference, the sum in double,
    // and one F32 inverse. Only the order of the double sum differs.
    float m = l[0];
    for (int e = threadIdx.x; e < n; e += blockDim.x) m = fmaxf(m, l[e]);
    m = BlockMax(m, max_partial);
    double sum = 0.0;
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
      score[e] = ExpF(__fsub_rn(l[e], m));
      sum += score[e];
    }
    sum = BlockSum(sum, sum_partial);
    const float inv = static_cast<float>(1.0 / sum);
    for (int e = threadIdx.x; e < n; e += blockDim.x) score[e] = __fmul_rn(score[e], inv);
  }
  for (int e = threadIdx.x; e < n; e += blockDim.x) choice[e] = bias ? __fadd_rn(score[e], bias[e]) : score[e];
  __syncthreads();

  if (g.ranking != cpu::GroupRanking::kNone) {
    for (int grp = threadIdx.x; grp < g.groups; grp += blockDim.x) {
      const float* s = choice + grp * g.group_size;
      // Only the values of the best one or two matter, not which of tied experts they are.
      float first = s[0];
      float second = -INFINITY;
      for (int i = 1; i < g.group_size; ++i) {
        if (s[i] > first) {
          second = first;
          first = s[i];
        } else if (s[i] > second) {
          second = s[i];
        }
      }
      group_score[grp] = g.ranking == cpu::GroupRanking::kMax ? first : __fadd_rn(first, second);
    }
    __syncthreads();
    for (int grp = threadIdx.x; grp < g.groups; grp += blockDim.x) {
      group_kept[grp] = RankOf(group_score, g.groups, grp) < g.topk_groups;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
      if (!group_kept[e / g.group_size]) choice[e] = -INFINITY;
    }
    __syncthreads();
  }

  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int rank = RankOf(choice, n, e);
    if (rank < g.top_k) chosen[rank] = e;
  }
  __syncthreads();

  // The weights are the scores without the bias, summed in k order in double as on the CPU.
  if (threadIdx.x == 0) {
    double sum = 0.0;
    for (int k = 0; k < g.top_k; ++k) sum += score[chosen[k]];
    weight_norm = g.normalize ? 1.0 / (sum + 1e-20) : 1.0;
  }
  __syncthreads();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * g.top_k;
  for (int k = threadIdx.x; k < g.top_k; k += blockDim.x) {
    const double w = __dmul_rn(__dmul_rn(static_cast<double>(score[chosen[k]]), weight_norm), g.scale);
    ids[row + k] = chosen[k];
    weights[row + k] = static_cast<float>(w);
  }
}

__device__ bool Routed(int32_t id, int experts) { return id >= 0 && id < experts; }

// chunk_counts[c, e]: the choices of chunk c routed to expert e. Shared-memory integer
// atomics: the counts do not depend on their order.
__global__ void CountChunksKernel(const int32_t* ids, int64_t entries, int experts, int32_t* chunk_counts) {
  __shared__ int32_t count[kMaxGateExperts];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) count[e] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  if (i < entries) {
    const int32_t id = ids[i];
    if (Routed(id, experts)) atomicAdd(&count[id], 1);
  }
  __syncthreads();
  int32_t* out = chunk_counts + static_cast<int64_t>(blockIdx.x) * experts;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) out[e] = count[e];
}

// One block of kMaxGateExperts threads, one per expert: turns chunk_counts into each
// chunk's first row within its expert, and writes counts and offsets.
__global__ void __launch_bounds__(kMaxGateExperts)
    ScanCountsKernel(int64_t chunks, int experts, int32_t* chunk_counts, int32_t* counts, int32_t* offsets) {
  __shared__ int32_t scan[kMaxGateExperts];
  const int e = threadIdx.x;
  int32_t total = 0;
  if (e < experts) {
    for (int64_t c = 0; c < chunks; ++c) {
      int32_t* at = chunk_counts + c * experts + e;
      const int32_t here = *at;
      *at = total;
      total += here;
    }
    counts[e] = total;
  }
  scan[e] = total;
  __syncthreads();
  // Inclusive scan over the experts, log2(1024) steps.
  for (int d = 1; d < kMaxGateExperts; d <<= 1) {
    const int32_t before = e >= d ? scan[e - d] : 0;
    __syncthreads();
    scan[e] += before;
    __syncthreads();
  }
  if (e == 0) offsets[0] = 0;
  if (e < experts) offsets[e + 1] = scan[e];
}

// Each choice's grouped row: its expert's offset, the rows of that expert in earlier
// chunks, and the earlier choices of the same expert in this chunk.
__global__ void PlaceChunksKernel(const int32_t* ids, const float* weights, int64_t entries, int64_t top_k,
                                  int experts, const int32_t* chunk_first, const int32_t* offsets,
                                  int32_t* source_token, float* row_weight, int32_t* grouped_row) {
  __shared__ int32_t chunk_ids[kChunk];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t i = begin + threadIdx.x;
  const int32_t id = i < entries ? ids[i] : -1;
  chunk_ids[threadIdx.x] = id;
  __syncthreads();
  if (i >= entries) return;
  if (!Routed(id, experts)) {
    grouped_row[i] = -1;
    return;
  }
  int32_t before = 0;
  for (int j = 0; j < static_cast<int>(threadIdx.x); ++j) before += chunk_ids[j] == id ? 1 : 0;
  const int32_t row = offsets[id] + chunk_first[static_cast<int64_t>(blockIdx.x) * experts + id] + before;
  source_token[row] = static_cast<int32_t>(i / top_k);
  row_weight[row] = weights[i];
  grouped_row[i] = row;
}

__global__ void ScatterAddKernel(const float* expert_out, int64_t rows, int64_t n, int64_t ldx,
                                 const int32_t* grouped_row, const float* weights, int64_t top_k, float* y,
                                 int64_t ldy) {
  const int32_t* route = grouped_row + static_cast<int64_t>(blockIdx.x) * top_k;
  const float* w = weights + static_cast<int64_t>(blockIdx.x) * top_k;
  float* out = y + static_cast<int64_t>(blockIdx.x) * ldy;
  bool any = false;
  for (int64_t k = 0; k < top_k; ++k) any = any || (route[k] >= 0 && route[k] < rows);
  if (!any) return;  // the same answer in every thread: the block leaves together
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    float sum = 0.0f;
    for (int64_t k = 0; k < top_k; ++k) {
      const int32_t r = route[k];
      if (r < 0 || r >= rows) continue;
      sum = __fadd_rn(sum, __fmul_rn(w[k], expert_out[static_cast<int64_t>(r) * ldx + i]));
    }
    out[i] = __fadd_rn(out[i], sum);
  }
}

}  // namespace

Status TopKGating(const float* logits, int64_t tokens, const cpu::GateParams& params, const float* choice_bias,
                  int32_t* ids, float* weights, cudaStream_t stream) {
  const int64_t n = params.num_experts;
  if (tokens < 0 || tokens > INT_MAX) return InvalidArgumentError("TopKGating: " + Str(tokens) + " tokens");
  if (n < 1 || n > kMaxGateExperts) {
    return InvalidArgumentError("TopKGating: " + Str(n) + " experts outside [1, " + Str(kMaxGateExperts) + "]");
  }
  if (params.top_k < 1 || params.top_k > n) {
    return InvalidArgumentError("TopKGating: top_k " + Str(params.top_k) + " outside [1, " + Str(n) + "]");
  }
  GateShape shape{static_cast<int>(n), static_cast<int>(params.top_k), 1, 1, static_cast<int>(n),
                  params.ranking, params.sigmoid, params.normalize, params.scale};
  if (params.ranking != cpu::GroupRanking::kNone) {
    const int64_t groups = params.num_groups;
    if (groups < 1 || n % groups != 0) {
      return InvalidArgumentError("TopKGating: " + Str(groups) + " groups do not divide " + Str(n) + " experts");
    }
    if (params.topk_groups < 1 || params.topk_groups > groups) {
      return InvalidArgumentError("TopKGating: topk_groups " + Str(params.topk_groups) + " outside [1, " +
                                  Str(groups) + "]");
    }
    if (params.ranking == cpu::GroupRanking::kTopTwoSum && n / groups < 2) {
      return InvalidArgumentError("TopKGating: top-two group ranking over groups of " + Str(n / groups));
    }
    shape.groups = static_cast<int>(groups);
    shape.topk_groups = static_cast<int>(params.topk_groups);
    shape.group_size = static_cast<int>(n / groups);
  }
  if (params.choice_bias != nullptr && choice_bias == nullptr) {
    return InvalidArgumentError("TopKGating: the parameters carry a choice bias but no device copy was given");
  }
  if (tokens == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers("TopKGating", {logits, ids, weights}));
  TopKGatingKernel<<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(logits, shape, choice_bias, ids,
                                                                          weights);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("TopKGatingKernel");
  return OkStatus();
}

int64_t PermuteScratchCount(int64_t tokens, int64_t top_k, int64_t num_experts) {
  if (tokens <= 0 || top_k <= 0 || num_experts <= 0) return 0;
  return (tokens * top_k + kChunk - 1) / kChunk * num_experts;
}

Status PermuteByExpert(const int32_t* ids, const float* weights, int64_t tokens, int64_t top_k,
                       int64_t num_experts, const ExpertRows& out, cudaStream_t stream) {
  if (tokens < 0 || top_k < 0) {
    return InvalidArgumentError("PermuteByExpert: " + Str(tokens) + " tokens of top_k " + Str(top_k));
  }
  if (num_experts < 1 || num_experts > kMaxGateExperts) {
    return InvalidArgumentError("PermuteByExpert: " + Str(num_experts) + " experts outside [1, " +
                                Str(kMaxGateExperts) + "]");
  }
  if (top_k > 0 && tokens > INT32_MAX / top_k) {
    return InvalidArgumentError("PermuteByExpert: " + Str(tokens) + " x " + Str(top_k) + " choices exceed int32 rows");
  }
  const int64_t entries = tokens * top_k;
  const int64_t chunks = (entries + kChunk - 1) / kChunk;
  const int experts = static_cast<int>(num_experts);
  // Counts and offsets are written even for no choices: the caller reads them.
  EPIC_RETURN_IF_ERROR(CheckPointers("PermuteByExpert", {out.counts, out.offsets}));
  if (entries > 0) {
    EPIC_RETURN_IF_ERROR(CheckPointers(
        "PermuteByExpert", {ids, weights, out.source_token, out.weight, out.grouped_row, out.scratch}));
    CountChunksKernel<<<static_cast<unsigned>(chunks), kChunk, 0, stream>>>(ids, entries, experts, out.scratch);
    EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("CountChunksKernel");
  }
  ScanCountsKernel<<<1, kMaxGateExperts, 0, stream>>>(chunks, experts, out.scratch, out.counts, out.offsets);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("ScanCountsKernel");
  if (entries > 0) {
    PlaceChunksKernel<<<static_cast<unsigned>(chunks), kChunk, 0, stream>>>(
        ids, weights, entries, top_k, experts, out.scratch, out.offsets, out.source_token, out.weight,
        out.grouped_row);
    EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("PlaceChunksKernel");
  }
  return OkStatus();
}

Status ScatterAddWeighted(const float* expert_out, int64_t rows, int64_t n, int64_t ldx, const int32_t* grouped_row,
                          const float* weights, int64_t tokens, int64_t top_k, float* y, int64_t ldy,
                          cudaStream_t stream) {
  if (rows < 0 || n < 0 || tokens < 0 || top_k < 0) {
    return InvalidArgumentError("ScatterAddWeighted: negative size (rows " + Str(rows) + ", width " + Str(n) +
                                ", tokens " + Str(tokens) + ", top_k " + Str(top_k) + ")");
  }
  if (ldx < n || ldy < n) {
    return InvalidArgumentError("ScatterAddWeighted: ldx " + Str(ldx) + " or ldy " + Str(ldy) + " < width " + Str(n));
  }
  if (tokens > INT_MAX) return InvalidArgumentError("ScatterAddWeighted: " + Str(tokens) + " tokens exceed one grid");
  if (tokens == 0 || n == 0 || top_k == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(CheckPointers("ScatterAddWeighted", {grouped_row, weights, y}));
  if (rows > 0) EPIC_RETURN_IF_ERROR(CheckPointers("ScatterAddWeighted", {expert_out}));
  ScatterAddKernel<<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(expert_out, rows, n, ldx, grouped_row,
                                                                          weights, top_k, y, ldy);
  EPIC_CUDA_RETURN_IF_LAUNCH_FAILED("ScatterAddKernel");
  return OkStatus();
}

}  // namespace epic::cuda
