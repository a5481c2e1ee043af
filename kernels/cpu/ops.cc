#include "kernels/cpu/ops.h"

#include <algorithm>
#include <cmath>

#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/intrinsics.h"
#include "kernels/cpu/parallel.h"

namespace epic::cpu {

namespace {

// Sum of x^2 in double over 8 partial sums: a single running sum waits on each add's
// latency (a row of 1024 took about 1 us; a 512-token prefill's norms, 10 ms).
double SumOfSquares(const float* x, int64_t n) {
  double part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) part[j] += static_cast<double>(x[i + j]) * x[i + j];
  }
  for (; i < n; ++i) part[i % 8] += static_cast<double>(x[i]) * x[i];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

}  // namespace

void RmsNorm(const float* x, int64_t rows, int64_t n, int64_t ldx, const float* weight, float eps,
             float* out, int64_t ldo) {
  // Prefill's rows in blocks over the threads; a decode's few rows on this one.
  constexpr int64_t kBlockRows = 16;
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  ParallelFor(blocks, rows * n >= (int64_t{1} << 16), [&](int64_t b) {
    for (int64_t r = b * kBlockRows; r < std::min(rows, (b + 1) * kBlockRows); ++r) {
      const float* xr = x + r * ldx;
      float* o = out + r * ldo;
      const double sum = SumOfSquares(xr, n);
      const float inv = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(n) + eps));
      for (int64_t i = 0; i < n; ++i) o[i] = weight[i] * (xr[i] * inv);
    }
  });
}

void ApplyRope(float* x, int64_t slices, int64_t slice_stride, int64_t position, const double* inv_freq,
               int64_t inv_freq_count, double mscale) {
  constexpr int64_t kChunk = 64;  // pairs whose angles are held at once
  double cs[kChunk], sn[kChunk];
  for (int64_t i0 = 0; i0 < inv_freq_count; i0 += kChunk) {
    const int64_t n = std::min(kChunk, inv_freq_count - i0);
    for (int64_t i = 0; i < n; ++i) {
      const double angle = static_cast<double>(position) * inv_freq[i0 + i];
      cs[i] = std::cos(angle) * mscale;
      sn[i] = std::sin(angle) * mscale;
    }
    for (int64_t s = 0; s < slices; ++s) {
      float* xs = x + s * slice_stride + 2 * i0;
      for (int64_t i = 0; i < n; ++i) {
        const double a = xs[2 * i];
        const double b = xs[2 * i + 1];
        xs[2 * i] = static_cast<float>(a * cs[i] - b * sn[i]);
        xs[2 * i + 1] = static_cast<float>(b * cs[i] + a * sn[i]);
      }
    }
  }
}

void ApplyRope(float* x, int64_t position, const double* inv_freq, int64_t inv_freq_count, double mscale) {
  ApplyRope(x, 1, 0, position, inv_freq, inv_freq_count, mscale);
}

namespace {

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

#define EPIC_AVX512 __attribute__((target("avx512f,avx512dq")))

// The exponentials' constants: the input's range, log2(e), ln 2 in two parts (the
// reduction exact to float), and e^r's polynomial from its highest coefficient.
constexpr float kExpMin = -104.0f, kExpMax = 89.0f, kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// e^x on 16 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-5 polynomial
// (within 2 ulp of expf), times 2^n by vscalefps (which gives 0 and inf past the range).
// NaN stays NaN (max and min keep their second operand when the first is NaN).
EPIC_AVX512 inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(kExpMax), _mm512_max_ps(_mm512_set1_ps(kExpMin), x));
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x));
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

EPIC_AVX512 void SiluMulAvx512(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = FirstLanes(n - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 e = Exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, up + i)));
  }
}

EPIC_AVX512 void SoftmaxAvx512(float* x, int64_t n) {
  __m512 max = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) max = _mm512_max_ps(max, _mm512_mask_loadu_ps(max, FirstLanes(n - i), x + i));
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(max));
  // Sums per lane in F32, then in double: softmax rows are thousands of values at most.
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = FirstLanes(n - i);
    const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), top));
    _mm512_mask_storeu_ps(x + i, m, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sum);
  double total = 0.0;
  for (const float v : lanes) total += v;
  const __m512 inv = _mm512_set1_ps(static_cast<float>(1.0 / total));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = FirstLanes(n - i);
    _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv));
  }
}

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

// Sixteen columns a vector; each row's exponentials scattered to their rows of OUT.
EPIC_AVX512 void ExpColumnsAvx512(const float* x, int64_t rows, int64_t cols, int64_t ldx, float scale, float* out,
                                  int64_t ldo, float* max, float* sum) {
  const __m512 s = _mm512_set1_ps(scale);
  const __m512i lane_rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(static_cast<int32_t>(ldo)));
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    const __mmask16 m = FirstLanes(cols - c0);
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t r = 0; r < rows; ++r) {
      top = _mm512_max_ps(top, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, x + r * ldx + c0)));
    }
    __m512d low = _mm512_setzero_pd(), high = _mm512_setzero_pd();
    float* base = out + c0 * ldo;
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 e = Exp(_mm512_fmsub_ps(s, _mm512_maskz_loadu_ps(m, x + r * ldx + c0), top));
      _mm512_mask_i32scatter_ps(base + r, m, lane_rows, e, 4);
      low = _mm512_add_pd(low, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
      high = _mm512_add_pd(high, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    }
    alignas(64) double sums[16];
    _mm512_store_pd(sums, low);
    _mm512_store_pd(sums + 8, high);
    alignas(64) float tops[16];
    _mm512_store_ps(tops, top);
    for (int64_t j = 0; j < std::min<int64_t>(16, cols - c0); ++j) {
      max[c0 + j] = tops[j];
      sum[c0 + j] = static_cast<float>(sums[j]);
    }
  }
}

#define EPIC_AVX2 __attribute__((target("avx2,fma")))

// Exp on 8 lanes: the AVX-512 form's reduction and polynomial, with 2^n built in the
// exponent field (vscalefps is AVX-512's) as two powers of two, each in the normal range,
// so that results reach subnormals, zero and infinity as expf's do. NaN stays NaN.
EPIC_AVX2 inline __m256 Exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(kExpMax), _mm256_max_ps(_mm256_set1_ps(kExpMin), x));
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x));
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i whole = _mm256_cvtps_epi32(n);  // [-150, 128]
  const __m256i half = _mm256_srai_epi32(whole, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 low = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(whole, half), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, low), high);
}

// X's lanes where MASK is set, -inf elsewhere.
EPIC_AVX2 inline __m256 LoadOrMinusInf(const float* x, __m256i mask) {
  return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_maskload_ps(x, mask), _mm256_castsi256_ps(mask));
}

EPIC_AVX2 void SiluMulAvx2(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i m = FirstLanes8(n - i);
    const __m256 g = _mm256_maskload_ps(gate + i, m);
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    _mm256_maskstore_ps(out + i, m, _mm256_mul_ps(silu, _mm256_maskload_ps(up + i, m)));
  }
}

EPIC_AVX2 double SumLanes(__m256d a, __m256d b) {
  alignas(32) double lanes[8];
  _mm256_store_pd(lanes, a);
  _mm256_store_pd(lanes + 4, b);
  double total = 0.0;
  for (const double v : lanes) total += v;
  return total;
}

EPIC_AVX2 void SoftmaxAvx2(float* x, int64_t n) {
  __m256 max = _mm256_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 8) max = _mm256_max_ps(max, LoadOrMinusInf(x + i, FirstLanes8(n - i)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, max);
  const __m256 top = _mm256_set1_ps(*std::max_element(lanes, lanes + 8));
  __m256d low = _mm256_setzero_pd(), high = _mm256_setzero_pd();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i m = FirstLanes8(n - i);
    const __m256 e = _mm256_and_ps(Exp8(_mm256_sub_ps(_mm256_maskload_ps(x + i, m), top)), _mm256_castsi256_ps(m));
    _mm256_maskstore_ps(x + i, m, e);
    low = _mm256_add_pd(low, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    high = _mm256_add_pd(high, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  const __m256 inv = _mm256_set1_ps(static_cast<float>(1.0 / SumLanes(low, high)));
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i m = FirstLanes8(n - i);
    _mm256_maskstore_ps(x + i, m, _mm256_mul_ps(_mm256_maskload_ps(x + i, m), inv));
  }
}

// Eight columns a vector; each row's exponentials stored to their rows of OUT one by one.
EPIC_AVX2 void ExpColumnsAvx2(const float* x, int64_t rows, int64_t cols, int64_t ldx, float scale, float* out,
                              int64_t ldo, float* max, float* sum) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t c0 = 0; c0 < cols; c0 += 8) {
    const __m256i m = FirstLanes8(cols - c0);
    const int64_t width = std::min<int64_t>(8, cols - c0);
    __m256 top = _mm256_set1_ps(-INFINITY);
    for (int64_t r = 0; r < rows; ++r) {
      top = _mm256_max_ps(top, _mm256_mul_ps(s, _mm256_maskload_ps(x + r * ldx + c0, m)));
    }
    __m256d low = _mm256_setzero_pd(), high = _mm256_setzero_pd();
    alignas(32) float e[8];
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 v = Exp8(_mm256_fmsub_ps(s, _mm256_maskload_ps(x + r * ldx + c0, m), top));
      _mm256_store_ps(e, v);
      for (int64_t j = 0; j < width; ++j) out[(c0 + j) * ldo + r] = e[j];
      low = _mm256_add_pd(low, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
      high = _mm256_add_pd(high, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
    alignas(32) double sums[8];
    _mm256_store_pd(sums, low);
    _mm256_store_pd(sums + 4, high);
    alignas(32) float tops[8];
    _mm256_store_ps(tops, top);
    for (int64_t j = 0; j < width; ++j) {
      max[c0 + j] = tops[j];
      sum[c0 + j] = static_cast<float>(sums[j]);
    }
  }
}

// The MoE combine (Axpy), every MLP (SiluMul) and attention's score rows (Softmax) call
// these millions of times a step: they take the widest vectors the host has.
void AxpyPlain(float alpha, const float* x, int64_t n, float* y) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

__attribute__((target("avx512f"))) void AxpyAvx512(float alpha, const float* x, int64_t n, float* y) {
  const __m512 a = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

__attribute__((target("avx2,fma"))) void AxpyAvx2(float alpha, const float* x, int64_t n, float* y) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

using AxpyFn = void (*)(float, const float*, int64_t, float*);
using SiluMulFn = void (*)(const float*, const float*, int64_t, float*);
using SoftmaxFn = void (*)(float*, int64_t);
using ExpColumnsFn = void (*)(const float*, int64_t, int64_t, int64_t, float, float*, int64_t, float*, float*);

const AxpyFn kAxpy = Has(Isa::kAvx512) ? AxpyAvx512 : Has(Isa::kAvx2) ? AxpyAvx2 : AxpyPlain;
const SiluMulFn kSiluMul = Has(Isa::kAvx512) ? SiluMulAvx512 : Has(Isa::kAvx2) ? SiluMulAvx2 : SiluMulPlain;
const SoftmaxFn kSoftmax = Has(Isa::kAvx512) ? SoftmaxAvx512 : Has(Isa::kAvx2) ? SoftmaxAvx2 : SoftmaxPlain;
const ExpColumnsFn kExpColumns =
    Has(Isa::kAvx512) ? ExpColumnsAvx512 : Has(Isa::kAvx2) ? ExpColumnsAvx2 : ExpColumnsPlain;

}  // namespace

void Axpy(float alpha, const float* x, int64_t n, float* y) { kAxpy(alpha, x, n, y); }

void SiluMul(const float* gate, const float* up, int64_t n, float* out) { kSiluMul(gate, up, n, out); }

void Softmax(float* x, int64_t n) {
  if (n > 0) kSoftmax(x, n);
}

void ExpColumns(const float* x, int64_t rows, int64_t cols, int64_t ldx, float scale, float* out, int64_t ldo,
                float* max, float* sum) {
  if (rows > 0) kExpColumns(x, rows, cols, ldx, scale, out, ldo, max, sum);
}

}  // namespace epic::cpu
