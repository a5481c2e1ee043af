// The CUDA backend: the model's weights resident on one GPU in BF16 (the router in F32),
// the latent cache as a paged BF16 pool there, every operation run with kernels/cuda,
// and the activations and exchanged rows in device memory, moved by NCCL. The CPU
// backend is the reference it is tested against. Compiled only in builds with CUDA.
#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "common/half.h"
#include "kernels/cuda/buffer.h"
#include "kernels/cuda/device.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/moe.h"
#include "kernels/cuda/ops.h"
#include "worker/compute.h"
#include "worker/model.h"

namespace epic {
namespace {

using cuda::DeviceBuffer;
using cuda::DeviceMatrix;

struct DeviceMlp {
  DeviceMatrix gate_up;  // [2 * inter, hidden]: gate's rows, then up's
  DeviceMatrix down;     // [hidden, inter]
  int64_t inter = 0;
};

// A layer's slots' expert matrices, as GroupedMatMul reads them: a pointer per slot.
struct ExpertTables {
  DeviceBuffer<const uint16_t*> gate_up, down;
};

struct DeviceLayer {
  DeviceBuffer<float> input_norm, post_attention_norm, q_a_norm, kv_a_norm, choice_bias;
  DeviceMatrix q_proj, q_a_proj, q_b_proj, kv_a_proj, kv_b_proj, o_proj;
  DeviceMatrix router;  // F32: routing decides on the CPU's values, not BF16-rounded ones
  bool moe = false;
  bool has_shared = false;
  DeviceMlp dense, shared;
  std::vector<DeviceMlp> experts;  // slot order
  // Each routed expert in memory of its own, so that a rank dropping it frees it.
  std::vector<std::shared_ptr<cuda::DeviceMemory>> expert_memory;
  ExpertTables tables;  // for GroupedMatMul
};

// One device allocation for every matrix, filled matrix by matrix: each host matrix
// (BF16 or F32, any row stride; several stacked by rows for a fused gate|up) becomes a
// contiguous device matrix of the wanted type.
class WeightUpload {
 public:
  void Add(std::vector<cpu::WeightMatrix> parts, cuda::DType type, DeviceMatrix* target) {
    int64_t rows = 0;
    for (const auto& p : parts) rows += p.rows;
    const int64_t cols = parts.empty() ? 0 : parts[0].cols;
    target->type = type;
    target->rows = rows;
    target->cols = cols;
    target->ld = cols;
    const int64_t bytes = rows * cols * (type == cuda::DType::kBF16 ? 2 : 4);
    items_.push_back({std::move(parts), target, total_});
    total_ += (bytes + 255) / 256 * 256;
  }

  // Allocates and copies, then points every target at its part of MEMORY.
  Status Run(cuda::DeviceMemory* memory, const ProgressFn& progress) {
    EPIC_ASSIGN_OR_RETURN(*memory, cuda::DeviceMemory::Allocate(static_cast<size_t>(total_)));
    std::vector<uint8_t> staging;
    for (const Item& item : items_) {
      DeviceMatrix& t = *item.target;
      const size_t row_bytes = static_cast<size_t>(t.cols * t.ElementBytes());
      int64_t row = 0;
      for (const cpu::WeightMatrix& p : item.parts) {
        const size_t offset = static_cast<size_t>(item.offset) + static_cast<size_t>(row) * row_bytes;
        const bool same = (p.type == cpu::WeightType::kBF16) == (t.type == cuda::DType::kBF16);
        if (same && p.row_stride == p.cols) {
          EPIC_RETURN_IF_ERROR(memory->CopyFromHost(p.data, static_cast<size_t>(p.rows) * row_bytes, offset));
        } else {
          staging.resize(static_cast<size_t>(p.rows) * row_bytes);
          for (int64_t r = 0; r < p.rows; ++r) {
            for (int64_t c = 0; c < p.cols; ++c) {
              const float v = p.At(r, c);
              if (t.type == cuda::DType::kBF16) {
                const uint16_t h = FloatToBf16(v);
                std::memcpy(staging.data() + (r * p.cols + c) * 2, &h, 2);
              } else {
                std::memcpy(staging.data() + (r * p.cols + c) * 4, &v, 4);
              }
            }
          }
          EPIC_RETURN_IF_ERROR(memory->CopyFromHost(staging.data(), staging.size(), offset));
        }
        row += p.rows;
        done_ += static_cast<int64_t>(p.rows * row_bytes);
        if (progress) progress(done_, total_);
      }
      t.data = static_cast<const char*>(memory->data()) + item.offset;
    }
    return OkStatus();
  }

  int64_t total_bytes() const { return total_; }

 private:
  struct Item {
    std::vector<cpu::WeightMatrix> parts;
    DeviceMatrix* target;
    int64_t offset;
  };
  std::vector<Item> items_;
  int64_t total_ = 0;
  int64_t done_ = 0;
};

// Grows B to hold at least N values (never shrinks); contents are not kept.
template <typename T>
Status Grow(DeviceBuffer<T>& b, int64_t n) {
  if (b.size() >= n) return OkStatus();
  EPIC_ASSIGN_OR_RETURN(b, DeviceBuffer<T>::Allocate(std::max<int64_t>(n, 1)));
  return OkStatus();
}

// BF16 bytes of an MLP's three matrices.
int64_t MlpBytes(const MlpWeights& w) {
  return 2 * (w.gate.rows * w.gate.cols + w.up.rows * w.up.cols + w.down.rows * w.down.cols);
}

// One routed expert copied to memory of its own.
struct DeviceExpert {
  DeviceMlp mlp;
  std::shared_ptr<cuda::DeviceMemory> memory;
  int64_t bytes = 0;
};

StatusOr<DeviceExpert> UploadExpert(const MlpWeights& w, const ProgressFn& progress) {
  DeviceExpert e;
  WeightUpload upload;
  e.mlp.inter = w.gate.rows;
  upload.Add({w.gate, w.up}, cuda::DType::kBF16, &e.mlp.gate_up);
  upload.Add({w.down}, cuda::DType::kBF16, &e.mlp.down);
  e.memory = std::make_shared<cuda::DeviceMemory>();
  EPIC_RETURN_IF_ERROR(upload.Run(e.memory.get(), progress));
  e.bytes = upload.total_bytes();
  return e;
}

StatusOr<ExpertTables> MakeExpertTables(const std::vector<DeviceMlp>& experts) {
  std::vector<const uint16_t*> gate_up, down;
  for (const DeviceMlp& e : experts) {
    gate_up.push_back(static_cast<const uint16_t*>(e.gate_up.data));
    down.push_back(static_cast<const uint16_t*>(e.down.data));
  }
  ExpertTables t;
  EPIC_ASSIGN_OR_RETURN(t.gate_up, DeviceBuffer<const uint16_t*>::FromHost(gate_up));
  EPIC_ASSIGN_OR_RETURN(t.down, DeviceBuffer<const uint16_t*>::FromHost(down));
  return t;
}
// The job's communicator over device buffers, entered only once the kernels that wrote
// its inputs have finished (NCCL runs on its own stream).
class FencedCommunicator final : public parallel::Communicator {
 public:
  explicit FencedCommunicator(parallel::Communicator* inner) : inner_(inner) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  const char* backend() const override { return inner_->backend(); }
  Status AllReduceSum(const float* in, float* out, int64_t count) override {
    EPIC_RETURN_IF_ERROR(cuda::Synchronize());
    return inner_->AllReduceSum(in, out, count);
  }
  Status ReduceScatterSum(const float* in, float* out, std::span<const int64_t> counts) override {
    EPIC_RETURN_IF_ERROR(cuda::Synchronize());
    return inner_->ReduceScatterSum(in, out, counts);
  }
  Status AllGather(const void* in, void* out, std::span<const int64_t> bytes) override {
    EPIC_RETURN_IF_ERROR(cuda::Synchronize());
    return inner_->AllGather(in, out, bytes);
  }
  Status AllToAllV(const void* send, std::span<const int64_t> send_bytes, void* recv,
                   std::span<const int64_t> recv_bytes) override {
    EPIC_RETURN_IF_ERROR(cuda::Synchronize());
    return inner_->AllToAllV(send, send_bytes, recv, recv_bytes);
  }
  Status AllToAllRows(const void* x, int64_t row_bytes, std::span<const int32_t> rows,
                      std::span<const int64_t> send_rows, void* recv, std::span<const int64_t> recv_rows) override {
    EPIC_RETURN_IF_ERROR(cuda::Synchronize());
    return inner_->AllToAllRows(x, row_bytes, rows, send_rows, recv, recv_rows);
  }
  Status AllToAllRowsWithTail(const void* x, int64_t row_bytes, std::span<const int32_t> rows,
                              std::span<const int64_t> send_rows, void* recv, std::span<const int64_t> recv_rows,
                              const void* tail, int64_t tail_bytes, void* tail_recv) override {
    EPIC_RETURN_IF_ERROR(cuda::Synchronize());
    return inner_->AllToAllRowsWithTail(x, row_bytes, rows, send_rows, recv, recv_rows, tail, tail_bytes,
                                        tail_recv);
  }
  Status ExchangeCounts(std::span<const int64_t> send, std::span<int64_t> recv) override {
    return inner_->ExchangeCounts(send, recv);
  }
  Status Broadcast(void* data, int64_t bytes, int root) override {
    EPIC_RETURN_IF_ERROR(cuda::Synchronize());
    return inner_->Broadcast(data, bytes, root);
  }
  Status Send(const void* data, int64_t bytes, int peer, int tag) override {
    EPIC_RETURN_IF_ERROR(cuda::Synchronize());
    return inner_->Send(data, bytes, peer, tag);
  }
  Status Recv(void* data, int64_t bytes, int peer, int tag) override {
    EPIC_RETURN_IF_ERROR(cuda::Synchronize());
    return inner_->Recv(data, bytes, peer, tag);
  }
  Status Barrier() override { return inner_->Barrier(); }

 private:
  parallel::Communicator* inner_;
};

class CudaBackend final : public ComputeBackend, public parallel::RowSpace {
 public:
  static StatusOr<std::unique_ptr<CudaBackend>> Create(const ModelConfig& c, const ModelWeights& w,
                                                       const RopeTable& rope, const cpu::GateParams& gate,
                                                       const ComputeShard& shard, const ProgressFn& progress);

  bool on_device() const override { return true; }
  StatusOr<float*> Activations(int id, int64_t values) override {
    if (static_cast<size_t>(id) >= activations_.size()) activations_.resize(static_cast<size_t>(id) + 1);
    DeviceBuffer<float>& b = activations_[static_cast<size_t>(id)];
    EPIC_RETURN_IF_ERROR(Grow(b, values));
    return b.data();
  }
  parallel::RowSpace& rows() override { return *this; }
  parallel::Communicator* comm() override { return comm_ ? comm_.get() : nullptr; }

  // RowSpace: device memory.
  StatusOr<void*> Buffer(int id, int64_t bytes) override {
    if (static_cast<size_t>(id) >= bytes_.size()) bytes_.resize(static_cast<size_t>(id) + 1);
    DeviceBuffer<uint8_t>& b = bytes_[static_cast<size_t>(id)];
    EPIC_RETURN_IF_ERROR(Grow(b, bytes));
    return static_cast<void*>(b.data());
  }
  StatusOr<const void*> Stage(const void* host, int64_t bytes, int id) override {
    EPIC_ASSIGN_OR_RETURN(void* d, Buffer(id, bytes));
    DeviceBuffer<uint8_t>& b = bytes_[static_cast<size_t>(id)];
    EPIC_RETURN_IF_ERROR(b.CopyFromHost(static_cast<const uint8_t*>(host), bytes));
    return static_cast<const void*>(d);
  }
  StatusOr<const void*> Fetch(const void* src, int64_t bytes, void* host) override {
    EPIC_RETURN_IF_ERROR(cuda::CopyToHost(host, src, static_cast<size_t>(bytes)));
    return static_cast<const void*>(host);
  }
  Status AddRows(float* back, int64_t returned, const float* self, int64_t self_rows, int64_t width,
                 const int32_t* source, int64_t tokens, int64_t sources, float* y) override {
    // One buffer for the kernel: the returned rows, then the self block after them.
    const float* rows = self;
    if (returned > 0) {
      EPIC_RETURN_IF_ERROR(cuda::CopyOnDevice(back + returned * width, self,
                                              static_cast<size_t>(self_rows * width) * sizeof(float)));
      rows = back;
    }
    if (ws_.ones.size() < tokens * sources) {  // the adds' unit weights, filled once
      EPIC_RETURN_IF_ERROR(Grow(ws_.ones, tokens * sources));
      EPIC_RETURN_IF_ERROR(ws_.ones.CopyFromHost(
          std::vector<float>(static_cast<size_t>(ws_.ones.size()), 1.0f).data(), ws_.ones.size()));
    }
    return cuda::ScatterAddWeighted(rows, returned + self_rows, width, width, source, ws_.ones.data(), tokens,
                                    sources, y, width);
  }

  Status BeginStep(std::span<const SequenceStep> batch, const StepTokens& tokens, LatentCache* cache) override;
  Status Embed(float* x) override {
    return cuda::GatherRowsBf16(ws_.token_ids.data(), tokens_, static_cast<const uint16_t*>(embed_.data), embed_.rows,
                                c_.hidden_size, x, c_.hidden_size);
  }
  Status Norm(NormWeight norm, int64_t layer, const float* x, int64_t rows, float* out) override {
    const float* weight = norm == NormWeight::kFinal   ? final_norm_.data()
                          : norm == NormWeight::kInput ? layers_[layer].input_norm.data()
                                                       : layers_[layer].post_attention_norm.data();
    const int64_t hidden = c_.hidden_size;
    return cuda::RmsNorm(x, rows, hidden, hidden, weight, static_cast<float>(c_.rms_norm_eps), out, hidden);
  }
  Status Attention(int64_t layer, const float* x, std::span<const AttentionSpan> spans, float* attn) override;
  Status OutputProjection(int64_t layer, const float* attn, int64_t rows, float* y, bool accumulate) override {
    const int64_t width = heads_ * c_.v_head_dim;
    EPIC_RETURN_IF_ERROR(Grow(ws_.wide_b, rows * width));
    EPIC_RETURN_IF_ERROR(cuda::ToBf16(attn, rows, width, width, ws_.wide_b.data(), width));
    return cuda::MatMul(*blas_, ws_.wide_b.data(), rows, width, layers_[layer].o_proj, y, c_.hidden_size, accumulate);
  }
  Status Mlp(int64_t layer, const float* x, int64_t rows, float* y) override {
    const DeviceLayer& L = layers_[layer];
    const int64_t hidden = c_.hidden_size;
    EPIC_RETURN_IF_ERROR(Grow(ws_.xb, rows * hidden));
    EPIC_RETURN_IF_ERROR(cuda::ToBf16(x, rows, hidden, hidden, ws_.xb.data(), hidden));
    return RunMlp(L.moe ? L.shared : L.dense, ws_.xb.data(), rows, y);
  }
  Status Gate(int64_t layer, const float* x, int64_t rows, int32_t* ids, float* weights) override;
  Status Experts(int64_t layer, const float* rows, int64_t received, const parallel::ExpertLayout& layout,
                 float* out) override;
  Status LmHead(const float* x, std::span<const int64_t> rows, float* logits) override;
  Status Add(float* y, const float* x, int64_t n) override { return cuda::AddInPlace(y, x, n); }
  Status Zero(float* y, int64_t n) override {
    return cuda::ZeroOnDevice(y, static_cast<size_t>(n) * sizeof(float));
  }
  Status CopyToHost(const float* x, int64_t n, float* host) override {
    // A synchronous copy: it waits for the step and returns any fault of its kernels.
    return cuda::CopyToHost(host, x, static_cast<size_t>(n) * sizeof(float));
  }
  // Its keys and values, F32 and BF16, within 1 GiB: the absorbed form needs no such memory.
  double expanded_kv_budget() const override { return 1 << 30; }
  Status ChangeExperts(const parallel::ExpertPlacement& next, int rank, const std::vector<std::vector<int>>& kept,
                       const std::vector<std::vector<MlpWeights>>& weights) override;

 private:
  // y += down(silu(gate(xb)) * up(xb)) for TOKENS rows.
  Status RunMlp(const DeviceMlp& m, const uint16_t* xb, int64_t tokens, float* y);
  Status ExpandedAttention(const DeviceLayer& L, const uint16_t* pool, std::span<const AttentionSpan> spans,
                           float* attn);
  // expert_out[r] = the expert of grouped row r applied to x[source[r]] for the first
  // ROWS rows, grouped by OFFSETS over the layer's slots.
  Status GroupedExperts(const DeviceLayer& L, const float* x, const int32_t* source, int64_t rows,
                        const int32_t* offsets);
  template <typename T>
  Status Upload(DeviceBuffer<T>& b, const std::vector<T>& values) {
    EPIC_RETURN_IF_ERROR(Grow(b, static_cast<int64_t>(values.size())));
    return b.CopyFromHost(values.data(), static_cast<int64_t>(values.size()));
  }

  ModelConfig c_;
  cpu::GateParams gate_;
  ComputeShard shard_;
  std::unique_ptr<FencedCommunicator> comm_;  // several ranks
  cuda::DeviceMemory weight_memory_;
  int64_t weight_bytes_ = 0;
  DeviceMatrix embed_, lm_head_;
  DeviceBuffer<float> final_norm_;
  std::vector<DeviceLayer> layers_;
  int64_t heads_ = 0;  // this rank's
  int64_t vocab_ = 0;  // this rank's rows of lm_head
  cuda::RopeFrequencies rope_freq_;
  std::unique_ptr<cuda::Blas> blas_;
  int sm_count_ = 1;

  // The current step's layout.
  int64_t tokens_ = 0;
  int64_t block_size_ = 0;
  int64_t layer_rows_ = 0;  // cache rows a layer holds
  int64_t max_context_ = 1;
  uint16_t* pool_ = nullptr;  // [layers, blocks, block_size, width] BF16
  std::vector<int64_t> table_start_;  // per sequence, its block ids' start in ws_.block_tables

  std::vector<DeviceBuffer<float>> activations_;
  std::vector<DeviceBuffer<uint8_t>> bytes_;
  // The operations' own buffers, grown to the largest step seen.
  struct Workspace {
    DeviceBuffer<int32_t> token_ids, context, table_start, block_tables, logit_rows, expert_ids, tiles;
    DeviceBuffer<int32_t> offsets, source, grouped;
    DeviceBuffer<int64_t> positions, slots;
    DeviceBuffer<float> qa, q, latent, q_latent, o_latent, gate_up, mid, router, gate_weights, row_weight,
        expert_out, mla, selected, ones;
    DeviceBuffer<uint16_t> xb, wide_b, mid_b, rows_b;
    // The expanded form: one sequence's rows, keys and values, one chunk's scores.
    DeviceBuffer<uint16_t> latent_rows, kv_b, probs;
    DeviceBuffer<float> kv, scores;
  } ws_;
};

StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(const ModelConfig& c, const ModelWeights& w,
                                                           const RopeTable& rope, const cpu::GateParams& gate,
                                                           const ComputeShard& shard, const ProgressFn& progress) {
  auto b = std::make_unique<CudaBackend>();
  b->c_ = c;
  b->gate_ = gate;
  b->shard_ = shard;
  if (shard.device_comm != nullptr) b->comm_ = std::make_unique<FencedCommunicator>(shard.device_comm);
  b->heads_ = shard.head_end - shard.head_begin;
  b->vocab_ = shard.vocab_end - shard.vocab_begin;
  EPIC_ASSIGN_OR_RETURN(b->sm_count_, cuda::MultiprocessorCount());
  EPIC_ASSIGN_OR_RETURN(b->blas_, cuda::Blas::Create());
  EPIC_ASSIGN_OR_RETURN(b->rope_freq_, cuda::RopeFrequencies::FromHost(rope.inv_freq, rope.mscale));
  EPIC_ASSIGN_OR_RETURN(b->final_norm_, DeviceBuffer<float>::FromHost(w.final_norm));

  WeightUpload upload;
  upload.Add({w.embed}, cuda::DType::kBF16, &b->embed_);
  // Tied embeddings: lm_head is embed's rows, so the device holds them once.
  const bool tied = w.lm_head.data == w.embed.data && w.lm_head.rows == w.embed.rows;
  if (!tied) upload.Add({w.lm_head}, cuda::DType::kBF16, &b->lm_head_);
  b->layers_.resize(w.layers.size());
  auto add_mlp = [&](const MlpWeights& m, DeviceMlp* d) {
    d->inter = m.gate.rows;
    upload.Add({m.gate, m.up}, cuda::DType::kBF16, &d->gate_up);
    upload.Add({m.down}, cuda::DType::kBF16, &d->down);
  };
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& L = w.layers[l];
    DeviceLayer& D = b->layers_[l];
    EPIC_ASSIGN_OR_RETURN(D.input_norm, DeviceBuffer<float>::FromHost(L.input_norm));
    EPIC_ASSIGN_OR_RETURN(D.post_attention_norm, DeviceBuffer<float>::FromHost(L.post_attention_norm));
    EPIC_ASSIGN_OR_RETURN(D.kv_a_norm, DeviceBuffer<float>::FromHost(L.kv_a_norm));
    if (c.q_lora_rank > 0) {
      EPIC_ASSIGN_OR_RETURN(D.q_a_norm, DeviceBuffer<float>::FromHost(L.q_a_norm));
      upload.Add({L.q_a_proj}, cuda::DType::kBF16, &D.q_a_proj);
      upload.Add({L.q_b_proj}, cuda::DType::kBF16, &D.q_b_proj);
    } else {
      upload.Add({L.q_proj}, cuda::DType::kBF16, &D.q_proj);
    }
    upload.Add({L.kv_a_proj}, cuda::DType::kBF16, &D.kv_a_proj);
    upload.Add({L.kv_b_proj}, cuda::DType::kBF16, &D.kv_b_proj);
    upload.Add({L.o_proj}, cuda::DType::kBF16, &D.o_proj);
    D.moe = L.moe;
    D.has_shared = L.has_shared;
    if (!L.moe) {
      add_mlp(L.dense, &D.dense);
      continue;
    }
    upload.Add({L.router}, cuda::DType::kF32, &D.router);
    if (!L.choice_bias.empty()) {
      EPIC_ASSIGN_OR_RETURN(D.choice_bias, DeviceBuffer<float>::FromHost(L.choice_bias));
    }
    if (L.has_shared) add_mlp(L.shared, &D.shared);
  }
  // Progress over everything: the shared allocation, then expert by expert.
  int64_t total = upload.total_bytes(), done = 0;
  for (const LayerWeights& L : w.layers) {
    for (const MlpWeights& e : L.experts) total += MlpBytes(e);
  }
  auto report = [&](int64_t d, int64_t) {
    if (progress) progress(std::min(done + d, total), total);
  };
  EPIC_RETURN_IF_ERROR(upload.Run(&b->weight_memory_, report));
  if (tied) b->lm_head_ = b->embed_;
  b->weight_bytes_ = upload.total_bytes();
  done = upload.total_bytes();
  for (size_t l = 0; l < w.layers.size(); ++l) {
    DeviceLayer& D = b->layers_[l];
    for (const MlpWeights& e : w.layers[l].experts) {
      EPIC_ASSIGN_OR_RETURN(DeviceExpert d, UploadExpert(e, report));
      D.experts.push_back(d.mlp);
      D.expert_memory.push_back(std::move(d.memory));
      b->weight_bytes_ += d.bytes;
      done += MlpBytes(e);
    }
    if (!D.moe) continue;
    EPIC_ASSIGN_OR_RETURN(D.tables, MakeExpertTables(D.experts));
  }
  return b;
}

Status CudaBackend::ChangeExperts(const parallel::ExpertPlacement& next, int rank,
                                  const std::vector<std::vector<int>>& kept,
                                  const std::vector<std::vector<MlpWeights>>& weights) {
  struct Pending {
    std::vector<DeviceMlp> experts;
    std::vector<std::shared_ptr<cuda::DeviceMemory>> memory;
    ExpertTables tables;
    int64_t added = 0;
  };
  // New experts are copied to the device before anything changes.
  std::vector<Pending> pending(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (!next.is_moe_layer(static_cast<int64_t>(l))) continue;
    const DeviceLayer& D = layers_[l];
    Pending& p = pending[l];
    const std::vector<int32_t>& slots = next.slots(static_cast<int64_t>(l), rank);
    for (size_t j = 0; j < slots.size(); ++j) {
      const int old = kept.at(l).at(j);
      if (old >= 0) {
        p.experts.push_back(D.experts.at(static_cast<size_t>(old)));
        p.memory.push_back(D.expert_memory.at(static_cast<size_t>(old)));
        continue;
      }
      EPIC_ASSIGN_OR_RETURN(DeviceExpert e, UploadExpert(weights.at(l).at(j), {}));
      p.experts.push_back(e.mlp);
      p.memory.push_back(std::move(e.memory));
      p.added += e.bytes;
    }
    EPIC_ASSIGN_OR_RETURN(p.tables, MakeExpertTables(p.experts));
  }
  EPIC_RETURN_IF_ERROR(cuda::Synchronize());  // no kernel still reads what is freed below
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (!next.is_moe_layer(static_cast<int64_t>(l))) continue;
    DeviceLayer& D = layers_[l];
    Pending& p = pending[l];
    for (size_t s = 0; s < D.expert_memory.size(); ++s) {
      const bool stays = std::find(kept[l].begin(), kept[l].end(), static_cast<int>(s)) != kept[l].end();
      if (!stays && D.expert_memory[s]) weight_bytes_ -= static_cast<int64_t>(D.expert_memory[s]->bytes());
    }
    weight_bytes_ += p.added;
    D.experts = std::move(p.experts);
    D.expert_memory = std::move(p.memory);
    D.tables = std::move(p.tables);
  }
  return OkStatus();
}

Status CudaBackend::BeginStep(std::span<const SequenceStep> batch, const StepTokens& steps, LatentCache* cache) {
  const ModelConfig& c = c_;
  const int64_t tokens = static_cast<int64_t>(steps.ids.size());
  const int64_t width = c.latent_dim();
  const int64_t bs = cache->block_size();
  tokens_ = tokens;
  block_size_ = bs;
  // The cache's rows on the device: [layers, blocks, block_size, width] BF16.
  layer_rows_ = cache->num_blocks() * bs;
  if (!cache->device_rows()) {
    EPIC_ASSIGN_OR_RETURN(cuda::DeviceMemory rows,
                          cuda::DeviceMemory::Allocate(
                              static_cast<size_t>(c.num_hidden_layers * layer_rows_ * width * 2)));
    cache->device_rows() = std::make_shared<cuda::DeviceMemory>(std::move(rows));
  }
  pool_ = static_cast<uint16_t*>(static_cast<cuda::DeviceMemory*>(cache->device_rows().get())->data());

  // Per token its sequence's block table, context and cache slot.
  std::vector<int32_t> context(static_cast<size_t>(tokens)), table_start(static_cast<size_t>(tokens));
  std::vector<int64_t> slots(static_cast<size_t>(tokens));
  std::vector<int32_t> tables;
  max_context_ = 1;
  table_start_.clear();
  size_t t = 0;
  for (const SequenceStep& s : batch) {
    const int32_t start = static_cast<int32_t>(tables.size());
    table_start_.push_back(start);
    tables.insert(tables.end(), s.cache->blocks.begin(), s.cache->blocks.end());
    for (size_t i = 0; i < s.tokens.size(); ++i, ++t) {
      const int64_t pos = steps.positions[t];
      context[t] = static_cast<int32_t>(pos + 1);
      table_start[t] = start;
      slots[t] = static_cast<int64_t>(s.cache->blocks[static_cast<size_t>(pos / bs)]) * bs + pos % bs;
      max_context_ = std::max(max_context_, pos + 1);
    }
  }
  EPIC_RETURN_IF_ERROR(Upload(ws_.token_ids, steps.ids));
  EPIC_RETURN_IF_ERROR(Upload(ws_.positions, steps.positions));
  EPIC_RETURN_IF_ERROR(Upload(ws_.context, context));
  EPIC_RETURN_IF_ERROR(Upload(ws_.table_start, table_start));
  EPIC_RETURN_IF_ERROR(Upload(ws_.slots, slots));
  return Upload(ws_.block_tables, tables);
}

// The new latent rows written to the cache first; then the absorbed form over every
// token when a span wants it (one launch serves any mix), then the expanded spans.
Status CudaBackend::Attention(int64_t layer, const float* x, std::span<const AttentionSpan> spans, float* attn) {
  const ModelConfig& c = c_;
  const DeviceLayer& L = layers_[layer];
  const int64_t tokens = tokens_;
  const int64_t hidden = c.hidden_size;
  const int64_t heads = heads_;
  const int64_t nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, lora = c.kv_lora_rank;
  const int64_t qhd = c.q_head_dim(), vdim = c.v_head_dim, width = c.latent_dim();
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int64_t wide = std::max({hidden, c.q_lora_rank, heads * qhd, heads * lora, heads * vdim});
  EPIC_RETURN_IF_ERROR(Grow(ws_.xb, tokens * hidden));
  EPIC_RETURN_IF_ERROR(Grow(ws_.qa, tokens * std::max<int64_t>(c.q_lora_rank, 1)));
  EPIC_RETURN_IF_ERROR(Grow(ws_.q, tokens * heads * qhd));
  EPIC_RETURN_IF_ERROR(Grow(ws_.latent, tokens * width));
  EPIC_RETURN_IF_ERROR(Grow(ws_.q_latent, tokens * heads * lora));
  EPIC_RETURN_IF_ERROR(Grow(ws_.o_latent, tokens * heads * lora));
  EPIC_RETURN_IF_ERROR(Grow(ws_.wide_b, tokens * wide));
  EPIC_RETURN_IF_ERROR(cuda::ToBf16(x, tokens, hidden, hidden, ws_.xb.data(), hidden));

  float* q = ws_.q.data();  // [tokens, heads * qhd]
  if (c.q_lora_rank > 0) {
    const int64_t r = c.q_lora_rank;
    EPIC_RETURN_IF_ERROR(cuda::MatMul(*blas_, ws_.xb.data(), tokens, hidden, L.q_a_proj, ws_.qa.data(), r));
    EPIC_RETURN_IF_ERROR(cuda::RmsNorm(ws_.qa.data(), tokens, r, r, L.q_a_norm.data(), eps, ws_.qa.data(), r));
    EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws_.qa.data(), tokens, r, r, ws_.wide_b.data(), r));
    EPIC_RETURN_IF_ERROR(cuda::MatMul(*blas_, ws_.wide_b.data(), tokens, r, L.q_b_proj, q, heads * qhd));
  } else {
    EPIC_RETURN_IF_ERROR(cuda::MatMul(*blas_, ws_.xb.data(), tokens, hidden, L.q_proj, q, heads * qhd));
  }
  float* latent = ws_.latent.data();  // [tokens, width]: c_kv normalised, k_pe rotated
  uint16_t* pool = pool_ + layer * layer_rows_ * width;
  EPIC_RETURN_IF_ERROR(cuda::MatMul(*blas_, ws_.xb.data(), tokens, hidden, L.kv_a_proj, latent, width));
  EPIC_RETURN_IF_ERROR(cuda::RmsNorm(latent, tokens, lora, width, L.kv_a_norm.data(), eps, latent, width));
  EPIC_RETURN_IF_ERROR(cuda::ApplyRope({latent, tokens, width, lora, 1, 0}, ws_.positions.data(), rope_freq_));
  EPIC_RETURN_IF_ERROR(
      cuda::ApplyRope({q, tokens, heads * qhd, nope, heads, qhd}, ws_.positions.data(), rope_freq_));
  EPIC_RETURN_IF_ERROR(cuda::WriteLatentRows(latent, tokens, width, width, ws_.slots.data(), pool));

  const bool absorbed = std::any_of(spans.begin(), spans.end(), [](const AttentionSpan& s) { return !s.expanded; });
  const bool expanded = std::any_of(spans.begin(), spans.end(), [](const AttentionSpan& s) { return s.expanded; });
  if (absorbed) {
    EPIC_RETURN_IF_ERROR(cuda::ToBf16(q, tokens, heads * qhd, heads * qhd, ws_.wide_b.data(), heads * qhd));
    // q_latent[t, h] = q_nope[t, h] W_UK[h] (gemm.h: MlaHeads).
    const cuda::MlaHeads mla{L.kv_b_proj, heads, nope, vdim};
    EPIC_RETURN_IF_ERROR(cuda::FoldQuery(*blas_, mla, ws_.wide_b.data(), tokens, heads * qhd, qhd,
                                         ws_.q_latent.data(), heads * lora));
    cuda::MlaAttentionParams p;
    p.tokens = tokens;
    p.num_heads = heads;
    p.kv_lora_rank = lora;
    p.rope_dim = rope;
    p.scale = static_cast<float>(c.SoftmaxScale());
    p.q_latent = ws_.q_latent.data();
    p.q_pe = q + nope;
    p.q_pe_token_stride = heads * qhd;
    p.q_pe_head_stride = qhd;
    p.cache = {pool, block_size_, ws_.block_tables.data()};
    p.table_start = ws_.table_start.data();
    p.context = ws_.context.data();
    p.max_context = max_context_;
    p.out_latent = ws_.o_latent.data();
    const cuda::MlaSplits splits = cuda::PlanMlaSplits(tokens, heads, max_context_, sm_count_);
    EPIC_RETURN_IF_ERROR(Grow(ws_.mla, cuda::MlaWorkspaceFloats(tokens, heads, lora, splits)));
    EPIC_RETURN_IF_ERROR(cuda::MlaAbsorbedAttention(p, splits, ws_.mla.data(), ws_.mla.size()));
    // attn[t, h] = W_UV[h] o_latent[t, h].
    EPIC_RETURN_IF_ERROR(
        cuda::ToBf16(ws_.o_latent.data(), tokens, heads * lora, heads * lora, ws_.wide_b.data(), heads * lora));
    EPIC_RETURN_IF_ERROR(
        cuda::UnfoldLatent(*blas_, mla, ws_.wide_b.data(), tokens, heads * lora, attn, heads * vdim));
  }
  if (!expanded) return OkStatus();
  EPIC_RETURN_IF_ERROR(cuda::ToBf16(q, tokens, heads * qhd, heads * qhd, ws_.wide_b.data(), heads * qhd));
  return ExpandedAttention(L, pool, spans, attn);
}

// The expanded form, sequence by sequence: its cached rows (the new ones written) up-
// projected through kv_b_proj into per-head keys and values, then causal attention per
// head as cuBLAS products around CausalSoftmax, over chunks of queries that bound the
// score matrix. Reads ws_.wide_b (q in BF16).
Status CudaBackend::ExpandedAttention(const DeviceLayer& L, const uint16_t* pool,
                                      std::span<const AttentionSpan> spans, float* attn) {
  const ModelConfig& c = c_;
  const int64_t heads = heads_;
  const int64_t nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, lora = c.kv_lora_rank;
  const int64_t qhd = c.q_head_dim(), vdim = c.v_head_dim, width = c.latent_dim();
  const int64_t kv_head = nope + vdim;
  const int64_t ldq = heads * qhd;
  const float scale = static_cast<float>(c.SoftmaxScale());
  constexpr int64_t kScoreBudget = int64_t{64} << 20;  // score values at a time (256 MiB of F32)
  for (size_t i = 0; i < spans.size(); ++i) {
    const AttentionSpan& sp = spans[i];
    if (!sp.expanded) continue;
    const int64_t context = sp.start + sp.n;
    EPIC_RETURN_IF_ERROR(Grow(ws_.latent_rows, context * width));
    EPIC_RETURN_IF_ERROR(Grow(ws_.kv, context * heads * kv_head));
    EPIC_RETURN_IF_ERROR(Grow(ws_.kv_b, context * heads * kv_head));
    EPIC_RETURN_IF_ERROR(cuda::GatherLatentRows(pool, block_size_, ws_.block_tables.data() + table_start_[i],
                                                context, width, ws_.latent_rows.data()));
    // kv[t] = kv_b_proj c_kv[t]: per head [k_nope | v].
    EPIC_RETURN_IF_ERROR(
        cuda::MatMul(*blas_, ws_.latent_rows.data(), context, width, L.kv_b_proj, ws_.kv.data(), heads * kv_head));
    EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws_.kv.data(), context, heads * kv_head, heads * kv_head, ws_.kv_b.data(),
                                      heads * kv_head));
    const int64_t chunk = std::clamp<int64_t>(kScoreBudget / std::max<int64_t>(heads * context, 1), 1, sp.n);
    for (int64_t i0 = 0; i0 < sp.n; i0 += chunk) {
      const int64_t nq = std::min(chunk, sp.n - i0);
      EPIC_RETURN_IF_ERROR(Grow(ws_.scores, heads * nq * context));
      EPIC_RETURN_IF_ERROR(Grow(ws_.probs, heads * nq * context));
      const uint16_t* q = ws_.wide_b.data() + (sp.first + i0) * ldq;
      // scores[h] = q_nope[h] k_nope[h]^T + q_pe[h] k_pe^T, k_pe shared by the heads.
      cuda::BatchedMatMulArgs qk;
      qk.x = q;
      qk.m = nq;
      qk.ldx = ldq;
      qk.x_stride = qhd;
      qk.w = {cuda::DType::kBF16, ws_.kv_b.data(), context, nope, heads * kv_head};
      qk.w_stride = kv_head;
      qk.y = ws_.scores.data();
      qk.ldy = context;
      qk.y_stride = nq * context;
      qk.batches = heads;
      EPIC_RETURN_IF_ERROR(cuda::BatchedMatMul(*blas_, qk));
      if (rope > 0) {
        cuda::BatchedMatMulArgs pe = qk;
        pe.x = q + nope;
        pe.w = {cuda::DType::kBF16, ws_.latent_rows.data() + lora, context, rope, width};
        pe.w_stride = 0;
        pe.accumulate = true;
        EPIC_RETURN_IF_ERROR(cuda::BatchedMatMul(*blas_, pe));
      }
      EPIC_RETURN_IF_ERROR(cuda::CausalSoftmax(ws_.scores.data(), heads, nq, context, sp.start + i0, scale,
                                               ws_.probs.data()));
      // attn[i, h] = probs[h, i] v[h].
      cuda::BatchedMatMulArgs pv;
      pv.x = ws_.probs.data();
      pv.m = nq;
      pv.ldx = context;
      pv.x_stride = nq * context;
      pv.w = {cuda::DType::kBF16, ws_.kv_b.data() + nope, context, vdim, heads * kv_head};
      pv.w_stride = kv_head;
      pv.transpose_w = false;
      pv.y = attn + (sp.first + i0) * heads * vdim;
      pv.ldy = heads * vdim;
      pv.y_stride = vdim;
      pv.batches = heads;
      EPIC_RETURN_IF_ERROR(cuda::BatchedMatMul(*blas_, pv));
    }
  }
  return OkStatus();
}

Status CudaBackend::RunMlp(const DeviceMlp& m, const uint16_t* xb, int64_t tokens, float* y) {
  const int64_t hidden = c_.hidden_size;
  EPIC_RETURN_IF_ERROR(Grow(ws_.gate_up, tokens * 2 * m.inter));
  EPIC_RETURN_IF_ERROR(Grow(ws_.mid, tokens * m.inter));
  EPIC_RETURN_IF_ERROR(Grow(ws_.mid_b, tokens * m.inter));
  EPIC_RETURN_IF_ERROR(cuda::MatMul(*blas_, xb, tokens, hidden, m.gate_up, ws_.gate_up.data(), 2 * m.inter));
  EPIC_RETURN_IF_ERROR(cuda::SiluMul(ws_.gate_up.data(), ws_.gate_up.data() + m.inter, tokens, m.inter, 2 * m.inter,
                                     ws_.mid.data(), m.inter));
  EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws_.mid.data(), tokens, m.inter, m.inter, ws_.mid_b.data(), m.inter));
  return cuda::MatMul(*blas_, ws_.mid_b.data(), tokens, m.inter, m.down, y, hidden, /*accumulate=*/true);
}

Status CudaBackend::Gate(int64_t layer, const float* x, int64_t rows, int32_t* ids, float* weights) {
  if (rows == 0) return OkStatus();
  const DeviceLayer& L = layers_[layer];
  const int64_t experts = c_.n_routed_experts;
  const int64_t k = c_.num_experts_per_tok;
  EPIC_RETURN_IF_ERROR(Grow(ws_.router, rows * experts));
  EPIC_RETURN_IF_ERROR(Grow(ws_.expert_ids, rows * k));
  EPIC_RETURN_IF_ERROR(Grow(ws_.gate_weights, rows * k));
  EPIC_RETURN_IF_ERROR(cuda::MatMul(*blas_, x, rows, c_.hidden_size, L.router, ws_.router.data(), experts));
  // TopKGating reads the bias from its device copy; the host pointer only says there is one.
  static const float kHasBias = 0.0f;
  cpu::GateParams g = gate_;
  const bool biased = L.choice_bias.size() > 0;
  g.choice_bias = biased ? &kHasBias : nullptr;
  EPIC_RETURN_IF_ERROR(cuda::TopKGating(ws_.router.data(), rows, g, biased ? L.choice_bias.data() : nullptr,
                                        ws_.expert_ids.data(), ws_.gate_weights.data()));
  EPIC_RETURN_IF_ERROR(ws_.expert_ids.CopyToHost(ids, rows * k));  // waits for the gate
  return ws_.gate_weights.CopyToHost(weights, rows * k);
}

Status CudaBackend::GroupedExperts(const DeviceLayer& L, const float* x, const int32_t* source, int64_t rows,
                                   const int32_t* offsets) {
  const int64_t hidden = c_.hidden_size;
  const int64_t inter = c_.moe_intermediate_size;
  const int64_t slots = L.tables.gate_up.size();
  EPIC_RETURN_IF_ERROR(Grow(ws_.rows_b, rows * hidden));
  EPIC_RETURN_IF_ERROR(Grow(ws_.gate_up, rows * 2 * inter));
  EPIC_RETURN_IF_ERROR(Grow(ws_.mid, rows * inter));
  EPIC_RETURN_IF_ERROR(Grow(ws_.mid_b, rows * inter));
  EPIC_RETURN_IF_ERROR(Grow(ws_.expert_out, rows * hidden));
  EPIC_RETURN_IF_ERROR(Grow(ws_.tiles, cuda::GroupedScratchCount(rows, std::max<int64_t>(slots, 1))));
  EPIC_RETURN_IF_ERROR(cuda::GatherRowsToBf16(x, hidden, hidden, source, nullptr, rows, ws_.rows_b.data(), hidden));
  const cuda::GroupedWeights first{L.tables.gate_up.data(), slots, 2 * inter, hidden, hidden};
  EPIC_RETURN_IF_ERROR(cuda::GroupedMatMul(ws_.rows_b.data(), rows, hidden, offsets, first, ws_.gate_up.data(),
                                           2 * inter, ws_.tiles.data(), ws_.tiles.size()));
  EPIC_RETURN_IF_ERROR(cuda::SiluMul(ws_.gate_up.data(), ws_.gate_up.data() + inter, rows, inter, 2 * inter,
                                     ws_.mid.data(), inter));
  EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws_.mid.data(), rows, inter, inter, ws_.mid_b.data(), inter));
  const cuda::GroupedWeights second{L.tables.down.data(), slots, hidden, inter, inter};
  return cuda::GroupedMatMul(ws_.mid_b.data(), rows, inter, offsets, second, ws_.expert_out.data(), hidden,
                             ws_.tiles.data(), ws_.tiles.size());
}

Status CudaBackend::Experts(int64_t layer, const float* rows, int64_t received, const parallel::ExpertLayout& layout,
                            float* out) {
  const int64_t hidden = c_.hidden_size;
  const int64_t k = c_.num_experts_per_tok;
  const int64_t grouped = layout.offsets.empty() ? 0 : layout.offsets.back();
  EPIC_RETURN_IF_ERROR(cuda::ZeroOnDevice(out, static_cast<size_t>(received * hidden) * sizeof(float)));
  if (grouped == 0) return OkStatus();
  EPIC_RETURN_IF_ERROR(Upload(ws_.offsets, layout.offsets));
  EPIC_RETURN_IF_ERROR(Upload(ws_.source, layout.grouped_source));
  EPIC_RETURN_IF_ERROR(Upload(ws_.grouped, layout.row_grouped));
  EPIC_RETURN_IF_ERROR(Upload(ws_.row_weight, layout.row_weight));
  EPIC_RETURN_IF_ERROR(GroupedExperts(layers_[layer], rows, ws_.source.data(), grouped, ws_.offsets.data()));
  return cuda::ScatterAddWeighted(ws_.expert_out.data(), grouped, hidden, hidden, ws_.grouped.data(),
                                  ws_.row_weight.data(), received, k, out, hidden);
}

Status CudaBackend::LmHead(const float* x, std::span<const int64_t> rows, float* logits) {
  const int64_t hidden = c_.hidden_size;
  const int64_t n = static_cast<int64_t>(rows.size());
  EPIC_RETURN_IF_ERROR(Upload(ws_.logit_rows, std::vector<int32_t>(rows.begin(), rows.end())));
  EPIC_RETURN_IF_ERROR(Grow(ws_.selected, n * hidden));
  EPIC_RETURN_IF_ERROR(Grow(ws_.xb, n * hidden));
  EPIC_RETURN_IF_ERROR(cuda::GatherRows(ws_.logit_rows.data(), n, x, tokens_, hidden, ws_.selected.data(), hidden));
  EPIC_RETURN_IF_ERROR(cuda::RmsNorm(ws_.selected.data(), n, hidden, hidden, final_norm_.data(),
                                     static_cast<float>(c_.rms_norm_eps), ws_.selected.data(), hidden));
  EPIC_RETURN_IF_ERROR(cuda::ToBf16(ws_.selected.data(), n, hidden, hidden, ws_.xb.data(), hidden));
  return cuda::MatMul(*blas_, ws_.xb.data(), n, hidden, lm_head_, logits, vocab_);
}

}  // namespace

StatusOr<std::unique_ptr<ComputeBackend>> MakeCudaBackend(const ModelConfig& config, const ModelWeights& weights,
                                                          const RopeTable& rope, const cpu::GateParams& gate,
                                                          const ComputeShard& shard, const ProgressFn& progress) {
  EPIC_ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> b,
                        CudaBackend::Create(config, weights, rope, gate, shard, progress));
  return std::unique_ptr<ComputeBackend>(std::move(b));
}

}  // namespace epic
