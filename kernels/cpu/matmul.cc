// CPU matrix products with weights read in place (BF16 or F32) and exact F32 activations.
//
// Two regimes, chosen by the number of activation rows m:
//  - m <= kGemvMaxRows (decode): memory-bound. Each weight row is streamed once for all
//    m rows of x; several weight rows are read side by side, BF16 is widened to F32 with
//    a shift and a mask, FMAs go into m x R vector accumulators that are reduced
//    horizontally once at the end. Threads split the weight rows. (BF16 with a few more
//    rows of x takes the same path in groups of 8 over L2-resident chunks of weights.)
//  - larger m (prefill): compute-bound. A block of weights [kKC x kNC] is widened and
//    transposed into panels of kNR output columns, x into panels of kMR rows, and a
//    kMR x kNR register-blocked micro-kernel broadcasts x and FMAs packed weight vectors.
//    Threads split the output columns (or the rows of x when there are few columns).
// The AVX-512 kernels are compiled with a target attribute and chosen at run time; the
// plain C++ path serves processors without AVX-512.
#include "kernels/cpu/matmul.h"

// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_*()
// placeholders once inlined (GCC bug 105593); the warning is about the header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "common/half.h"
#include "kernels/cpu/matmul_internal.h"

namespace epic::cpu {

WeightMatrix WeightMatrix::Rows(int64_t begin, int64_t count) const {
  WeightMatrix view = *this;
  view.data = static_cast<const char*>(data) + begin * row_stride * ElementBytes();
  view.rows = count;
  return view;
}

WeightMatrix WeightMatrix::Cols(int64_t begin, int64_t count) const {
  WeightMatrix view = *this;
  view.data = static_cast<const char*>(data) + begin * ElementBytes();
  view.cols = count;
  return view;
}

float WeightMatrix::At(int64_t r, int64_t c) const {
  const int64_t index = r * row_stride + c;
  if (type == WeightType::kBF16) return Bf16ToFloat(static_cast<const uint16_t*>(data)[index]);
  return static_cast<const float*>(data)[index];
}

namespace {

using Bf16 = uint16_t;

// Decode path (dot products, weights streamed once per group of 8 rows of x) up to this
// many rows of x; the packed GEMM beyond. BF16 weights stay on the decode path longer
// because widening them there is cheap while the GEMM pays a transposing pack, which at
// m = 16 costs more than the re-reads of L2-resident weight chunks (measured on Zen 4).
constexpr int64_t kGemvMaxRows = 8;
constexpr int64_t kGemvMaxRowsBf16 = 24;

// Packed GEMM blocking. The x panel [kKC][kMR] (8 KiB) stays in L1 while the micro-kernel
// runs over the kNC / kNR weight panels of the packed block [kKC x kNC] (384 KiB, L2).
constexpr int kMR = 8;
constexpr int kNR = 48;
constexpr int64_t kKC = 256;
constexpr int64_t kNC = 8 * kNR;
// Bytes of packed x kept per thread; rows of x beyond it are handled in chunks.
constexpr int64_t kXPackBytes = 4 << 20;

// Minimum work (multiply-adds) worth waking another thread for.
constexpr double kMinWorkPerThread = 1 << 16;

int TeamSize(double work) {
  if (omp_in_parallel()) return 1;
  const int max_threads = omp_get_max_threads();
  const double by_work = work / kMinWorkPerThread;
  if (by_work < 2) return 1;
  return static_cast<int>(std::min<double>(max_threads, by_work));
}

// [begin, end) of part `index` of `count` near-equal parts of `total` units.
inline void SplitRange(int64_t total, int count, int index, int64_t* begin, int64_t* end) {
  *begin = total * index / count;
  *end = total * (index + 1) / count;
}

template <typename W>
inline float Widen(W v) {
  if constexpr (sizeof(W) == 2) {
    return Bf16ToFloat(v);
  } else {
    return v;
  }
}

// Per-thread scratch buffers.
enum ScratchSlot { kPackedX, kPackedW, kPermutedX, kScratchSlots };

// Scratch that lives as long as its thread, so that repeated calls do not fault in
// fresh pages; grows to the largest request seen.
float* ThreadScratch(ScratchSlot slot, int64_t floats) {
  struct Buffer {
    float* data = nullptr;
    int64_t floats = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[kScratchSlots];
  Buffer& b = buffers[slot];
  if (b.floats < floats) {
    std::free(b.data);
    const size_t bytes = (static_cast<size_t>(floats) * sizeof(float) + 63) / 64 * 64;
    b.data = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (b.data == nullptr) throw std::bad_alloc();
    b.floats = floats;
  }
  return b.data;
}

// ---------------------------------------------------------------------------------
// Plain C++ path.

template <typename W>
void MatMulPlainRows(const float* x, int64_t m, int64_t ldx, const W* w, int64_t stride,
                     int64_t cols, int64_t n_begin, int64_t n_end, float* y, int64_t ldy,
                     bool accumulate) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* wr = w + n * stride;
    for (int64_t i = 0; i < m; ++i) {
      const float* xr = x + i * ldx;
      // Eight partial sums: vectorisable without reassociation flags, and shorter
      // summation chains.
      float s[8] = {};
      int64_t k = 0;
      for (; k + 8 <= cols; k += 8) {
        for (int j = 0; j < 8; ++j) s[j] += xr[k + j] * Widen(wr[k + j]);
      }
      for (; k < cols; ++k) s[0] += xr[k] * Widen(wr[k]);
      const float sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
      float& out = y[i * ldy + n];
      out = accumulate ? out + sum : sum;
    }
  }
}

template <typename W>
void MatMulNoTransPlainCols(const float* x, int64_t m, int64_t ldx, const W* w,
                            int64_t stride, int64_t rows, int64_t k_begin, int64_t k_end,
                            float* y, int64_t ldy, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    float* yr = y + i * ldy;
    if (!accumulate) std::fill(yr + k_begin, yr + k_end, 0.0f);
    for (int64_t n = 0; n < rows; ++n) {
      const float xv = x[i * ldx + n];
      const W* wr = w + n * stride;
      for (int64_t k = k_begin; k < k_end; ++k) yr[k] += xv * Widen(wr[k]);
    }
  }
}

// ---------------------------------------------------------------------------------
// AVX-512 path.

#define EPIC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define EPIC_AVX512_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline

// 16 weights widened to F32. BF16 is the top half of an F32: zero-extend and shift.
EPIC_AVX512_INLINE __m512 Load16(const Bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
EPIC_AVX512_INLINE __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
EPIC_AVX512_INLINE __m512 Load16(const Bf16* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
EPIC_AVX512_INLINE __m512 Load16(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}

inline __mmask16 TailMask(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << count) - 1);
}

// --- Decode: y[0..M, 0..R] for R consecutive weight rows. ---
//
// BF16 weights are widened 32 at a time without a cross-lane conversion: a 64-byte load
// holds 16 pairs (even k in the low halves of the 32-bit lanes, odd k in the high
// halves); a shift makes the even elements F32 and a mask the odd ones. x is permuted
// to match once per call (PermuteActivations), so each weight costs one load, one
// integer op and one FMA per row of x.

// Prefetch distance for the weight streams, in bytes ahead of the loads. Into L2 (T1):
// prefetching 8 streams x 1 KiB into L1 thrashes it and measured slower than none.
constexpr int64_t kGemvPrefetchBytes = 1024;
constexpr int64_t kPairBlock = 32;  // weights per permuted block of x

// xp[i] = x[i] with each full block of 32 reordered to 16 even then 16 odd elements; a
// tail shorter than 32 keeps its order. xp is [m, cols].
void PermuteActivations(const float* x, int64_t m, int64_t ldx, int64_t cols, float* xp) {
  const int64_t full = cols / kPairBlock * kPairBlock;
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x + i * ldx;
    float* out = xp + i * cols;
    for (int64_t k = 0; k < full; k += kPairBlock) {
      for (int j = 0; j < 16; ++j) {
        out[k + j] = xr[k + 2 * j];
        out[k + 16 + j] = xr[k + 2 * j + 1];
      }
    }
    std::copy(xr + full, xr + cols, out + full);
  }
}

template <int M, int R, typename W>
EPIC_AVX512 void GemvBlock(const float* x, int64_t ldx, const W* w, int64_t stride,
                           int64_t cols, float* y, int64_t ldy, bool accumulate) {
  constexpr int64_t kPrefetchElems = kGemvPrefetchBytes / sizeof(W);
  __m512 acc[M][R];
  for (int i = 0; i < M; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  const W* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + r * stride;
  // Prefetch runs ahead along each row and, near its end, on into the same row of the
  // next block (the next R rows): with rows of a few KiB, the head of every row would
  // otherwise arrive unprefetched.
  auto ahead = [&](int r, int64_t k) -> const char* {
    const int64_t target = k + kPrefetchElems;
    return reinterpret_cast<const char*>(target < cols ? wr[r] + target
                                                       : wr[r] + R * stride + (target - cols));
  };

  int64_t k = 0;
  if constexpr (sizeof(W) == 2) {
    // x is permuted (PermuteActivations); one cache line of weights per row and step.
    const __m512i high_halves = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    for (; k + kPairBlock <= cols; k += kPairBlock) {
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(ahead(r, k), _MM_HINT_T1);
      }
      if constexpr (2 * M + M * R <= 28) {
        // Few rows of x: keep them in registers across the R weight rows.
        __m512 xe[M], xo[M];
        for (int i = 0; i < M; ++i) {
          xe[i] = _mm512_loadu_ps(x + i * ldx + k);
          xo[i] = _mm512_loadu_ps(x + i * ldx + k + 16);
        }
        for (int r = 0; r < R; ++r) {
          const __m512i pairs = _mm512_loadu_si512(wr[r] + k);
          const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
          const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_halves));
          for (int i = 0; i < M; ++i) {
            acc[i][r] = _mm512_fmadd_ps(xe[i], even, acc[i][r]);
            acc[i][r] = _mm512_fmadd_ps(xo[i], odd, acc[i][r]);
          }
        }
      } else {
        // Many rows of x: keep the widened weights in registers instead.
        __m512 even[R], odd[R];
        for (int r = 0; r < R; ++r) {
          const __m512i pairs = _mm512_loadu_si512(wr[r] + k);
          even[r] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
          odd[r] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_halves));
        }
        for (int i = 0; i < M; ++i) {
          const __m512 xe = _mm512_loadu_ps(x + i * ldx + k);
          const __m512 xo = _mm512_loadu_ps(x + i * ldx + k + 16);
          for (int r = 0; r < R; ++r) {
            acc[i][r] = _mm512_fmadd_ps(xe, even[r], acc[i][r]);
            acc[i][r] = _mm512_fmadd_ps(xo, odd[r], acc[i][r]);
          }
        }
      }
    }
  } else {
    for (; k + 32 <= cols; k += 32) {
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(ahead(r, k), _MM_HINT_T1);
        _mm_prefetch(ahead(r, k + 16), _MM_HINT_T1);
      }
#pragma GCC unroll 2
      for (int64_t kk = k; kk < k + 32; kk += 16) {
        __m512 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = Load16(wr[r] + kk);
        for (int i = 0; i < M; ++i) {
          const __m512 xv = _mm512_loadu_ps(x + i * ldx + kk);
          for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
        }
      }
    }
  }
  for (; k < cols; k += 16) {
    const __mmask16 mask = TailMask(cols - k);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = Load16(wr[r] + k, mask);
    for (int i = 0; i < M; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * ldx + k);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int r = 0; r < R; ++r) {
      const float sum = _mm512_reduce_add_ps(acc[i][r]);
      float& out = y[i * ldy + r];
      out = accumulate ? out + sum : sum;
    }
  }
}

// Weight rows read side by side for M rows of x: enough accumulators (M * R) to hide
// FMA latency and keep several streams in flight, few enough to stay in 32 registers.
template <int M>
constexpr int GemvRowsPerBlock() {
  return M <= 2 ? 8 : M == 3 ? 6 : M <= 5 ? 4 : M <= 7 ? 3 : 2;
}

template <int M, typename W>
EPIC_AVX512 void GemvRows(const float* x, int64_t ldx, const W* w, int64_t stride,
                          int64_t cols, int64_t n_begin, int64_t n_end, float* y,
                          int64_t ldy, bool accumulate) {
  constexpr int R = GemvRowsPerBlock<M>();
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) {
    GemvBlock<M, R>(x, ldx, w + n * stride, stride, cols, y + n, ldy, accumulate);
  }
  for (; n < n_end; ++n) {
    GemvBlock<M, 1>(x, ldx, w + n * stride, stride, cols, y + n, ldy, accumulate);
  }
}

// Rows of x in groups of up to 8, each against weight rows [n_begin, n_end).
template <typename W>
void GemvGroups(const float* x, int64_t m, int64_t ldx, const W* w, int64_t stride,
                int64_t cols, int64_t n_begin, int64_t n_end, float* y, int64_t ldy,
                bool accumulate) {
  for (int64_t i0 = 0; i0 < m; i0 += 8) {
    const float* xg = x + i0 * ldx;
    float* yg = y + i0 * ldy;
    switch (std::min<int64_t>(8, m - i0)) {
      case 1: GemvRows<1>(xg, ldx, w, stride, cols, n_begin, n_end, yg, ldy, accumulate); break;
      case 2: GemvRows<2>(xg, ldx, w, stride, cols, n_begin, n_end, yg, ldy, accumulate); break;
      case 3: GemvRows<3>(xg, ldx, w, stride, cols, n_begin, n_end, yg, ldy, accumulate); break;
      case 4: GemvRows<4>(xg, ldx, w, stride, cols, n_begin, n_end, yg, ldy, accumulate); break;
      case 5: GemvRows<5>(xg, ldx, w, stride, cols, n_begin, n_end, yg, ldy, accumulate); break;
      case 6: GemvRows<6>(xg, ldx, w, stride, cols, n_begin, n_end, yg, ldy, accumulate); break;
      case 7: GemvRows<7>(xg, ldx, w, stride, cols, n_begin, n_end, yg, ldy, accumulate); break;
      default: GemvRows<8>(xg, ldx, w, stride, cols, n_begin, n_end, yg, ldy, accumulate); break;
    }
  }
}

// Weight rows are split across threads in units of kGemvRowUnit (a multiple of every
// GemvRowsPerBlock) and, with more than one group of x, walked in chunks of about
// kGemvChunkBytes that stay in L2 while every group of x passes over them.
constexpr int64_t kGemvRowUnit = 24;
constexpr int64_t kGemvChunkBytes = 256 << 10;

template <typename W>
void GemvAvx512(const float* x, int64_t m, int64_t ldx, const W* w, int64_t stride,
                int64_t rows, int64_t cols, float* y, int64_t ldy, bool accumulate) {
  if constexpr (sizeof(W) == 2) {
    float* xp = ThreadScratch(kPermutedX, m * cols);
    PermuteActivations(x, m, ldx, cols, xp);
    x = xp;
    ldx = cols;
  }
  const int64_t units = (rows + kGemvRowUnit - 1) / kGemvRowUnit;
  const int64_t chunk =
      m <= 8 ? rows
             : std::max<int64_t>(1, kGemvChunkBytes / (cols * static_cast<int64_t>(sizeof(W))) /
                                        kGemvRowUnit) *
                   kGemvRowUnit;
  const int threads = static_cast<int>(
      std::min<int64_t>(units, TeamSize(static_cast<double>(rows) * cols * (m + 1))));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int64_t u0, u1;
    SplitRange(units, omp_get_num_threads(), omp_get_thread_num(), &u0, &u1);
    const int64_t end = std::min(rows, u1 * kGemvRowUnit);
    for (int64_t n0 = u0 * kGemvRowUnit; n0 < end; n0 += chunk) {
      GemvGroups(x, m, ldx, w, stride, cols, n0, std::min(end, n0 + chunk), y, ldy, accumulate);
    }
  }
}

// --- Prefill: packed GEMM. ---

// In-register transpose of a 16 x 16 F32 tile: v[r][c] -> v[c][r].
EPIC_AVX512_INLINE void Transpose16x16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  // Within each 128-bit lane L, v[4i + j] now holds column 4L + j of rows 4i..4i+3.
  for (int i = 0; i < 4; ++i) {
    v[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    v[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    v[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    v[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  __m512 out[16];
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(v[j], v[4 + j], 0x88);
    const __m512 b = _mm512_shuffle_f32x4(v[j], v[4 + j], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(v[8 + j], v[12 + j], 0x88);
    const __m512 d = _mm512_shuffle_f32x4(v[8 + j], v[12 + j], 0xDD);
    out[j] = _mm512_shuffle_f32x4(a, c, 0x88);
    out[8 + j] = _mm512_shuffle_f32x4(a, c, 0xDD);
    out[4 + j] = _mm512_shuffle_f32x4(b, d, 0x88);
    out[12 + j] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
  for (int i = 0; i < 16; ++i) v[i] = out[i];
}

// Packs weights rows [n0, n0 + nc), columns [k0, k0 + kc) into panels of kNR output
// columns, each [kc][kNR] F32 with zeros past nc: packed[p][k][j] = w[n0 + p*kNR + j, k0 + k].
template <typename W>
EPIC_AVX512 void PackWeights(const W* w, int64_t stride, int64_t n0, int64_t nc, int64_t k0,
                             int64_t kc, float* packed) {
  for (int64_t p = 0; p * kNR < nc; ++p) {
    float* panel = packed + p * kc * kNR;
    for (int g = 0; g < kNR / 16; ++g) {
      const int64_t row0 = p * kNR + g * 16;  // relative to n0
      const int64_t valid_rows = std::clamp<int64_t>(nc - row0, 0, 16);
      for (int64_t k = 0; k < kc; k += 16) {
        const int64_t valid_k = std::min<int64_t>(16, kc - k);
        const __mmask16 mask = TailMask(valid_k);
        __m512 v[16];
        for (int r = 0; r < 16; ++r) {
          v[r] = r < valid_rows ? Load16(w + (n0 + row0 + r) * stride + k0 + k, mask)
                                : _mm512_setzero_ps();
        }
        Transpose16x16(v);
        for (int64_t c = 0; c < valid_k; ++c) {
          _mm512_storeu_ps(panel + (k + c) * kNR + g * 16, v[c]);
        }
      }
    }
  }
}

// Packs rows [i0, i0 + mc) of x, columns [0, cols), into panels of kMR rows, each
// [cols][kMR] with zeros past mc: packed[p][k][r] = x[i0 + p*kMR + r, k].
void PackActivations(const float* x, int64_t ldx, int64_t i0, int64_t mc, int64_t cols,
                     float* packed) {
  for (int64_t p = 0; p * kMR < mc; ++p) {
    float* panel = packed + p * cols * kMR;
    const int64_t valid_rows = std::min<int64_t>(kMR, mc - p * kMR);
    for (int64_t r = 0; r < kMR; ++r) {
      if (r < valid_rows) {
        const float* xr = x + (i0 + p * kMR + r) * ldx;
        for (int64_t k = 0; k < cols; ++k) panel[k * kMR + r] = xr[k];
      } else {
        for (int64_t k = 0; k < cols; ++k) panel[k * kMR + r] = 0.0f;
      }
    }
  }
}

// y[0..MR, 0..nr) (+)= xp[kc][kMR] * wp[kc][kNR]. The first MR rows of the x panel are used.
template <int MR>
EPIC_AVX512 void MicroKernel(const float* xp, const float* wp, int64_t kc, float* y,
                             int64_t ldy, int nr, bool add) {
  __m512 c[MR][3];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 3; ++j) c[r][j] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(wp);
    const __m512 b1 = _mm512_loadu_ps(wp + 16);
    const __m512 b2 = _mm512_loadu_ps(wp + 32);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(xp[r]);
      c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
      c[r][2] = _mm512_fmadd_ps(a, b2, c[r][2]);
    }
    xp += kMR;
    wp += kNR;
  }
  const __mmask16 masks[3] = {TailMask(nr), TailMask(std::max(0, nr - 16)),
                              TailMask(std::max(0, nr - 32))};
  for (int r = 0; r < MR; ++r) {
    float* yr = y + r * ldy;
    for (int j = 0; j < 3; ++j) {
      if (masks[j] == 0) continue;
      __m512 v = c[r][j];
      if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], yr + 16 * j));
      _mm512_mask_storeu_ps(yr + 16 * j, masks[j], v);
    }
  }
}

using MicroKernelFn = void (*)(const float*, const float*, int64_t, float*, int64_t, int, bool);
constexpr MicroKernelFn kMicroKernels[kMR + 1] = {
    nullptr,         MicroKernel<1>, MicroKernel<2>, MicroKernel<3>, MicroKernel<4>,
    MicroKernel<5>, MicroKernel<6>, MicroKernel<7>, MicroKernel<8>};

// One thread's share: rows [i_begin, i_end) of x and y, output columns [n_begin, n_end).
template <typename W>
EPIC_AVX512 void GemmTile(const float* x, int64_t ldx, const W* w, int64_t stride,
                          int64_t cols, int64_t i_begin, int64_t i_end, int64_t n_begin,
                          int64_t n_end, float* y, int64_t ldy, bool accumulate) {
  if (i_begin >= i_end || n_begin >= n_end) return;
  const int64_t chunk_rows = std::clamp<int64_t>(
      kXPackBytes / (cols * static_cast<int64_t>(sizeof(float))) / kMR * kMR, kMR, 1024);
  float* xpack =
      ThreadScratch(kPackedX, std::min(chunk_rows, (i_end - i_begin + kMR - 1) / kMR * kMR) * cols);
  float* wpack = ThreadScratch(kPackedW, kKC * kNC);
  for (int64_t i0 = i_begin; i0 < i_end; i0 += chunk_rows) {
    const int64_t mc = std::min(chunk_rows, i_end - i0);
    PackActivations(x, ldx, i0, mc, cols, xpack);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kNC) {
      const int64_t nc = std::min(kNC, n_end - n0);
      for (int64_t k0 = 0; k0 < cols; k0 += kKC) {
        const int64_t kc = std::min(kKC, cols - k0);
        PackWeights(w, stride, n0, nc, k0, kc, wpack);
        const bool add = accumulate || k0 > 0;
        for (int64_t p = 0; p * kMR < mc; ++p) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, mc - p * kMR));
          const float* xp = xpack + p * cols * kMR + k0 * kMR;
          float* yp = y + (i0 + p * kMR) * ldy + n0;
          const MicroKernelFn kernel = kMicroKernels[mr];
          for (int64_t q = 0; q * kNR < nc; ++q) {
            const int nr = static_cast<int>(std::min<int64_t>(kNR, nc - q * kNR));
            kernel(xp, wpack + q * kc * kNR, kc, yp + q * kNR, ldy, nr, add);
          }
        }
      }
    }
  }
}

template <typename W>
void GemmAvx512(const float* x, int64_t m, int64_t ldx, const W* w, int64_t stride,
                int64_t rows, int64_t cols, float* y, int64_t ldy, bool accumulate) {
  const int threads = TeamSize(static_cast<double>(m) * rows * cols);
  // Split the output columns (in units of 16, one vector) across threads; when there
  // are fewer units than threads, split the rows of x as well.
  const int64_t units = (rows + 15) / 16;
  const int col_parts = static_cast<int>(std::min<int64_t>(threads, units));
  const int row_parts = std::max(1, threads / col_parts);
  const int64_t panels = (m + kMR - 1) / kMR;
#pragma omp parallel num_threads(col_parts * row_parts) if (col_parts * row_parts > 1)
  {
    const int t = omp_get_thread_num();
    if (t < col_parts * row_parts) {
      int64_t u0, u1, p0, p1;
      SplitRange(units, col_parts, t % col_parts, &u0, &u1);
      SplitRange(panels, row_parts, t / col_parts, &p0, &p1);
      GemmTile(x, ldx, w, stride, cols, p0 * kMR, std::min(m, p1 * kMR), u0 * 16,
               std::min(rows, u1 * 16), y, ldy, accumulate);
    }
  }
}

// --- MatMulNoTrans: y[i, k] = sum_n x[i, n] w[n, k], axpy form along k. ---

constexpr int kNoTransRows = 6;     // rows of x per block
constexpr int64_t kNoTransCols = 64;  // output columns per block (4 vectors)

template <int MI, typename W>
EPIC_AVX512 void NoTransBlock(const float* x, int64_t ldx, const W* w, int64_t stride,
                              int64_t rows, int64_t k0, int64_t kw, float* y, int64_t ldy,
                              bool accumulate) {
  __m512 c[MI][4];
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < 4; ++j) c[i][j] = _mm512_setzero_ps();
  const __mmask16 masks[4] = {TailMask(kw), TailMask(std::max<int64_t>(0, kw - 16)),
                              TailMask(std::max<int64_t>(0, kw - 32)),
                              TailMask(std::max<int64_t>(0, kw - 48))};
  for (int64_t n = 0; n < rows; ++n) {
    const W* wr = w + n * stride + k0;
    __m512 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = Load16(wr + 16 * j, masks[j]);
    for (int i = 0; i < MI; ++i) {
      const __m512 a = _mm512_set1_ps(x[i * ldx + n]);
      for (int j = 0; j < 4; ++j) c[i][j] = _mm512_fmadd_ps(a, wv[j], c[i][j]);
    }
  }
  for (int i = 0; i < MI; ++i) {
    float* yr = y + i * ldy + k0;
    for (int j = 0; j < 4; ++j) {
      if (masks[j] == 0) continue;
      __m512 v = c[i][j];
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], yr + 16 * j));
      _mm512_mask_storeu_ps(yr + 16 * j, masks[j], v);
    }
  }
}

template <typename W>
void NoTransAvx512(const float* x, int64_t m, int64_t ldx, const W* w, int64_t stride,
                   int64_t rows, int64_t cols, float* y, int64_t ldy, bool accumulate) {
  using BlockFn = void (*)(const float*, int64_t, const W*, int64_t, int64_t, int64_t,
                           int64_t, float*, int64_t, bool);
  static constexpr BlockFn kBlocks[kNoTransRows + 1] = {
      nullptr,           NoTransBlock<1, W>, NoTransBlock<2, W>, NoTransBlock<3, W>,
      NoTransBlock<4, W>, NoTransBlock<5, W>, NoTransBlock<6, W>};
  const int64_t row_blocks = (m + kNoTransRows - 1) / kNoTransRows;
  const int64_t col_blocks = (cols + kNoTransCols - 1) / kNoTransCols;
  const int threads = TeamSize(static_cast<double>(m) * rows * cols);
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t cb = 0; cb < col_blocks; ++cb) {
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      const int64_t i0 = rb * kNoTransRows;
      const int mi = static_cast<int>(std::min<int64_t>(kNoTransRows, m - i0));
      const int64_t k0 = cb * kNoTransCols;
      kBlocks[mi](x + i0 * ldx, ldx, w, stride, rows, k0, std::min(kNoTransCols, cols - k0),
                  y + i0 * ldy, ldy, accumulate);
    }
  }
}

// ---------------------------------------------------------------------------------

bool DetectAvx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

// Zeroes y[0..m, 0..n) unless accumulating: the product over an empty inner dimension.
void ZeroOutput(int64_t m, int64_t n, float* y, int64_t ldy, bool accumulate) {
  if (accumulate) return;
  for (int64_t i = 0; i < m; ++i) std::fill(y + i * ldy, y + i * ldy + n, 0.0f);
}

template <typename W>
void MatMulTyped(const float* x, int64_t m, int64_t ldx, const W* w, int64_t stride,
                 int64_t rows, int64_t cols, float* y, int64_t ldy, bool accumulate) {
  if (internal::HaveAvx512()) {
    if (m <= (sizeof(W) == 2 ? kGemvMaxRowsBf16 : kGemvMaxRows)) {
      GemvAvx512(x, m, ldx, w, stride, rows, cols, y, ldy, accumulate);
    } else {
      GemmAvx512(x, m, ldx, w, stride, rows, cols, y, ldy, accumulate);
    }
    return;
  }
  const int threads = TeamSize(static_cast<double>(m) * rows * cols);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int64_t n0, n1;
    SplitRange(rows, omp_get_num_threads(), omp_get_thread_num(), &n0, &n1);
    MatMulPlainRows(x, m, ldx, w, stride, cols, n0, n1, y, ldy, accumulate);
  }
}

template <typename W>
void MatMulNoTransTyped(const float* x, int64_t m, int64_t ldx, const W* w, int64_t stride,
                        int64_t rows, int64_t cols, float* y, int64_t ldy, bool accumulate) {
  if (internal::HaveAvx512()) {
    NoTransAvx512(x, m, ldx, w, stride, rows, cols, y, ldy, accumulate);
    return;
  }
  const int threads = TeamSize(static_cast<double>(m) * rows * cols);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int64_t k0, k1;
    SplitRange(cols, omp_get_num_threads(), omp_get_thread_num(), &k0, &k1);
    MatMulNoTransPlainCols(x, m, ldx, w, stride, rows, k0, k1, y, ldy, accumulate);
  }
}

}  // namespace

void MatMul(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
            int64_t ldy, bool accumulate) {
  if (m <= 0 || w.rows <= 0) return;
  if (w.cols <= 0) return ZeroOutput(m, w.rows, y, ldy, accumulate);
  if (w.type == WeightType::kBF16) {
    MatMulTyped(x, m, ldx, static_cast<const Bf16*>(w.data), w.row_stride, w.rows, w.cols, y,
                ldy, accumulate);
  } else {
    MatMulTyped(x, m, ldx, static_cast<const float*>(w.data), w.row_stride, w.rows, w.cols,
                y, ldy, accumulate);
  }
}

void MatMulNoTrans(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
                   int64_t ldy, bool accumulate) {
  if (m <= 0 || w.cols <= 0) return;
  if (w.rows <= 0) return ZeroOutput(m, w.cols, y, ldy, accumulate);
  if (w.type == WeightType::kBF16) {
    MatMulNoTransTyped(x, m, ldx, static_cast<const Bf16*>(w.data), w.row_stride, w.rows,
                       w.cols, y, ldy, accumulate);
  } else {
    MatMulNoTransTyped(x, m, ldx, static_cast<const float*>(w.data), w.row_stride, w.rows,
                       w.cols, y, ldy, accumulate);
  }
}

namespace internal {

bool HaveAvx512() {
  static const bool have = DetectAvx512();
  return have;
}

void MatMulPlain(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
                 int64_t ldy, bool accumulate) {
  if (m <= 0 || w.rows <= 0) return;
  if (w.cols <= 0) return ZeroOutput(m, w.rows, y, ldy, accumulate);
  if (w.type == WeightType::kBF16) {
    MatMulPlainRows(x, m, ldx, static_cast<const Bf16*>(w.data), w.row_stride, w.cols, 0,
                    w.rows, y, ldy, accumulate);
  } else {
    MatMulPlainRows(x, m, ldx, static_cast<const float*>(w.data), w.row_stride, w.cols, 0,
                    w.rows, y, ldy, accumulate);
  }
}

void MatMulNoTransPlain(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w,
                        float* y, int64_t ldy, bool accumulate) {
  if (m <= 0 || w.cols <= 0) return;
  if (w.rows <= 0) return ZeroOutput(m, w.cols, y, ldy, accumulate);
  if (w.type == WeightType::kBF16) {
    MatMulNoTransPlainCols(x, m, ldx, static_cast<const Bf16*>(w.data), w.row_stride, w.rows,
                           0, w.cols, y, ldy, accumulate);
  } else {
    MatMulNoTransPlainCols(x, m, ldx, static_cast<const float*>(w.data), w.row_stride, w.rows,
                           0, w.cols, y, ldy, accumulate);
  }
}

double MicroKernelInCacheGflops(int threads, double seconds) {
  // Per thread: one x panel [kKC][kMR] (L1) against a packed weight block [kKC][kNC]
  // (L2), exactly the inner loops of GemmTile without the packing.
  double total_flops = 0;
  double elapsed = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total_flops) reduction(max : elapsed)
  {
    float* xp = ThreadScratch(kPackedX, kKC * kMR);
    float* wp = ThreadScratch(kPackedW, kKC * kNC);
    for (int64_t i = 0; i < kKC * kMR; ++i) xp[i] = 1.0f + 1e-3f * static_cast<float>(i % 7);
    for (int64_t i = 0; i < kKC * kNC; ++i) wp[i] = 1e-3f * static_cast<float>(i % 5);
    auto y = std::make_unique<float[]>(kMR * kNC);
    std::fill(y.get(), y.get() + kMR * kNC, 0.0f);
    const auto start = std::chrono::steady_clock::now();
    double flops = 0;
    double spent = 0;
    while (spent < seconds) {
      for (int rep = 0; rep < 16; ++rep) {
        for (int64_t q = 0; q < kNC / kNR; ++q) {
          MicroKernel<kMR>(xp, wp + q * kKC * kNR, kKC, y.get() + q * kNR, kNC, kNR, true);
        }
      }
      flops += 16.0 * 2.0 * kMR * kNC * kKC;
      spent = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    total_flops += flops;
    elapsed = spent;
  }
  return total_flops / elapsed * 1e-9;
}

}  // namespace internal

}  // namespace epic::cpu
