#include "kernels/cpu/mla_attention.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "kernels/cpu/ops.h"

namespace epic::cpu {

void MlaAbsorbedAttention(const MlaAbsorbedParams& p) {
  const int64_t work = p.num_queries * p.num_heads;
  const int64_t lora = p.kv_lora_rank;
#pragma omp parallel if (work > 1 && !omp_in_parallel())
  {
    std::vector<float> scores;
#pragma omp for schedule(static)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t i = w / p.num_heads;
      const int64_t context = p.start + i + 1;
      const float* ql = p.q_latent + w * lora;
      const float* qr = p.q_pe + w * p.rope_dim;
      scores.resize(static_cast<size_t>(context));
      for (int64_t t = 0; t < context; ++t) {
        const float* row = p.cache.Row(t);
        scores[t] = p.scale * (Dot(ql, row, lora) + Dot(qr, row + lora, p.rope_dim));
      }
      Softmax(scores.data(), context);
      float* out = p.out_latent + w * lora;
      std::fill(out, out + lora, 0.0f);
      for (int64_t t = 0; t < context; ++t) Axpy(scores[t], p.cache.Row(t), lora, out);
    }
  }
}

void MlaExpandedAttention(const MlaExpandedParams& p) {
  const int64_t work = p.num_queries * p.num_heads;
  const int64_t qk = p.nope_dim + p.rope_dim;
  const int64_t kv_width = p.num_heads * (p.nope_dim + p.v_dim);
#pragma omp parallel if (work > 1 && !omp_in_parallel())
  {
    std::vector<float> scores;
#pragma omp for schedule(static)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t i = w / p.num_heads;
      const int64_t h = w % p.num_heads;
      const int64_t context = p.start + i + 1;
      const float* q = p.q + w * qk;
      scores.resize(static_cast<size_t>(context));
      for (int64_t t = 0; t < context; ++t) {
        const float* k_nope = p.kv + t * kv_width + h * (p.nope_dim + p.v_dim);
        scores[t] = p.scale * (Dot(q, k_nope, p.nope_dim) +
                               Dot(q + p.nope_dim, p.k_pe + t * p.rope_dim, p.rope_dim));
      }
      Softmax(scores.data(), context);
      float* out = p.out + w * p.v_dim;
      std::fill(out, out + p.v_dim, 0.0f);
      for (int64_t t = 0; t < context; ++t) {
        const float* v = p.kv + t * kv_width + h * (p.nope_dim + p.v_dim) + p.nope_dim;
        Axpy(scores[t], v, p.v_dim, out);
      }
    }
  }
}

}  // namespace epic::cpu
