#include "kernels/cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/half.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/intrinsics.h"
#include "kernels/cpu/parallel.h"

namespace epic::cpu {

void RopeFactors(int64_t position, const double* inv_freq, int64_t count, double mscale, double* cos, double* sin) {
  for (int64_t i = 0; i < count; ++i) {
    const double angle = static_cast<double>(position) * inv_freq[i];
    cos[i] = std::cos(angle) * mscale;
    sin[i] = std::sin(angle) * mscale;
  }
}

namespace {

// Pairs [begin, count) of one slice.
void RopePairs(float* xs, const double* cos, const double* sin, int64_t begin, int64_t count) {
  for (int64_t i = begin; i < count; ++i) {
    const double a = xs[2 * i];
    const double b = xs[2 * i + 1];
    xs[2 * i] = static_cast<float>(a * cos[i] - b * sin[i]);
    xs[2 * i + 1] = static_cast<float>(b * cos[i] + a * sin[i]);
  }
}

// Four pairs at a time in double, each product and sum rounded once as RopePairs rounds
// them (no fused multiply-adds: ISO C++ builds contract none): the same bits. A prefill's
// queries are 17 slices a token.
__attribute__((target("avx512f"))) void ApplyRopeAvx512(float* x, int64_t slices, int64_t slice_stride,
                                                        const double* cos, const double* sin, int64_t count) {
  const __m512i twice = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0);  // each pair's factor on both lanes
  const int64_t whole = count / 4 * 4;
  for (int64_t s = 0; s < slices; ++s) {
    float* xs = x + s * slice_stride;
    for (int64_t i = 0; i < whole; i += 4) {
      const __m512d v = _mm512_cvtps_pd(_mm256_loadu_ps(xs + 2 * i));  // a0 b0 a1 b1 ...
      const __m512d swapped = _mm512_permute_pd(v, 0x55);             // b0 a0 b1 a1 ...
      const __m512d c = _mm512_permutexvar_pd(twice, _mm512_castpd256_pd512(_mm256_loadu_pd(cos + i)));
      const __m512d n = _mm512_permutexvar_pd(twice, _mm512_castpd256_pd512(_mm256_loadu_pd(sin + i)));
      const __m512d straight = _mm512_mul_pd(v, c), crossed = _mm512_mul_pd(swapped, n);
      // a cos - b sin in the even lanes, b cos + a sin in the odd.
      const __m512d rotated = _mm512_mask_sub_pd(_mm512_add_pd(straight, crossed), 0x55, straight, crossed);
      _mm256_storeu_ps(xs + 2 * i, _mm512_cvtpd_ps(rotated));
    }
    RopePairs(xs, cos, sin, whole, count);
  }
}

}  // namespace

void ApplyRope(float* x, int64_t slices, int64_t slice_stride, const double* cos, const double* sin, int64_t count) {
  if (Has(Isa::kAvx512)) return ApplyRopeAvx512(x, slices, slice_stride, cos, sin, count);
  for (int64_t s = 0; s < slices; ++s) RopePairs(x + s * slice_stride, cos, sin, 0, count);
}

void ApplyRope(float* x, int64_t slices, int64_t slice_stride, int64_t position, const double* inv_freq,
               int64_t inv_freq_count, double mscale) {
  constexpr int64_t kChunk = 64;  // pairs whose factors are held at once
  double cs[kChunk], sn[kChunk];
  for (int64_t i0 = 0; i0 < inv_freq_count; i0 += kChunk) {
    const int64_t n = std::min(kChunk, inv_freq_count - i0);
    RopeFactors(position, inv_freq + i0, n, mscale, cs, sn);
    ApplyRope(x + 2 * i0, slices, slice_stride, cs, sn, n);
  }
}

void ApplyRope(float* x, int64_t position, const double* inv_freq, int64_t inv_freq_count, double mscale) {
  ApplyRope(x, 1, 0, position, inv_freq, inv_freq_count, mscale);
}

namespace {

// 1 / sqrt(mean of squares + eps) from the sum of squares in double.
float InverseRms(double squares, int64_t n, float eps) {
  return static_cast<float>(1.0 / std::sqrt(squares / static_cast<double>(n) + eps));
}

// x^2 summed in double over 8 partial sums: a single running sum waits on each add's
// latency (a row of 1024 took about 1 us; a 512-token prefill's norms, 10 ms).
void RmsNormRowPlain(const float* x, int64_t n, const float* weight, float eps, float* out) {
  double part[8] = {};
  for (int64_t i = 0; i < n; ++i) part[i % 8] += static_cast<double>(x[i]) * x[i];
  const double squares = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  const float inv = InverseRms(squares, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
}

void SiluMulPlain(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void SoftmaxPlain(float* x, int64_t n) {
  float max = x[0];
  for (int64_t i = 1; i < n; ++i) max = std::fmax(max, x[i]);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

// The exponentials' constants: the input's range, log2(e), ln 2 in two parts (the
// reduction exact to float), and e^r's polynomial from its highest coefficient.
constexpr float kExpMin = -104.0f, kExpMax = 89.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
// 2^r on [-1/2, 1/2] as 1 + r p(r), p's coefficients from the highest: a Remez fit of the
// relative error (4.3e-7 at most), and the input's floor.
constexpr float kExp2Poly[] = {1.1125507683e-3f, 9.6662825247e-3f, 5.5574004733e-2f, 2.4022350651e-1f,
                               6.9314283061e-1f};
constexpr float kExp2Min = -150.0f;

void ExpColumnsPlain(const float* x, int64_t rows, int64_t cols, int64_t ldx, float scale, float* out, int64_t ldo,
                     float* max, float* sum) {
  for (int64_t c = 0; c < cols; ++c) {
    float top = -INFINITY;
    for (int64_t r = 0; r < rows; ++r) top = std::fmax(top, scale * x[r * ldx + c]);
    double total = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
      const float e = std::exp(scale * x[r * ldx + c] - top);
      out[c * ldo + r] = e;
      total += e;
    }
    max[c] = top;
    sum[c] = static_cast<float>(total);
  }
}

// The exponentials over X, or rounded to BF16 into ROUNDED when it is given.
float OnlineSoftmaxRowPlainTo(float* x, int64_t valid, int64_t width, float scale, float* max, double* sum,
                              uint16_t* rounded) {
  float alpha = 1.0f;
  if (valid > 0) {
    float top = -INFINITY;
    for (int64_t i = 0; i < valid; ++i) top = std::fmax(top, x[i]);
    const float raised = std::fmax(*max, scale * top);
    alpha = std::exp(*max - raised);
    double total = 0.0;
    for (int64_t i = 0; i < valid; ++i) {
      const float e = std::exp(scale * x[i] - raised);
      if (rounded != nullptr) {
        rounded[i] = FloatToBf16(e);
      } else {
        x[i] = e;
      }
      total += e;
    }
    *sum = *sum * alpha + total;
    *max = raised;
  }
  if (rounded != nullptr) {
    std::fill(rounded + valid, rounded + width, uint16_t{0});
  } else {
    std::fill(x + valid, x + width, 0.0f);
  }
  return alpha;
}

float OnlineSoftmaxRowPlain(float* x, int64_t valid, int64_t width, float scale, float* max, double* sum) {
  return OnlineSoftmaxRowPlainTo(x, valid, width, scale, max, sum, nullptr);
}

float OnlineSoftmaxRowBf16Plain(const float* x, int64_t valid, int64_t width, float scale, float* max, double* sum,
                                uint16_t* out) {
  return OnlineSoftmaxRowPlainTo(const_cast<float*>(x), valid, width, scale, max, sum, out);
}

void AxpyPlain(float alpha, const float* x, int64_t n, float* y) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void WeightedSumPlain(const float* const* x, const float* w, int64_t count, int64_t n, float* y) {
  std::fill(y, y + n, 0.0f);
  for (int64_t j = 0; j < count; ++j) AxpyPlain(w[j], x[j], n, y);
}

void ScalePlain(float alpha, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
}

// Vector paths: one traits struct per instruction set, and ops_simd.inc (the kernels)
// compiled for each.

#define EPIC_AVX512_OP __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"), always_inline)) inline

struct Avx512 {
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  // Per-lane sums in double, lanes 0-7 and 8-15.
  struct Sums {
    __m512d low, high;
  };
  using Column = __m512i;  // each lane's offset in a column store

  EPIC_AVX512_OP static Mask First(int64_t n) { return FirstLanes(n); }
  EPIC_AVX512_OP static Vec Load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  // P's lanes where M is set, FILL's elsewhere.
  EPIC_AVX512_OP static Vec LoadOr(const float* p, Mask m, Vec fill) { return _mm512_mask_loadu_ps(fill, m, p); }
  EPIC_AVX512_OP static void Store(float* p, Mask m, Vec v) { _mm512_mask_storeu_ps(p, m, v); }
  // The first min(N, 16) lanes rounded to BF16 (as FloatToBf16).
  EPIC_AVX512_OP static void StoreBf16(uint16_t* p, int64_t n, Vec v) {
    _mm256_mask_storeu_epi16(p, FirstLanes(n), RoundToBf16Lanes(v));
  }
  EPIC_AVX512_OP static Vec Keep(Vec v, Mask m) { return _mm512_maskz_mov_ps(m, v); }  // zeros past M
  EPIC_AVX512_OP static Vec Zero() { return _mm512_setzero_ps(); }
  EPIC_AVX512_OP static Vec Set1(float v) { return _mm512_set1_ps(v); }
  EPIC_AVX512_OP static Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  EPIC_AVX512_OP static Vec Sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  EPIC_AVX512_OP static Vec Mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  EPIC_AVX512_OP static Vec Div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
  EPIC_AVX512_OP static Vec Max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  EPIC_AVX512_OP static Vec Min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
  EPIC_AVX512_OP static Vec Fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  EPIC_AVX512_OP static Vec Fnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }
  EPIC_AVX512_OP static Vec Fmsub(Vec a, Vec b, Vec c) { return _mm512_fmsub_ps(a, b, c); }
  EPIC_AVX512_OP static Vec Round(Vec v) {
    return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // P * 2^N (N whole): vscalefps gives 0 and inf past the range.
  EPIC_AVX512_OP static Vec TimesPow2(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }
  EPIC_AVX512_OP static float MaxLanes(Vec v) { return _mm512_reduce_max_ps(v); }
  EPIC_AVX512_OP static Sums NoSums() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  EPIC_AVX512_OP static Sums AddSums(Sums s, Vec v) {
    return {_mm512_add_pd(s.low, _mm512_cvtps_pd(_mm512_castps512_ps256(v))),
            _mm512_add_pd(s.high, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))))};
  }
  // Each lane's square added in double (exact: a float's square fits a double).
  EPIC_AVX512_OP static Sums AddSquares(Sums s, Vec v) {
    const __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return {_mm512_fmadd_pd(low, low, s.low), _mm512_fmadd_pd(high, high, s.high)};
  }
  EPIC_AVX512_OP static void StoreSums(Sums s, double* out) {
    _mm512_storeu_pd(out, s.low);
    _mm512_storeu_pd(out + 8, s.high);
  }
  EPIC_AVX512_OP static Column ColumnOf(int64_t ld) {
    return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                              _mm512_set1_epi32(static_cast<int32_t>(ld)));
  }
  // Lane j of V to P[j * ld] for the lanes of M (the first WIDTH).
  EPIC_AVX512_OP static void StoreColumn(float* p, Column column, Mask m, int64_t, Vec v) {
    _mm512_mask_i32scatter_ps(p, m, column, v, 4);
  }
};

#define EPIC_AVX512_BF16_OP \
  __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16"), always_inline)) inline

// AVX-512 rounding to BF16 by vcvtneps2bf16: a sixth of the BF16 attention's softmax went
// to rounding its exponentials (Zen 4, TSC cycles a vector 23.6 -> 19.8).
struct Avx512Bf16 : Avx512 {
  EPIC_AVX512_BF16_OP static void StoreBf16(uint16_t* p, int64_t n, Vec v) {
    _mm256_mask_storeu_epi16(p, FirstLanes(n), RoundToBf16LanesBf16(v));
  }
};

#define EPIC_AVX2_OP __attribute__((target("avx2,fma"), always_inline)) inline

struct Avx2 {
  using Vec = __m256;
  // The lanes' mask, and whether it is all of them: vmaskmovps stores are slow on some
  // processors (AMD Zen's are microcoded), so whole vectors take plain loads and stores.
  struct Mask {
    __m256i bits;
    bool full;
  };
  static constexpr int kLanes = 8;
  struct Sums {
    __m256d low, high;
  };
  using Column = int64_t;

  EPIC_AVX2_OP static Mask First(int64_t n) { return {FirstLanes8(n), n >= 8}; }
  EPIC_AVX2_OP static Vec Load(const float* p, Mask m) {
    return m.full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m.bits);
  }
  EPIC_AVX2_OP static Vec LoadOr(const float* p, Mask m, Vec fill) {
    return m.full ? _mm256_loadu_ps(p) : _mm256_blendv_ps(fill, _mm256_maskload_ps(p, m.bits), _mm256_castsi256_ps(m.bits));
  }
  EPIC_AVX2_OP static void Store(float* p, Mask m, Vec v) {
    if (m.full) {
      _mm256_storeu_ps(p, v);
    } else {
      _mm256_maskstore_ps(p, m.bits, v);
    }
  }
  EPIC_AVX2_OP static void StoreBf16(uint16_t* p, int64_t n, Vec v) {
    const __m128i words = RoundToBf16Lanes8(v);
    if (n >= 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), words);
    } else {
      alignas(16) uint16_t lanes[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(lanes), words);
      std::memcpy(p, lanes, static_cast<size_t>(n) * sizeof(uint16_t));
    }
  }
  EPIC_AVX2_OP static Vec Keep(Vec v, Mask m) { return _mm256_and_ps(v, _mm256_castsi256_ps(m.bits)); }
  EPIC_AVX2_OP static Vec Zero() { return _mm256_setzero_ps(); }
  EPIC_AVX2_OP static Vec Set1(float v) { return _mm256_set1_ps(v); }
  EPIC_AVX2_OP static Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  EPIC_AVX2_OP static Vec Sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  EPIC_AVX2_OP static Vec Mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  EPIC_AVX2_OP static Vec Div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
  EPIC_AVX2_OP static Vec Max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  EPIC_AVX2_OP static Vec Min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
  EPIC_AVX2_OP static Vec Fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  EPIC_AVX2_OP static Vec Fnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
  EPIC_AVX2_OP static Vec Fmsub(Vec a, Vec b, Vec c) { return _mm256_fmsub_ps(a, b, c); }
  EPIC_AVX2_OP static Vec Round(Vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // P * 2^N built in the exponent field as two powers of two, each in the normal range,
  // so that results reach subnormals, zero and infinity as expf's do (N in [-150, 128]).
  EPIC_AVX2_OP static Vec TimesPow2(Vec p, Vec n) {
    const __m256i whole = _mm256_cvtps_epi32(n);
    const __m256i half = _mm256_srai_epi32(whole, 1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 low = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    const __m256 high =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(whole, half), bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, low), high);
  }
  EPIC_AVX2_OP static float MaxLanes(Vec v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  EPIC_AVX2_OP static Sums NoSums() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  EPIC_AVX2_OP static Sums AddSums(Sums s, Vec v) {
    return {_mm256_add_pd(s.low, _mm256_cvtps_pd(_mm256_castps256_ps128(v))),
            _mm256_add_pd(s.high, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)))};
  }
  EPIC_AVX2_OP static Sums AddSquares(Sums s, Vec v) {
    const __m256d low = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d high = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    return {_mm256_fmadd_pd(low, low, s.low), _mm256_fmadd_pd(high, high, s.high)};
  }
  EPIC_AVX2_OP static void StoreSums(Sums s, double* out) {
    _mm256_storeu_pd(out, s.low);
    _mm256_storeu_pd(out + 4, s.high);
  }
  EPIC_AVX2_OP static Column ColumnOf(int64_t ld) { return ld; }
  // No scatter: the first WIDTH lanes one by one.
  EPIC_AVX2_OP static void StoreColumn(float* p, Column ld, Mask, int64_t width, Vec v) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, v);
    for (int64_t j = 0; j < width; ++j) p[j * ld] = lanes[j];
  }
};

namespace avx512 {
using V = Avx512;
#define EPIC_SIMD __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
#include "kernels/cpu/ops_simd.inc"
#undef EPIC_SIMD
}  // namespace avx512

// Only its OnlineSoftmaxRowBf16 is taken.
namespace avx512bf16 {
using V = Avx512Bf16;
#define EPIC_SIMD __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16"), unused))
#include "kernels/cpu/ops_simd.inc"
#undef EPIC_SIMD
}  // namespace avx512bf16

namespace avx2 {
using V = Avx2;
#define EPIC_SIMD __attribute__((target("avx2,fma")))
#include "kernels/cpu/ops_simd.inc"
#undef EPIC_SIMD
}  // namespace avx2

using AxpyFn = void (*)(float, const float*, int64_t, float*);
using WeightedSumFn = void (*)(const float* const*, const float*, int64_t, int64_t, float*);
using ScaleFn = void (*)(float, float*, int64_t);
using SiluMulFn = void (*)(const float*, const float*, int64_t, float*);
using SoftmaxFn = void (*)(float*, int64_t);
using ExpColumnsFn = void (*)(const float*, int64_t, int64_t, int64_t, float, float*, int64_t, float*, float*);
using OnlineSoftmaxRowFn = float (*)(float*, int64_t, int64_t, float, float*, double*);
using OnlineSoftmaxRowBf16Fn = float (*)(const float*, int64_t, int64_t, float, float*, double*, uint16_t*);
using RmsNormRowFn = void (*)(const float*, int64_t, const float*, float, float*);

// The MoE combine (WeightedSum), every MLP (SiluMul) and attention's score rows (Softmax,
// ExpColumns) call these millions of times a step: they take the widest vectors the
// host has.
const AxpyFn kAxpy = Has(Isa::kAvx512) ? avx512::Axpy : Has(Isa::kAvx2) ? avx2::Axpy : AxpyPlain;
const WeightedSumFn kWeightedSum =
    Has(Isa::kAvx512) ? avx512::WeightedSum : Has(Isa::kAvx2) ? avx2::WeightedSum : WeightedSumPlain;
// A decode's attention outputs over their sums, every head's kv_lora_rank values a
// sequence and layer: in SSE (the baseline) 8% of small experts' batched attention.
const ScaleFn kScale = Has(Isa::kAvx512) ? avx512::Scale : Has(Isa::kAvx2) ? avx2::Scale : ScalePlain;
const SiluMulFn kSiluMul = Has(Isa::kAvx512) ? avx512::SiluMul : Has(Isa::kAvx2) ? avx2::SiluMul : SiluMulPlain;
const SoftmaxFn kSoftmax = Has(Isa::kAvx512) ? avx512::Softmax : Has(Isa::kAvx2) ? avx2::Softmax : SoftmaxPlain;
const ExpColumnsFn kExpColumns =
    Has(Isa::kAvx512) ? avx512::ExpColumns : Has(Isa::kAvx2) ? avx2::ExpColumns : ExpColumnsPlain;
const OnlineSoftmaxRowFn kOnlineSoftmaxRow = Has(Isa::kAvx512) ? avx512::OnlineSoftmaxRow
                                             : Has(Isa::kAvx2)  ? avx2::OnlineSoftmaxRow
                                                                : OnlineSoftmaxRowPlain;
const OnlineSoftmaxRowBf16Fn kOnlineSoftmaxRowBf16 = Has(Isa::kAvx512Bf16) ? avx512bf16::OnlineSoftmaxRowBf16
                                                     : Has(Isa::kAvx512)    ? avx512::OnlineSoftmaxRowBf16
                                                     : Has(Isa::kAvx2)  ? avx2::OnlineSoftmaxRowBf16
                                                                        : OnlineSoftmaxRowBf16Plain;
// Every layer's norms, four a layer: in plain C++'s two doubles a vector they were 2% of a
// 512-token prefill (small experts, Zen 4).
const RmsNormRowFn kRmsNormRow =
    Has(Isa::kAvx512) ? avx512::RmsNormRow : Has(Isa::kAvx2) ? avx2::RmsNormRow : RmsNormRowPlain;

}  // namespace

void RmsNorm(const float* x, int64_t rows, int64_t n, int64_t ldx, const float* weight, float eps,
             float* out, int64_t ldo) {
  // Prefill's rows in blocks over the threads; a decode's few rows on this one.
  constexpr int64_t kBlockRows = 16;
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  ParallelFor(blocks, rows * n >= (int64_t{1} << 16), [&](int64_t b) {
    for (int64_t r = b * kBlockRows; r < std::min(rows, (b + 1) * kBlockRows); ++r) {
      kRmsNormRow(x + r * ldx, n, weight, eps, out + r * ldo);
    }
  });
}

void Axpy(float alpha, const float* x, int64_t n, float* y) { kAxpy(alpha, x, n, y); }

void WeightedSum(std::span<const float* const> x, const float* w, int64_t n, float* y) {
  kWeightedSum(x.data(), w, static_cast<int64_t>(x.size()), n, y);
}

void Scale(float alpha, float* x, int64_t n) { kScale(alpha, x, n); }

void SiluMul(const float* gate, const float* up, int64_t n, float* out) { kSiluMul(gate, up, n, out); }

void Softmax(float* x, int64_t n) {
  if (n > 0) kSoftmax(x, n);
}

void ExpColumns(const float* x, int64_t rows, int64_t cols, int64_t ldx, float scale, float* out, int64_t ldo,
                float* max, float* sum) {
  if (rows > 0) kExpColumns(x, rows, cols, ldx, scale, out, ldo, max, sum);
}

float OnlineSoftmaxRow(float* x, int64_t valid, int64_t width, float scale, float* max, double* sum) {
  return kOnlineSoftmaxRow(x, valid, width, scale, max, sum);
}

float OnlineSoftmaxRowBf16(const float* x, int64_t valid, int64_t width, float scale, float* max, double* sum,
                           uint16_t* out) {
  return kOnlineSoftmaxRowBf16(x, valid, width, scale, max, sum, out);
}

}  // namespace epic::cpu
