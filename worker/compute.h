// The seam between the one layer schedule (Model::Forward, worker/model.cc) and the
// hardware: a compute backend holds this rank's weights where its kernels read them and
// runs a dozen operations on activations in its memory. The schedule, the MoE exchange,
// the attention-form choice, the statistics and placement changes are written once, in
// the model; a backend only computes. The CPU backend (compute_cpu.cc) is the reference;
// the CUDA one (compute_cuda.cc) is built when nvcc was found, and which devices a build
// has is decided in one file each (device_cuda.cc, device_none.cc), so model code holds
// no #ifdef.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"
#include "kernels/cpu/gating.h"
#include "parallel/communicator.h"
#include "parallel/exchange_layout.h"
#include "parallel/moe_exchange.h"
#include "worker/checkpoint.h"
#include "worker/device.h"
#include "worker/latent_cache.h"
#include "worker/model_config.h"
#include "worker/rope.h"
#include "worker/weights.h"

namespace epic {

struct SequenceStep;
struct StepTokens;

// One sequence of a step, as attention sees it.
struct AttentionSpan {
  int64_t first = 0;      // its first token in the step
  int64_t n = 0;          // its new tokens
  int64_t start = 0;      // rows cached before the step
  bool expanded = false;  // the expanded MLA form (K/V up-projected); else absorbed
};

// The hidden-wide norms a schedule applies.
enum class NormWeight { kInput, kPostAttention, kFinal };

// What a backend is built over: this rank's part of the model, as Model::Load split it.
struct ComputeShard {
  int64_t head_begin = 0, head_end = 0;    // this rank's attention heads
  int64_t vocab_begin = 0, vocab_end = 0;  // this rank's rows of lm_head
  // A device backend in a job of several ranks: the communicator over its memory (NCCL).
  parallel::Communicator* device_comm = nullptr;
};

class ComputeBackend {
 public:
  virtual ~ComputeBackend() = default;

  // Whether activations live in a device's memory (then the latent cache's rows do too).
  virtual bool on_device() const = 0;

  // Activation buffers in this backend's memory, by name (see Model::Step): F32, grown
  // to hold at least VALUES, never shrunk, contents not kept when they grow.
  virtual StatusOr<float*> Activations(int id, int64_t values) = 0;
  // The exchanged rows' memory, for parallel::MoeExchange.
  virtual parallel::RowSpace& rows() = 0;
  // The communicator over activations in this memory: the job's own on the host; on a
  // device the NCCL one, entered only after the kernels before it have finished.
  virtual parallel::Communicator* comm() = 0;

  // The step's layout (BATCH flattened as TOKENS over CACHE), before any other operation
  // of the step.
  virtual Status BeginStep(std::span<const SequenceStep> batch, const StepTokens& tokens, LatentCache* cache) = 0;
  // X [tokens, hidden] = the step tokens' embedding rows.
  virtual Status Embed(float* x) = 0;
  // OUT = RMSNorm(X) over ROWS rows of hidden, with NORM's weights of LAYER (OUT may be X).
  virtual Status Norm(NormWeight norm, int64_t layer, const float* x, int64_t rows, float* out) = 0;
  // MLA over X [tokens, hidden], normalised: this rank's heads' queries and the tokens'
  // latent rows (c_kv normalised, k_pe rotated) written to the cache, then attention in
  // each span's form over its cached rows. ATTN: [tokens, heads * v_head_dim].
  virtual Status Attention(int64_t layer, const float* x, std::span<const AttentionSpan> spans, float* attn) = 0;
  // Y [rows, hidden] (+)= ATTN o_proj^T, this rank's heads' share.
  virtual Status OutputProjection(int64_t layer, const float* attn, int64_t rows, float* y, bool accumulate) = 0;
  // Y [rows, hidden] += the layer's dense MLP (or its shared experts) of X, this rank's
  // share of the intermediate dimension.
  virtual Status Mlp(int64_t layer, const float* x, int64_t rows, float* y) = 0;
  // The router's top-k for X [rows, hidden]: IDS and WEIGHTS [rows, top_k] on the host.
  virtual Status Gate(int64_t layer, const float* x, int64_t rows, int32_t* ids, float* weights) = 0;
  // OUT [received, hidden] = for each received row of ROWS, the weighted sum of its
  // local experts' outputs, grouped by slot as LAYOUT says.
  virtual Status Experts(int64_t layer, const float* rows, int64_t received, const parallel::ExpertLayout& layout,
                         float* out) = 0;
  // LOGITS [rows, this rank's vocabulary] = lm_head of the final norm of X's ROWS.
  virtual Status LmHead(const float* x, std::span<const int64_t> rows, float* logits) = 0;
  // Y += X over N values; Y = 0 over N values.
  virtual Status Add(float* y, const float* x, int64_t n) = 0;
  virtual Status Zero(float* y, int64_t n) = 0;
  // HOST = N values of X (after the work queued before).
  virtual Status CopyToHost(const float* x, int64_t n, float* host) = 0;

  // The most bytes the expanded form's keys and values may take for one sequence;
  // beyond it the absorbed form runs (it needs no such memory).
  virtual double expanded_kv_budget() const = 0;

  // The experts of this rank's slots change to NEXT's (Model::ApplyPlacement, every rank
  // together, before the model's own weights change). Per layer and new slot: KEPT is
  // the old slot whose expert it keeps (-1 for a new one) and WEIGHTS the new one's host
  // weights. A failure leaves the backend as it was.
  virtual Status ChangeExperts(const parallel::ExpertPlacement& next, int rank,
                               const std::vector<std::vector<int>>& kept,
                               const std::vector<std::vector<MlpWeights>>& weights) = 0;
};

// The CPU backend over WEIGHTS (kept by the model; the backend reads them in place, so
// placement changes to them need nothing more), bound at PRECISION: under kFast the
// weights' products are int8 already, and attention takes BF16 operands where
// cpu::Bf16ProductsBeatF32().
std::unique_ptr<ComputeBackend> MakeCpuBackend(const ModelConfig& config, const ModelWeights& weights,
                                               const RopeTable& rope, const cpu::GateParams& gate,
                                               const ComputeShard& shard, parallel::Communicator* comm,
                                               cpu::Precision precision);

// OK when this build has DEVICE's backend and the machine has such a device; else
// FAILED_PRECONDITION saying which is missing. kCpu is always available.
Status DeviceAvailable(ComputeDevice device);
// Whether this build has DEVICE's backend at all (a machine may still lack the device).
bool DeviceBuilt(ComputeDevice device);

// DEVICE's backend over this rank's WEIGHTS (its heads, its share of the dense MLPs, the
// experts of its slots), copied to the device with PROGRESS. RESOURCE_EXHAUSTED when the
// device cannot hold them.
StatusOr<std::unique_ptr<ComputeBackend>> MakeDeviceBackend(ComputeDevice device, const ModelConfig& config,
                                                            const ModelWeights& weights, const RopeTable& rope,
                                                            const cpu::GateParams& gate, const ComputeShard& shard,
                                                            const ProgressFn& progress);

}  // namespace epic
