// Both forms of MLA against float64 attention written plainly, over a paged cache
// whose blocks are out of order.
#include "kernels/cpu/mla_attention.h"

#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

namespace epic::cpu {
namespace {

std::vector<float> Random(size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Softmax-weighted sum for one query over `context` keys, in double.
std::vector<double> Attend(const std::vector<double>& scores, const std::vector<std::vector<double>>& values) {
  double max = scores[0];
  for (double s : scores) max = std::max(max, s);
  double z = 0;
  for (double s : scores) z += std::exp(s - max);
  std::vector<double> out(values[0].size(), 0.0);
  for (size_t t = 0; t < scores.size(); ++t) {
    for (size_t j = 0; j < out.size(); ++j) out[j] += std::exp(scores[t] - max) / z * values[t][j];
  }
  return out;
}

TEST(MlaAttentionTest, AbsorbedOverPagedCacheMatchesFloat64) {
  std::mt19937_64 rng(11);
  const int64_t heads = 3, lora = 20, rope = 6, block = 4, start = 9, n = 5;
  const int64_t width = lora + rope;
  // Blocks deliberately out of order in the pool.
  const std::vector<int32_t> table = {3, 0, 5, 1};
  std::vector<float> pool = Random(6 * block * width, rng);
  std::vector<float> ql = Random(n * heads * lora, rng), qp = Random(n * heads * rope, rng);
  std::vector<float> out(n * heads * lora, NAN);
  MlaAbsorbedParams p;
  p.num_queries = n;
  p.start = start;
  p.num_heads = heads;
  p.kv_lora_rank = lora;
  p.rope_dim = rope;
  p.scale = 0.3f;
  p.q_latent = ql.data();
  p.q_pe = qp.data();
  p.cache = {pool.data(), table.data(), block, width};
  p.out_latent = out.data();
  MlaAbsorbedAttention(p);

  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      std::vector<double> scores;
      std::vector<std::vector<double>> values;
      for (int64_t t = 0; t <= start + i; ++t) {
        const float* row = pool.data() + (table[t / block] * block + t % block) * width;
        double s = 0;
        for (int64_t j = 0; j < lora; ++j) s += double(ql[(i * heads + h) * lora + j]) * row[j];
        for (int64_t j = 0; j < rope; ++j) s += double(qp[(i * heads + h) * rope + j]) * row[lora + j];
        scores.push_back(0.3 * s);
        values.emplace_back(row, row + lora);
      }
      const std::vector<double> want = Attend(scores, values);
      for (int64_t j = 0; j < lora; ++j) {
        EXPECT_NEAR(out[(i * heads + h) * lora + j], want[j], 1e-5) << "query " << i << " head " << h;
      }
    }
  }
}

TEST(MlaAttentionTest, ExpandedCausalMatchesFloat64) {
  std::mt19937_64 rng(12);
  const int64_t heads = 2, nope = 8, rope = 4, vdim = 6, start = 3, n = 4;
  const int64_t context = start + n, qk = nope + rope, kvw = heads * (nope + vdim);
  std::vector<float> q = Random(n * heads * qk, rng), kv = Random(context * kvw, rng);
  std::vector<float> kpe = Random(context * rope, rng), out(n * heads * vdim, NAN);
  MlaExpandedParams p;
  p.num_queries = n;
  p.start = start;
  p.num_heads = heads;
  p.nope_dim = nope;
  p.rope_dim = rope;
  p.v_dim = vdim;
  p.scale = 0.25f;
  p.q = q.data();
  p.kv = kv.data();
  p.k_pe = kpe.data();
  p.out = out.data();
  MlaExpandedAttention(p);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      std::vector<double> scores;
      std::vector<std::vector<double>> values;
      const float* qi = q.data() + (i * heads + h) * qk;
      for (int64_t t = 0; t <= start + i; ++t) {  // causal
        const float* k = kv.data() + t * kvw + h * (nope + vdim);
        double s = 0;
        for (int64_t j = 0; j < nope; ++j) s += double(qi[j]) * k[j];
        for (int64_t j = 0; j < rope; ++j) s += double(qi[nope + j]) * kpe[t * rope + j];
        scores.push_back(0.25 * s);
        values.emplace_back(k + nope, k + nope + vdim);
      }
      const std::vector<double> want = Attend(scores, values);
      for (int64_t j = 0; j < vdim; ++j) {
        EXPECT_NEAR(out[(i * heads + h) * vdim + j], want[j], 1e-5) << "query " << i << " head " << h;
      }
    }
  }
}

}  // namespace
}  // namespace epic::cpu
