#include "worker/weights.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/matmul_int8.h"

namespace epic {
namespace {

// A block of a 2-D tensor: rows [row_begin, +rows), columns [col_begin, +cols).
struct Block {
  int64_t row_begin = 0;
  int64_t rows = -1;  // -1: all
  int64_t col_begin = 0;
  int64_t cols = -1;  // -1: all
};

// What a matrix is used for: the products that may run in int8 (the fast precision), or
// anything else (the embedding's rows, the router, kv_b_proj for its per-head views).
enum class Use { kProduct, kOther };

class Binder {
 public:
  // With COUNT_ONLY nothing is copied: matrix_bytes is counted and views returned. With
  // QUANTIZE the product matrices are quantized to int8 (copied whatever the residency).
  Binder(const Checkpoint& ckpt, ModelWeights* w, WeightResidency residency, const ProgressFn& progress,
         int64_t total, bool count_only = false, bool quantize = false)
      : ckpt_(ckpt), w_(w), residency_(residency), progress_(progress), total_(total),
        count_only_(count_only), quantize_(quantize) {}

  // BLOCK's rows and columns of V.
  static int64_t RowsOf(const TensorView& v, Block block) {
    return block.rows < 0 ? v.shape[0] - block.row_begin : block.rows;
  }
  static int64_t ColsOf(const TensorView& v, Block block) {
    return block.cols < 0 ? v.shape[1] - block.col_begin : block.cols;
  }

  cpu::WeightMatrix Matrix(const std::string& name, Block block = {}, Use use = Use::kProduct) {
    const TensorView& v = ckpt_.Get(name);
    const int64_t full_cols = v.shape[1];
    cpu::WeightMatrix m;
    m.rows = RowsOf(v, block);
    m.cols = ColsOf(v, block);
    if (quantize_ && use == Use::kProduct) return Quantized(v, block, m.rows, m.cols, name);
    const bool widen = v.dtype == DType::kF16;
    m.type = v.dtype == DType::kBF16 ? cpu::WeightType::kBF16 : cpu::WeightType::kF32;
    const int64_t in_size = DTypeSize(v.dtype);
    const int64_t out_size = widen ? 4 : in_size;
    const int64_t bytes = m.rows * m.cols * out_size;
    w_->matrix_bytes += bytes;
    const std::byte* first = v.data + (block.row_begin * full_cols + block.col_begin) * in_size;
    if (count_only_ || (residency_ == WeightResidency::kMapped && !widen)) {
      if (!count_only_) views_.push_back(&v);
      m.data = first;
      m.row_stride = full_cols;
      return m;
    }
    m.row_stride = m.cols;
    auto* copy = static_cast<std::byte*>(w_->arena.Allocate(bytes));
    if (copy == nullptr) {
      failed_ = name;
      m.data = first;
      m.row_stride = full_cols;
      return m;
    }
    CopyBlock(v, block, m.rows, m.cols, copy);
    m.data = copy;
    done_ += bytes;
    if (progress_ && total_ > 0) progress_(done_, total_);
    return m;
  }

  // The block of V quantized to int8 in the arena.
  cpu::WeightMatrix Quantized(const TensorView& v, Block block, int64_t rows, int64_t cols, const std::string& name) {
    const int64_t bytes = cpu::QuantizedBytes(rows, cols);
    w_->matrix_bytes += bytes;
    cpu::WeightMatrix out;
    out.rows = rows;
    out.cols = cols;
    if (count_only_) {
      out.type = cpu::WeightType::kI8;
      return out;
    }
    void* memory = w_->arena.Allocate(bytes);
    if (memory == nullptr) {
      failed_ = name;
      return out;
    }
    std::vector<float> widened;
    out = cpu::QuantizeInt8(Source(v, block, rows, cols, &widened), memory);
    done_ += bytes;
    if (progress_ && total_ > 0) progress_(done_, total_);
    return out;
  }

  // Block A of tensor FIRST and block B of SECOND (as many columns, A's rows then B's)
  // stacked by rows in one matrix of the arena, copied or quantized as Matrix would each;
  // without data when they are not copied (mapped in place), differ in type or columns,
  // or are quantized with A's rows short of whole panels (a view of the second would not
  // start on one).
  cpu::WeightMatrix Stacked(const std::string& first, Block a_block, const std::string& second, Block b_block) {
    const TensorView& a = ckpt_.Get(first);
    const TensorView& b = ckpt_.Get(second);
    cpu::WeightMatrix m;
    const int64_t a_rows = RowsOf(a, a_block);
    const int64_t b_rows = RowsOf(b, b_block);
    const int64_t cols = ColsOf(a, a_block);
    const int64_t b_cols = ColsOf(b, b_block);
    const bool widen = a.dtype == DType::kF16;
    const bool copied = quantize_ || widen || residency_ == WeightResidency::kCopy;
    if (!copied || a.dtype != b.dtype || cols != b_cols ||
        (quantize_ && a_rows % cpu::internal::kInt8PanelRows != 0)) {
      return m;
    }
    m.rows = a_rows + b_rows;
    m.cols = cols;
    const int64_t element = widen ? 4 : DTypeSize(a.dtype);
    const int64_t bytes = quantize_ ? cpu::QuantizedBytes(m.rows, cols) : m.rows * cols * element;
    w_->matrix_bytes += bytes;
    m.type = quantize_ ? cpu::WeightType::kI8
             : a.dtype == DType::kBF16 ? cpu::WeightType::kBF16 : cpu::WeightType::kF32;
    if (count_only_) return m;
    auto* memory = static_cast<std::byte*>(w_->arena.Allocate(bytes));
    if (memory == nullptr) {
      failed_ = first;
      return cpu::WeightMatrix{};
    }
    if (quantize_) {
      const int64_t a_bytes = cpu::QuantizedPanelBytes(a_rows, cols);  // whole panels: the second's start
      auto* scales = reinterpret_cast<float*>(memory + cpu::QuantizedPanelBytes(m.rows, cols));
      std::vector<float> widened;
      const int64_t rows = m.rows;
      m = cpu::QuantizeInt8Into(Source(a, a_block, a_rows, cols, &widened), memory, scales);
      cpu::QuantizeInt8Into(Source(b, b_block, b_rows, cols, &widened), memory + a_bytes, scales + a_rows);
      m.rows = rows;
    } else {
      CopyBlock(a, a_block, a_rows, cols, memory);
      CopyBlock(b, b_block, b_rows, cols, memory + a_rows * cols * element);
      m.data = memory;
      m.row_stride = cols;
    }
    done_ += bytes;
    if (progress_ && total_ > 0) progress_(done_, total_);
    return m;
  }

  // Stacked's matrix of FIRST's block A and SECOND's block B, with *A_VIEW and *B_VIEW
  // its two parts; where they are not stacked, each bound alone (Matrix) and the matrix
  // returned without rows.
  cpu::WeightMatrix StackedPair(const std::string& first, Block a_block, const std::string& second, Block b_block,
                                cpu::WeightMatrix* a_view, cpu::WeightMatrix* b_view) {
    const cpu::WeightMatrix m = Stacked(first, a_block, second, b_block);
    if (m.rows == 0) {
      *a_view = Matrix(first, a_block);
      *b_view = Matrix(second, b_block);
      return m;
    }
    const int64_t a_rows = RowsOf(ckpt_.Get(first), a_block);
    if (m.data != nullptr) {
      *a_view = m.Rows(0, a_rows);
      *b_view = m.Rows(a_rows, m.rows - a_rows);
    } else {  // counted only
      *a_view = *b_view = m;
      a_view->rows = a_rows;
      b_view->rows = m.rows - a_rows;
    }
    return m;
  }

  // Under QUANTIZE, for each of HEADS heads the block of NAME's rows [(first + h) *
  // STRIDE, + ROWS) transposed, stacked by heads into one int8 matrix [heads * cols,
  // rows]: the absorbed form's W_UK fold as a product over the transposes' rows.
  // Without quantize, or where a head's rows would not start a panel, no matrix.
  cpu::WeightMatrix QuantizedHeadsTransposed(const std::string& name, int64_t first, int64_t heads, int64_t stride,
                                             int64_t rows) {
    const TensorView& v = ckpt_.Get(name);
    const int64_t cols = v.shape[1];
    cpu::WeightMatrix m;
    if (!quantize_ || heads <= 0 || cols % cpu::internal::kInt8PanelRows != 0) return m;
    const int64_t bytes = cpu::QuantizedBytes(heads * cols, rows);
    w_->matrix_bytes += bytes;
    m.type = cpu::WeightType::kI8;
    m.rows = heads * cols;
    m.cols = rows;
    if (count_only_) return m;
    void* memory = w_->arena.Allocate(bytes);
    if (memory == nullptr) {
      failed_ = name;
      return cpu::WeightMatrix{};
    }
    std::vector<float> transposed(static_cast<size_t>(heads * cols * rows));
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t at = ((first + h) * stride + r) * cols;
        for (int64_t c = 0; c < cols; ++c) transposed[(h * cols + c) * rows + r] = v.FloatAt(at + c);
      }
    }
    cpu::WeightMatrix source;
    source.type = cpu::WeightType::kF32;
    source.data = transposed.data();
    source.rows = heads * cols;
    source.cols = rows;
    source.row_stride = rows;
    m = cpu::QuantizeInt8(source, memory);
    done_ += bytes;
    if (progress_ && total_ > 0) progress_(done_, total_);
    return m;
  }

  // ROWS x COLS of V from BLOCK into DST, rows one after another: F16 widened to F32,
  // BF16 and F32 as they are.
  static void CopyBlock(const TensorView& v, Block block, int64_t rows, int64_t cols, std::byte* dst) {
    const int64_t full_cols = v.shape[1];
    const bool widen = v.dtype == DType::kF16;
    const int64_t in_size = DTypeSize(v.dtype);
    const int64_t out_size = widen ? 4 : in_size;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t offset = (block.row_begin + r) * full_cols + block.col_begin;
      std::byte* out = dst + r * cols * out_size;
      if (widen) {
        for (int64_t c = 0; c < cols; ++c) reinterpret_cast<float*>(out)[c] = v.FloatAt(offset + c);
      } else {
        std::memcpy(out, v.data + offset * in_size, static_cast<size_t>(cols * in_size));
      }
    }
  }

  // ROWS x COLS of V from BLOCK as a matrix QuantizeInt8 reads: in place, or widened
  // from F16 into WIDENED.
  static cpu::WeightMatrix Source(const TensorView& v, Block block, int64_t rows, int64_t cols,
                                  std::vector<float>* widened) {
    const int64_t full_cols = v.shape[1];
    cpu::WeightMatrix source;
    source.rows = rows;
    source.cols = cols;
    if (v.dtype == DType::kF16) {
      widened->resize(static_cast<size_t>(rows * cols));
      CopyBlock(v, block, rows, cols, reinterpret_cast<std::byte*>(widened->data()));
      source.type = cpu::WeightType::kF32;
      source.data = widened->data();
      source.row_stride = cols;
    } else {
      source.type = v.dtype == DType::kBF16 ? cpu::WeightType::kBF16 : cpu::WeightType::kF32;
      source.data = v.data + (block.row_begin * full_cols + block.col_begin) * DTypeSize(v.dtype);
      source.row_stride = full_cols;
    }
    return source;
  }

  // The tensor whose memory could not be allocated, if any.
  const std::string& failed() const { return failed_; }

  std::vector<float> Vector(const std::string& name) {
    const TensorView& v = ckpt_.Get(name);
    std::vector<float> out(static_cast<size_t>(v.numel()));
    v.ToFloat(out.data());
    return out;
  }

  // Part PART of PARTS of the MLP's intermediate dimension (the whole MLP by default).
  MlpWeights Mlp(int64_t layer, const std::string& module, int64_t part = 0, int64_t parts = 1) {
    const std::string gate = LayerTensor(layer, module + ".gate_proj");
    const std::string up = LayerTensor(layer, module + ".up_proj");
    const int64_t inter = ckpt_.Get(gate).shape[0];
    const int64_t begin = inter * part / parts;
    const int64_t count = inter * (part + 1) / parts - begin;
    MlpWeights m;
    m.gate_up = StackedPair(gate, {begin, count}, up, {begin, count}, &m.gate, &m.up);
    m.down = Matrix(LayerTensor(layer, module + ".down_proj"), {0, -1, begin, count});
    return m;
  }

  const std::vector<const TensorView*>& views() const { return views_; }

 private:
  const Checkpoint& ckpt_;
  ModelWeights* w_;
  WeightResidency residency_;
  ProgressFn progress_;  // a copy: callers may pass a temporary
  int64_t total_;
  bool count_only_;
  bool quantize_;
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

StatusOr<BoundExpert> BindExpert(const Checkpoint& checkpoint, int64_t layer, int32_t expert,
                                 WeightResidency residency, cpu::Precision precision) {
  const bool quantize = precision == cpu::Precision::kFast;
  const std::string module = "mlp.experts." + std::to_string(expert);
  for (const char* part : {".gate_proj", ".up_proj", ".down_proj"}) {
    if (checkpoint.Find(LayerTensor(layer, module + part)) == nullptr) {
      return NotFoundError("checkpoint has no " + LayerTensor(layer, module + part));
    }
  }
  // An arena of exactly this expert's size (counted as Bind counts), shared by its three matrices.
  ModelWeights counted;
  Binder counter(checkpoint, &counted, residency, {}, 0, /*count_only=*/true, quantize);
  counter.Mlp(layer, module);
  auto holder = std::make_shared<ModelWeights>();
  holder->arena.set_chunk_bytes(counted.matrix_bytes + 3 * 64);
  Binder b(checkpoint, holder.get(), residency, {}, 0, false, quantize);
  BoundExpert out;
  out.weights = b.Mlp(layer, module);
  if (!b.failed().empty()) {
    return ResourceExhaustedError("cannot allocate memory for expert " + std::to_string(expert) + " of layer " +
                                  std::to_string(layer));
  }
  out.bytes = holder->matrix_bytes;
  if (residency == WeightResidency::kCopy || quantize) {
    out.memory = std::shared_ptr<Arena>(holder, &holder->arena);
  }
  return out;
}

void ReleaseExpertPages(const MlpWeights& w) {
  constexpr uintptr_t kPage = 4096;
  const std::vector<const cpu::WeightMatrix*> parts =
      w.gate_up.data != nullptr ? std::vector{&w.gate_up, &w.down} : std::vector{&w.gate, &w.up, &w.down};
  for (const cpu::WeightMatrix* m : parts) {
    const auto begin = reinterpret_cast<uintptr_t>(m->data);
    const auto end = begin + static_cast<uintptr_t>(m->Bytes());
    const uintptr_t first = (begin + kPage - 1) / kPage * kPage;
    const uintptr_t last = end / kPage * kPage;
    if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
  }
}

StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Bind(const Checkpoint& checkpoint,
                                                           const ProgressFn& progress,
                                                           WeightResidency residency,
                                                           const WeightShard& shard,
                                                           cpu::Precision precision) {
  const bool quantize = precision == cpu::Precision::kFast;
  const ModelConfig& c = checkpoint.config();
  auto w = std::make_unique<ModelWeights>();
  const int64_t h0 = shard.head_begin;
  const int64_t h1 = shard.head_end < 0 ? c.num_attention_heads : shard.head_end;
  const int64_t v0 = shard.vocab_begin;
  const int64_t v1 = shard.vocab_end < 0 ? c.vocab_size : shard.vocab_end;
  const int64_t qhd = c.q_head_dim();
  const int64_t kv_head = c.qk_nope_head_dim + c.v_head_dim;
  auto experts_of = [&](int64_t l) {
    if (static_cast<size_t>(l) < shard.expert_slots.size()) return shard.expert_slots[l];
    std::vector<int32_t> all(static_cast<size_t>(c.n_routed_experts));
    for (int64_t e = 0; e < c.n_routed_experts; ++e) all[e] = static_cast<int32_t>(e);
    return all;
  };
  // Binds everything through B; run twice: first counting the bytes this rank will
  // hold (for progress), then for real.
  auto bind_all = [&](Binder& b, ModelWeights* out) {
    out->embed = b.Matrix("model.embed_tokens.weight", {}, Use::kOther);
    out->layers.resize(static_cast<size_t>(c.num_hidden_layers));
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      LayerWeights& L = out->layers[l];
      L.input_norm = b.Vector(LayerTensor(l, "input_layernorm"));
      L.post_attention_norm = b.Vector(LayerTensor(l, "post_attention_layernorm"));
      const Block q_rows{h0 * qhd, (h1 - h0) * qhd};
      const std::string kv_a = LayerTensor(l, "self_attn.kv_a_proj_with_mqa");
      if (c.q_lora_rank > 0) {
        const std::string q_a = LayerTensor(l, "self_attn.q_a_proj");
        L.q_a_kv_a = b.StackedPair(q_a, {}, kv_a, {}, &L.q_a_proj, &L.kv_a_proj);
        L.q_a_norm = b.Vector(LayerTensor(l, "self_attn.q_a_layernorm"));
        L.q_b_proj = b.Matrix(LayerTensor(l, "self_attn.q_b_proj"), q_rows);
      } else {
        L.q_proj = b.Matrix(LayerTensor(l, "self_attn.q_proj"), q_rows);
        L.kv_a_proj = b.Matrix(kv_a);
      }
      L.kv_a_norm = b.Vector(LayerTensor(l, "self_attn.kv_a_layernorm"));
      const Block kv_b_rows{h0 * kv_head, (h1 - h0) * kv_head};
      L.kv_b_proj = b.Matrix(LayerTensor(l, "self_attn.kv_b_proj"), kv_b_rows, Use::kOther);
      L.kv_b_expand = quantize ? b.Matrix(LayerTensor(l, "self_attn.kv_b_proj"), kv_b_rows) : L.kv_b_proj;
      L.kv_b_uk =
          b.QuantizedHeadsTransposed(LayerTensor(l, "self_attn.kv_b_proj"), h0, h1 - h0, kv_head, c.qk_nope_head_dim);
      L.o_proj = b.Matrix(LayerTensor(l, "self_attn.o_proj"),
                          {0, -1, h0 * c.v_head_dim, (h1 - h0) * c.v_head_dim});
      L.moe = c.IsMoeLayer(l);
      if (!L.moe) {
        L.dense = b.Mlp(l, "mlp", shard.mlp_part, shard.mlp_parts);
        continue;
      }
      // The router stays exact: a small matrix whose rounding would move tokens between experts.
      L.router = b.Matrix(LayerTensor(l, "mlp.gate"), {}, Use::kOther);
      if (c.topk_method == TopkMethod::kNoauxTc) {
        L.choice_bias = b.Vector("model.layers." + std::to_string(l) + ".mlp.gate.e_score_correction_bias");
      }
      for (int32_t e : experts_of(l)) {
        L.experts.push_back(b.Mlp(l, "mlp.experts." + std::to_string(e)));
      }
      L.has_shared = c.n_shared_experts > 0;
      if (L.has_shared) L.shared = b.Mlp(l, "mlp.shared_experts", shard.mlp_part, shard.mlp_parts);
    }
    out->final_norm = b.Vector("model.norm.weight");
    if (c.tie_word_embeddings && quantize) {
      out->lm_head = b.Matrix("model.embed_tokens.weight", {v0, v1 - v0});
    } else if (c.tie_word_embeddings) {
      out->lm_head = out->embed.Rows(v0, v1 - v0);
    } else {
      out->lm_head = b.Matrix("lm_head.weight", {v0, v1 - v0});
    }
  };
  ModelWeights counted;
  Binder counter(checkpoint, &counted, residency, {}, 0, /*count_only=*/true, quantize);
  bind_all(counter, &counted);
  Binder b(checkpoint, w.get(), residency, progress, counted.matrix_bytes, false, quantize);
  bind_all(b, w.get());
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
