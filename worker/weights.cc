#include "worker/weights.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>


namespace epic {
namespace {

// The 2-D tensors of CONFIG: what Binder::Matrix will be asked for.
int64_t MatrixBytes(const Checkpoint& ckpt) {
  int64_t total = 0;
  for (const ExpectedTensor& e : ExpectedTensors(ckpt.config())) {
    if (e.shape.size() != 2) continue;
    const TensorView& v = ckpt.Get(e.name);
    total += v.dtype == DType::kF16 ? 2 * v.nbytes : v.nbytes;
  }
  return total;
}

class Binder {
 public:
  Binder(const Checkpoint& ckpt, ModelWeights* w, WeightResidency residency, const ProgressFn& progress)
      : ckpt_(ckpt), w_(w), residency_(residency), progress_(progress),
        total_(residency == WeightResidency::kCopy ? MatrixBytes(ckpt) : 0) {}

  cpu::WeightMatrix Matrix(const std::string& name) {
    const TensorView& v = ckpt_.Get(name);
    cpu::WeightMatrix m;
    m.rows = v.shape[0];
    m.cols = v.shape[1];
    m.row_stride = m.cols;
    const bool widen = v.dtype == DType::kF16;
    m.type = v.dtype == DType::kBF16 ? cpu::WeightType::kBF16 : cpu::WeightType::kF32;
    const int64_t bytes = widen ? 2 * v.nbytes : v.nbytes;
    w_->matrix_bytes += bytes;
    if (residency_ == WeightResidency::kMapped && !widen) {
      views_.push_back(&v);
      m.data = v.data;
      return m;
    }
    void* copy = w_->arena.Allocate(bytes);
    if (copy == nullptr) {
      failed_ = name;
      m.data = v.data;
      return m;
    }
    if (widen) {
      v.ToFloat(static_cast<float*>(copy));
    } else {
      std::memcpy(copy, v.data, static_cast<size_t>(bytes));
    }
    m.data = copy;
    done_ += bytes;
    if (progress_ && total_ > 0) progress_(done_, total_);
    return m;
  }

  // The tensor whose memory could not be allocated, if any.
  const std::string& failed() const { return failed_; }

  std::vector<float> Vector(const std::string& name) {
    const TensorView& v = ckpt_.Get(name);
    std::vector<float> out(static_cast<size_t>(v.numel()));
    v.ToFloat(out.data());
    return out;
  }

  MlpWeights Mlp(int64_t layer, const std::string& module) {
    return {Matrix(LayerTensor(layer, module + ".gate_proj")),
            Matrix(LayerTensor(layer, module + ".up_proj")),
            Matrix(LayerTensor(layer, module + ".down_proj"))};
  }

  const std::vector<const TensorView*>& views() const { return views_; }

 private:
  const Checkpoint& ckpt_;
  ModelWeights* w_;
  WeightResidency residency_;
  const ProgressFn& progress_;
  int64_t total_;
  int64_t done_ = 0;
  std::string failed_;
  std::vector<const TensorView*> views_;
};

// Reads one byte of every page of the mapped matrices: the checkpoint comes off the
// disk here, with progress, rather than during the first step.
void TouchPages(const std::vector<const TensorView*>& views, const ProgressFn& progress) {
  int64_t total = 0;
  for (const TensorView* v : views) total += v->nbytes;
  int64_t done = 0;
  volatile unsigned char sink = 0;
  constexpr int64_t kPage = 4096;
  for (const TensorView* v : views) {
    const auto* p = reinterpret_cast<const unsigned char*>(v->data);
    unsigned char acc = 0;
#pragma omp parallel for reduction(^ : acc) schedule(static)
    for (int64_t off = 0; off < v->nbytes; off += kPage) acc ^= p[off];
    sink = sink ^ acc;
    done += v->nbytes;
    if (progress) progress(done, total);
  }
  (void)sink;
}

}  // namespace

WeightArena::~WeightArena() {
  for (const Chunk& c : chunks_) ::munmap(c.base, static_cast<size_t>(c.size));
}

void* WeightArena::Allocate(int64_t bytes) {
  constexpr int64_t kHugePage = 2 << 20;
  constexpr int64_t kChunk = 1ll << 30;
  bytes = (bytes + 63) / 64 * 64;
  if (bytes > left_) {
    const int64_t size = std::max(kChunk, (bytes + kHugePage - 1) / kHugePage * kHugePage);
    // One huge page more than needed, so the usable part can start on a 2 MiB boundary.
    void* base = ::mmap(nullptr, static_cast<size_t>(size + kHugePage), PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    chunks_.push_back({base, size + kHugePage});
    const auto addr = reinterpret_cast<uintptr_t>(base);
    next_ = reinterpret_cast<char*>((addr + kHugePage - 1) / kHugePage * kHugePage);
    left_ = size;
    ::madvise(next_, static_cast<size_t>(size), MADV_HUGEPAGE);  // advice: fine if refused
  }
  void* p = next_;
  next_ += bytes;
  left_ -= bytes;
  return p;
}

StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Bind(const Checkpoint& checkpoint,
                                                           const ProgressFn& progress,
                                                           WeightResidency residency) {
  const ModelConfig& c = checkpoint.config();
  auto w = std::make_unique<ModelWeights>();
  Binder b(checkpoint, w.get(), residency, progress);
  w->embed = b.Matrix("model.embed_tokens.weight");
  w->layers.resize(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights& L = w->layers[l];
    L.input_norm = b.Vector(LayerTensor(l, "input_layernorm"));
    L.post_attention_norm = b.Vector(LayerTensor(l, "post_attention_layernorm"));
    if (c.q_lora_rank > 0) {
      L.q_a_proj = b.Matrix(LayerTensor(l, "self_attn.q_a_proj"));
      L.q_a_norm = b.Vector(LayerTensor(l, "self_attn.q_a_layernorm"));
      L.q_b_proj = b.Matrix(LayerTensor(l, "self_attn.q_b_proj"));
    } else {
      L.q_proj = b.Matrix(LayerTensor(l, "self_attn.q_proj"));
    }
    L.kv_a_proj = b.Matrix(LayerTensor(l, "self_attn.kv_a_proj_with_mqa"));
    L.kv_a_norm = b.Vector(LayerTensor(l, "self_attn.kv_a_layernorm"));
    L.kv_b_proj = b.Matrix(LayerTensor(l, "self_attn.kv_b_proj"));
    L.o_proj = b.Matrix(LayerTensor(l, "self_attn.o_proj"));
    L.moe = c.IsMoeLayer(l);
    if (!L.moe) {
      L.dense = b.Mlp(l, "mlp");
      continue;
    }
    L.router = b.Matrix(LayerTensor(l, "mlp.gate"));
    if (c.topk_method == TopkMethod::kNoauxTc) {
      L.choice_bias = b.Vector("model.layers." + std::to_string(l) + ".mlp.gate.e_score_correction_bias");
    }
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      L.experts.push_back(b.Mlp(l, "mlp.experts." + std::to_string(e)));
    }
    L.has_shared = c.n_shared_experts > 0;
    if (L.has_shared) L.shared = b.Mlp(l, "mlp.shared_experts");
  }
  w->final_norm = b.Vector("model.norm.weight");
  w->lm_head = c.tie_word_embeddings ? w->embed : b.Matrix("lm_head.weight");
  if (!b.failed().empty()) {
    return ResourceExhaustedError("cannot allocate memory for the weights (at tensor '" + b.failed() +
                                  "', " + std::to_string(w->matrix_bytes >> 20) +
                                  " MiB in all); free memory or load with the weights mapped in place");
  }
  if (residency == WeightResidency::kCopy) {
    checkpoint.ReleaseResidentPages();
  } else {
    TouchPages(b.views(), progress);
  }
  return w;
}

}  // namespace epic
