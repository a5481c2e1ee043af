// Both forms as matrix products, so that the GEMM kernels (matmul.h)
// do the arithmetic in register blocks instead of one dot product per key:
//  - absorbed (decode): each query's context is split over the threads (FlashDecoding's
//    way); a split's scores for all heads at once are one product over its cached rows
//    (each row read once, the heads as the product's columns), its softmax share and
//    outputs another; the splits' shares are combined after. Runs of blocks that lie
//    one after another in the pool (a fresh cache's blocks mostly do) are read in place;
//    over BF16 rows (the fast precision's cache) queries and probabilities are rounded
//    to BF16 too, and the products are MatMulBf16Rows and MatMulNoTransBf16 (vdpbf16ps),
//    or F32 ones of the rows widened where the host has no AVX512_BF16;
//  - expanded (prefill): each head's keys and values (transposed) are gathered and
//    packed for the GEMM's micro-kernel once (MatMulPackedF32); per head and chunk of
//    64 queries, scores and outputs are two products over the prefix the chunk sees
//    (scores only up to its own last key); with BF16 operands (the fast precision on
//    some hosts) keys and values are gathered rounded to BF16 and packed for those
//    products, chunks are of 128, and each chunk walks its keys a block of 512 at a
//    time with an online softmax (BlockedBf16Head).
// Work items are spread over the threads; the products inside run on one thread each
// (on all of them when there is one item).
#include "kernels/cpu/mla_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/half.h"
#include "common/scratch_buffer.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/intrinsics.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/matmul_fast.h"
#include "kernels/cpu/matmul_internal.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"

namespace epic::cpu {
namespace {

// Decode splits each query's context into shares of about kSplitRows rows (their scores'
// and values' products in L2), or as many as take kSplitBytes where rows are narrow (a
// BF16 cache of small experts' 288 values: 512 rows, each split's fixed costs paid half
// as often; one sequence after 540 tokens, its rows cold, 0.92-0.93x, after 1024 0.97x,
// Zen 4), at least kMinSplitRows, at most kMaxSplits of them.
constexpr int64_t kSplitRows = 256;
constexpr int64_t kSplitBytes = 288 * 1024;
constexpr int64_t kMinSplitRows = 32;
constexpr int64_t kMaxSplits = 256;
constexpr int64_t kQueryChunk = 64;  // queries of one head sharing a pass over its keys
// With BF16 operands, chunks of 128 (v2-small-experts fast, 4096 tokens, measured while
// each product still packed its keys and values: 64 3.56-3.66 s, 128 3.25 s, 256
// 3.35-3.54 s; F32 measured no change at 128).
constexpr int64_t kQueryChunkBf16 = 128;
// Keys a block of the BF16 form's online softmax (a multiple of 32, the products'
// column blocks): a chunk's block of scores, 128 x 512 floats, stays in L2.
constexpr int64_t kKeyBlock = 512;

enum Slot { kKeys, kQueries, kScores, kProbs, kProbsBf16, kPartial, kPackedQueries, kWidened, kRopeBf16, kSlots };
float* Scratch(Slot slot, int64_t floats) {
  thread_local ScratchBuffer buffers[kSlots];
  return static_cast<float*>(buffers[slot].Get(floats * static_cast<int64_t>(sizeof(float))));
}

WeightMatrix F32Matrix(const float* data, int64_t rows, int64_t cols, int64_t stride) {
  WeightMatrix w;
  w.type = WeightType::kF32;
  w.data = data;
  w.rows = rows;
  w.cols = cols;
  w.row_stride = stride;
  return w;
}

// Row I of SCORES (LD wide): scaled, softmax over its first VALID entries, zero after.
void SoftmaxRow(float* row, int64_t valid, int64_t width, float scale) {
  for (int64_t t = 0; t < valid; ++t) row[t] *= scale;
  Softmax(row, valid);
  std::fill(row + valid, row + width, 0.0f);
}

}  // namespace

void MlaAbsorbedAttention(const MlaAbsorbedParams& p) {
  const int64_t lora = p.kv_lora_rank;
  const int64_t width = lora + p.rope_dim;
  const int64_t heads = p.num_heads;
  // Each query's context in splits of at most about split_rows rows (read once from
  // memory for the scores, again from L2 for the values), as many for each thread (3
  // splits of 513 rows kept one of 2 threads waiting a third of the time).
  const int threads = InTeam() ? 1 : omp_get_max_threads();
  const int64_t longest = p.start + p.num_queries;
  const int64_t row_bytes = width * static_cast<int64_t>(p.cache.type == WeightType::kBF16 ? 2 : 4);
  const int64_t split_rows = std::max(kSplitRows, kSplitBytes / row_bytes);
  const int64_t per_thread = (longest + split_rows * threads - 1) / (split_rows * threads);
  const int64_t splits =
      std::clamp<int64_t>(std::min<int64_t>(per_thread * threads, longest / kMinSplitRows), 1, kMaxSplits);
  const int64_t items = p.num_queries * splits;
  // Item W's outputs [heads, lora], unnormalised, then its maxima and sums [heads].
  const int64_t item_floats = heads * (lora + 2);
  float* partial = Scratch(kPartial, items * item_floats);
  auto outputs = [&](int64_t w) { return partial + w * item_floats; };
  auto maxima = [&](int64_t w) { return outputs(w) + heads * lora; };
  auto sums = [&](int64_t w) { return maxima(w) + heads; };
  // A BF16 cache (the fast precision's) takes the queries rounded to BF16 too: with
  // AVX512_BF16 the scores are BF16 products of the rows in place, the queries packed in
  // panels of 16 heads; elsewhere each split's rows are widened to F32 first. Otherwise
  // the queries as columns: per query, [q_latent | q_pe] rows by heads.
  const bool bf16 = p.cache.type == WeightType::kBF16;
  const bool dot = bf16 && Has(Isa::kAvx512Bf16) && width % 2 == 0;
  float* queries = dot ? nullptr : Scratch(kQueries, p.num_queries * width * heads);
  const int64_t packed_elements = Bf16Panels::Elements(heads, width);
  auto* packed = dot ? reinterpret_cast<uint16_t*>(Scratch(kPackedQueries, (p.num_queries * packed_elements + 1) / 2))
                     : nullptr;
  // Each head's [q_latent | q_pe] packed from where they are, q_pe rounded first (no
  // copy of the rows put together: B=64 over 32-64 tokens 0.92-0.94x, Zen 4).
  if (dot) {
    auto* rope = reinterpret_cast<uint16_t*>(Scratch(kRopeBf16, (p.num_queries * heads * p.rope_dim + 1) / 2));
    RoundToBf16(p.q_pe, p.num_queries * heads * p.rope_dim, rope);
    for (int64_t i = 0; i < p.num_queries; ++i) {
      PackBf16PanelsJoined(p.q_latent + i * heads * lora, lora, lora, rope + i * heads * p.rope_dim, p.rope_dim,
                           p.rope_dim, heads, packed + i * packed_elements);
    }
  } else {
    for (int64_t i = 0; i < p.num_queries; ++i) {
      float* qi = queries + i * width * heads;
      for (int64_t h = 0; h < heads; ++h) {
        const float* ql = p.q_latent + (i * heads + h) * lora;
        const float* qp = p.q_pe + (i * heads + h) * p.rope_dim;
        auto value = [&](float v) { return bf16 ? Bf16ToFloat(FloatToBf16(v)) : v; };
        for (int64_t k = 0; k < lora; ++k) qi[k * heads + h] = value(ql[k]);
        for (int64_t k = 0; k < p.rope_dim; ++k) qi[(lora + k) * heads + h] = value(qp[k]);
      }
    }
  }
  ParallelFor(items, true, [&](int64_t w) {
    const int64_t i = w / splits;
    // One split (a batch's short contexts): its outputs in place, normalised below.
    float* out = splits == 1 ? p.out_latent + i * heads * lora : outputs(w);
    int64_t t0, t1;
    internal::SplitRange(p.start + i + 1, static_cast<int>(splits), static_cast<int>(w % splits), &t0, &t1);
    const int64_t n = t1 - t0;
    if (n == 0) {
      std::fill(out, out + heads * lora, 0.0f);
      std::fill(maxima(w), maxima(w) + 2 * heads, 0.0f);
      return;
    }
    // Scores [n, heads] (a row per cached row), probabilities [heads, ld]: rows a power
    // of two apart put the scatter of every row's 16 lanes into one set of L1 (2048 rows:
    // the softmax took 15x its time at 512).
    float* scores = Scratch(kScores, n * heads);
    const int64_t ld = (n + 15) / 16 * 16 + 16;
    float* probs = Scratch(kProbs, heads * ld);
    float* widened = nullptr;
    if (bf16 && !dot) {
      widened = Scratch(kWidened, n * width);
      for (int64_t t = t0; t < t1; ++t) p.cache.Widen(t, 0, width, widened + (t - t0) * width);
    }
    // Rows [t, t + run) lie one after another in the pool (or in WIDENED).
    auto next_run = [&](int64_t t) {
      if (widened != nullptr) return t1 - t;
      const int64_t bs = p.cache.block_size;
      int64_t end = std::min((t / bs + 1) * bs, t1);
      while (end < t1 && p.cache.block_table[end / bs] == p.cache.block_table[end / bs - 1] + 1) {
        end = std::min(end + bs, t1);
      }
      return end - t;
    };
    auto rows = [&](int64_t t, int64_t run, int64_t cols) {
      return widened != nullptr ? F32Matrix(widened + (t - t0) * width, run, cols, width)
                                : p.cache.Matrix(t, run, cols);
    };
    for (int64_t t = t0, run; t < t1; t += run) {
      run = next_run(t);
      const WeightMatrix block = rows(t, run, width);
      if (dot) {
        MatMulBf16Rows(static_cast<const uint16_t*>(block.data), run, block.row_stride,
                       {packed + i * packed_elements, Bf16Panels::Kp(width)}, heads, width, scores + (t - t0) * heads,
                       heads);
      } else {
        MatMulNoTrans(static_cast<const float*>(block.data), run, block.row_stride,
                      F32Matrix(queries + i * width * heads, width, heads, heads),
                      scores + (t - t0) * heads, heads);
      }
    }
    ExpColumns(scores, n, heads, heads, p.scale, probs, ld, maxima(w), sums(w));
    // Over BF16 rows the probabilities are rounded to BF16 too: pairs of rows' products
    // by vdpbf16ps, or the rounded values widened again.
    uint16_t* rounded = nullptr;
    if (bf16) {
      rounded = reinterpret_cast<uint16_t*>(Scratch(kProbsBf16, (heads * ld + 1) / 2));
      for (int64_t h = 0; h < heads; ++h) {
        RoundToBf16(probs + h * ld, n, rounded + h * ld);
        rounded[h * ld + n] = 0;  // paired with no row when n is odd (ld > n)
        if (!dot) {
          for (int64_t t = 0; t < n; ++t) probs[h * ld + t] = Bf16ToFloat(rounded[h * ld + t]);
        }
      }
    }
    for (int64_t t = t0, run; t < t1; t += run) {
      run = next_run(t);
      const WeightMatrix block = rows(t, run, lora);
      if (dot) {
        MatMulNoTransBf16(rounded + (t - t0), ld, heads, static_cast<const uint16_t*>(block.data), run,
                          block.row_stride, lora, out, lora, /*accumulate=*/t > t0);
      } else {
        MatMulNoTrans(probs + (t - t0), heads, ld, block, out, lora, /*accumulate=*/t > t0);
      }
    }
  });
  // Each query's splits combined: out = sum_s e^(max_s - M) out_s / sum_s e^(max_s - M) sum_s.
  // With one split, its outputs over its sum (the same product as the combine's).
  if (splits == 1) {
    for (int64_t i = 0; i < p.num_queries; ++i) {
      for (int64_t h = 0; h < heads; ++h) {
        const float sum = sums(i)[h];
        const float inv = sum > 0.0f ? static_cast<float>(1.0 / static_cast<double>(sum)) : 0.0f;
        Scale(inv, p.out_latent + (i * heads + h) * lora, lora);
      }
    }
    return;
  }
  for (int64_t i = 0; i < p.num_queries; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      float top = -INFINITY;
      for (int64_t w = i * splits; w < (i + 1) * splits; ++w) {
        if (sums(w)[h] > 0.0f) top = std::max(top, maxima(w)[h]);
      }
      double total = 0.0;
      float weights[kMaxSplits];
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t w = i * splits + s;
        weights[s] = sums(w)[h] > 0.0f ? std::exp(maxima(w)[h] - top) : 0.0f;
        total += static_cast<double>(weights[s]) * sums(w)[h];
      }
      float* out = p.out_latent + (i * heads + h) * lora;
      const float inv = static_cast<float>(1.0 / total);
      // The splits that saw rows, in order, in one pass (B=1 after 540 tokens 0.98x).
      const float* rows[kMaxSplits];
      float scaled[kMaxSplits];
      size_t count = 0;
      for (int64_t s = 0; s < splits; ++s) {
        if (weights[s] > 0.0f) {
          rows[count] = outputs(i * splits + s) + h * lora;
          scaled[count++] = weights[s] * inv;
        }
      }
      WeightedSum({rows, count}, scaled, lora, out);
    }
  }
}

void PrefetchAbsorbed(const MlaAbsorbedParams& p) {
  if (p.cache.type != WeightType::kBF16) return;
  constexpr int64_t kLine = 64;
  auto lines = [](const void* at, int64_t bytes) {
    const char* c = static_cast<const char*>(at);
    for (int64_t b = 0; b < bytes; b += kLine) _mm_prefetch(c + b, _MM_HINT_T1);
  };
  const int64_t heads = p.num_heads;
  lines(p.q_latent, p.num_queries * heads * p.kv_lora_rank * static_cast<int64_t>(sizeof(float)));
  lines(p.q_pe, p.num_queries * heads * p.rope_dim * static_cast<int64_t>(sizeof(float)));
  const int64_t row_bytes = p.cache.row_stride * static_cast<int64_t>(sizeof(uint16_t));
  const int64_t rows = p.start + p.num_queries;
  for (int64_t t = 0; t < rows; t += p.cache.block_size) {
    lines(p.cache.Row(t), std::min(p.cache.block_size, rows - t) * row_bytes);
  }
}

void LatentRows::Widen(int64_t t, int64_t begin, int64_t count, float* out) const {
  if (type == WeightType::kBF16) {
    const uint16_t* row = static_cast<const uint16_t*>(Row(t)) + begin;
    for (int64_t c = 0; c < count; ++c) out[c] = Bf16ToFloat(row[c]);
  } else {
    std::memcpy(out, static_cast<const float*>(Row(t)) + begin, static_cast<size_t>(count) * sizeof(float));
  }
}

// Head H's keys [context, qk] and its values transposed [v_dim, context] (F32), 16
// context rows at a time.
void GatherHead(const MlaExpandedParams& p, int64_t h, float* keys, float* values) {
  const int64_t qk = p.nope_dim + p.rope_dim;
  const int64_t head_width = p.nope_dim + p.v_dim;
  const int64_t kv_width = p.num_heads * head_width;
  const int64_t context = p.start + p.num_queries;
  constexpr int64_t kRows = 16;
  for (int64_t t0 = 0; t0 < context; t0 += kRows) {
    const int64_t t1 = std::min(context, t0 + kRows);
    for (int64_t t = t0; t < t1; ++t) {
      const float* kv = p.kv + t * kv_width + h * head_width;
      std::memcpy(keys + t * qk, kv, static_cast<size_t>(p.nope_dim) * sizeof(float));
      std::memcpy(keys + t * qk + p.nope_dim, p.k_pe + t * p.rope_dim, static_cast<size_t>(p.rope_dim) * sizeof(float));
    }
    for (int64_t d = 0; d < p.v_dim; ++d) {
      for (int64_t t = t0; t < t1; ++t) values[d * context + t] = p.kv[t * kv_width + h * head_width + p.nope_dim + d];
    }
  }
}

// One head's outputs for N queries (the first at position FIRST) from its keys and
// values packed as BF16 panels (keys: a panel row per context row; values transposed,
// a panel row per value dimension), a block of kKeyBlock keys at a time: the block's
// scores, their online softmax (OnlineSoftmaxRowBf16, written rounded as the values'
// product takes them), and its outputs added into the
// running ones after those are rescaled to the new maxima; divided by the sums at the
// end. Scores and probabilities stay in L2 (all of a chunk's scores at once, 128 x 4096
// floats, did not: 4096-token prefill's attention ran at two thirds of its products'
// rate). The exponentials are rounded to BF16 for the values' product before the
// division: the same rounding of each as before, on values not yet normalised.
void BlockedBf16Head(const MlaExpandedParams& p, const float* q, int64_t q_stride, int64_t n, int64_t first,
                     const uint16_t* keys, const uint16_t* values, float* out, int64_t out_stride) {
  const int64_t qk = p.nope_dim + p.rope_dim;
  const int64_t key_kp = Bf16Panels::Kp(qk);
  const int64_t value_kp = Bf16Panels::Kp(p.start + p.num_queries);
  const int64_t seen = first + n;  // the last query's context
  const int64_t rows = Bf16Rows(n);
  float* scores = Scratch(kScores, n * kKeyBlock);
  // The queries rounded once for all blocks; the probabilities written rounded by the
  // softmax (with rows past N zero).
  auto* queries = reinterpret_cast<uint16_t*>(Scratch(kPackedQueries, (rows * key_kp + 1) / 2));
  RoundRowsToBf16(q, n, q_stride, qk, queries);
  const int64_t probs_kp = Bf16Panels::Kp(std::min(kKeyBlock, seen));
  auto* probs = reinterpret_cast<uint16_t*>(Scratch(kProbsBf16, (rows * probs_kp + 1) / 2));
  float* sums_out = Scratch(kPartial, n * p.v_dim);  // the blocks' outputs so far
  float* block_out = Scratch(kProbs, n * p.v_dim);
  // Each query's running maximum and factor, then its running sum (a double).
  float* maxima = Scratch(kWidened, 4 * n);
  float* alphas = maxima + n;
  auto* sums = reinterpret_cast<double*>(alphas + n);
  std::fill(maxima, maxima + n, -INFINITY);
  std::fill(sums, sums + n, 0.0);
  for (int64_t k0 = 0; k0 < seen; k0 += kKeyBlock) {
    const int64_t kb = std::min(kKeyBlock, seen - k0);
    // Keys [k0, k0 + kb) start at panel k0 / 16; the values' columns [k0, k0 + kb) at
    // pair k0 / 2 of each panel. Past KB the products meet the probabilities' zeros.
    MatMulBf16PanelsRounded(queries, n, {keys + k0 * key_kp, key_kp}, kb, qk, scores, kb,
                            {Causal::kColumns, first - k0});
    const int64_t kp = Bf16Panels::Kp(kb);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t valid = std::clamp<int64_t>(first + i + 1 - k0, 0, kb);
      alphas[i] = OnlineSoftmaxRowBf16(scores + i * kb, valid, kp, p.scale, maxima + i, sums + i, probs + i * kp);
    }
    std::fill(probs + n * kp, probs + rows * kp, uint16_t{0});
    float* target = k0 == 0 ? sums_out : block_out;
    MatMulBf16PanelsRounded(probs, n, {values + k0 * 16, value_kp}, p.v_dim, kb, target, p.v_dim,
                            {Causal::kK, first - k0});
    if (k0 == 0) continue;
    for (int64_t i = 0; i < n; ++i) {
      float* o = sums_out + i * p.v_dim;
      const float* b = block_out + i * p.v_dim;
      for (int64_t d = 0; d < p.v_dim; ++d) o[d] = o[d] * alphas[i] + b[d];
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const float inv = static_cast<float>(1.0 / sums[i]);
    for (int64_t d = 0; d < p.v_dim; ++d) out[i * out_stride + d] = sums_out[i * p.v_dim + d] * inv;
  }
}

void MlaExpandedAttention(const MlaExpandedParams& p) {
  const int64_t qk = p.nope_dim + p.rope_dim;
  const int64_t context = p.start + p.num_queries;
  // Every head's keys and values, gathered once for all its chunks, each of which reads
  // a prefix (gathered per chunk, the copies grew with the square of the prompt). In the
  // calling thread's scratch, shared with the team.
  const int64_t key_elements = p.bf16 ? Bf16Panels::Elements(context, qk) : PackedF32Floats(context, qk);
  const int64_t per_head =
      key_elements + (p.bf16 ? Bf16Panels::Elements(p.v_dim, context) : PackedF32Floats(p.v_dim, context));
  const int64_t element_bytes = p.bf16 ? 2 : 4;
  char* gathered = reinterpret_cast<char*>(Scratch(kKeys, (p.num_heads * per_head * element_bytes + 3) / 4));
  auto keys_at = [&](int64_t h) { return gathered + h * per_head * element_bytes; };
  auto values_at = [&](int64_t h) { return keys_at(h) + key_elements * element_bytes; };
  // Under BF16 the rope part of the keys, which every head shares, rounded once for all.
  uint16_t* k_pe = nullptr;
  if (p.bf16) {
    k_pe = reinterpret_cast<uint16_t*>(Scratch(kRopeBf16, (context * p.rope_dim + 1) / 2));
    RoundToBf16(p.k_pe, context * p.rope_dim, k_pe);
  }
  ParallelFor(p.num_heads, true, [&](int64_t h) {
    const int64_t kv_width = p.num_heads * (p.nope_dim + p.v_dim);
    const float* head = p.kv + h * (p.nope_dim + p.v_dim);
    if (p.bf16) {
      // Packed from their rows in place: the keys' k_nope beside the rounded k_pe, the
      // values' pairs of rows interleaved.
      PackBf16PanelsJoined(head, kv_width, p.nope_dim, k_pe, p.rope_dim, p.rope_dim, context,
                           reinterpret_cast<uint16_t*>(keys_at(h)));
      PackBf16PanelsTransposed(head + p.nope_dim, context, p.v_dim, kv_width,
                               reinterpret_cast<uint16_t*>(values_at(h)));
      return;
    }
    float* keys = Scratch(kQueries, context * qk);  // this thread's, until packed
    float* values = Scratch(kScores, p.v_dim * context);
    GatherHead(p, h, keys, values);
    PackF32(keys, context, qk, qk, reinterpret_cast<float*>(keys_at(h)));
    PackF32(values, p.v_dim, context, context, reinterpret_cast<float*>(values_at(h)));
  });
  const int64_t chunk = p.bf16 ? kQueryChunkBf16 : kQueryChunk;
  const int64_t chunks = (p.num_queries + chunk - 1) / chunk;
  const int64_t work = chunks * p.num_heads;
  // Later chunks see more context: dynamic, largest first.
  ParallelFor(work, true, [&](int64_t w) {
    const int64_t c = chunks - 1 - w / p.num_heads;
    const int64_t h = w % p.num_heads;
    const int64_t i0 = c * chunk;
    const int64_t n = std::min(chunk, p.num_queries - i0);
    const int64_t seen = p.start + i0 + n;  // this chunk's context
    float* scores = Scratch(kScores, n * seen);
    const float* q = p.q + (i0 * p.num_heads + h) * qk;
    const int64_t q_stride = p.num_heads * qk;
    float* out = p.out + (i0 * p.num_heads + h) * p.v_dim;
    const int64_t out_stride = p.num_heads * p.v_dim;
    if (p.bf16) {
      BlockedBf16Head(p, q, q_stride, n, p.start + i0, reinterpret_cast<const uint16_t*>(keys_at(h)),
                      reinterpret_cast<const uint16_t*>(values_at(h)), out, out_stride);
      return;
    }
    MatMulPackedF32(q, n, q_stride, reinterpret_cast<const float*>(keys_at(h)), context, qk, seen, qk, scores, seen);
    for (int64_t i = 0; i < n; ++i) SoftmaxRow(scores + i * seen, p.start + i0 + i + 1, seen, p.scale);
    MatMulPackedF32(scores, n, seen, reinterpret_cast<const float*>(values_at(h)), p.v_dim, context, p.v_dim, seen,
                    out, out_stride);
  });
}

}  // namespace epic::cpu
