// CPU matrix products with weights read in place (BF16 or F32) and exact F32 activations.
//
// Two regimes, chosen by the number of activation rows m:
//  - m <= kGemvMaxRows (decode): memory-bound. Each weight row is streamed once for all
//    m rows of x; several weight rows are read side by side, BF16 is widened to F32 with
//    a shift and a mask, FMAs go into m x R vector accumulators that are reduced
//    horizontally once at the end. Threads split the weight rows. (BF16 with a few more
//    rows of x takes the same path in groups of 4 over L2-resident chunks of weights, and
//    with more rows on AMD Zen's AVX-512: see kDotBlockRows.)
//  - larger m (prefill): compute-bound. A block of weights [kKC x kNC] is widened and
//    transposed into panels of kNR output columns, x into panels of kMR rows, and a
//    kMR x kNR register-blocked micro-kernel broadcasts x and FMAs packed weight vectors.
//    Threads split the output columns (or the rows of x when there are few columns).
// Both are written once (matmul_simd.inc) over a traits struct and compiled for AVX-512
// and for AVX2+FMA with target attributes; the widest that ActiveIsa() allows runs, and
// the plain C++ path serves processors with neither.
#include "kernels/cpu/matmul.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <utility>

#include "common/half.h"
#include "common/scratch_buffer.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/intrinsics.h"
#include "kernels/cpu/matmul_int8.h"
#include "kernels/cpu/matmul_internal.h"
#include "kernels/cpu/parallel.h"

namespace epic::cpu {

WeightMatrix WeightMatrix::Rows(int64_t begin, int64_t count) const {
  WeightMatrix view = *this;
  if (type == WeightType::kI8) {
    // A view starts at a panel (matmul_int8.h).
    if (begin % internal::kInt8PanelRows != 0) {
      std::fprintf(stderr, "epic: rows of an int8 matrix from %lld: not a multiple of 16\n",
                   static_cast<long long>(begin));
      std::abort();
    }
    view.data = static_cast<const char*>(data) + begin * row_stride;
    view.scales = scales + begin;
  } else {
    view.data = static_cast<const char*>(data) + begin * row_stride * ElementBytes();
  }
  view.rows = count;
  return view;
}

WeightMatrix WeightMatrix::Cols(int64_t begin, int64_t count) const {
  if (type == WeightType::kI8) {
    std::fprintf(stderr, "epic: a column view of an int8 matrix (its rows' scales cover every column)\n");
    std::abort();
  }
  WeightMatrix view = *this;
  view.data = static_cast<const char*>(data) + begin * ElementBytes();
  view.cols = count;
  return view;
}

int64_t WeightMatrix::Bytes() const {
  if (type == WeightType::kI8) return QuantizedBytes(rows, cols);
  return rows * row_stride * ElementBytes();
}

float WeightMatrix::At(int64_t r, int64_t c) const {
  if (type == WeightType::kI8) {
    const uint8_t stored = static_cast<const uint8_t*>(data)[internal::Int8Index(row_stride, r, c)];
    return static_cast<float>(int{stored} - internal::kInt8Offset) * scales[r];
  }
  const int64_t index = r * row_stride + c;
  if (type == WeightType::kBF16) return Bf16ToFloat(static_cast<const uint16_t*>(data)[index]);
  return static_cast<const float*>(data)[index];
}

namespace {

using Bf16 = uint16_t;

// Decode path (dot products, weights streamed once per group of 4 rows of x) up to this
// many rows of x; the packed GEMM beyond. BF16 weights stay on the decode path longer
// because widening them there is cheap while the GEMM pays a transposing pack, which at
// m = 16 costs more than the re-reads of L2-resident weight chunks (measured on Zen 4).
constexpr int64_t kGemvMaxRows = 8;
constexpr int64_t kGemvMaxRowsBf16 = 24;
// On AMD's Zen 4, whose AVX-512 runs in 256-bit halves, the AVX-512 decode path beat the
// packed GEMM on BF16 weights at every m measured (9 to 512 rows of x, one and two
// threads: 1.1-1.2x, ~95% of the FMA rate) and runs them all, in blocks of this many rows
// of x, which stay in L2/L3 while the weights stream past (x whole at 2048 rows ran 0.83x
// the GEMM). With AVX2 the GEMM stays ahead from 32 rows.
constexpr int64_t kDotBlockRows = 256;
// On Zen 5 (full-width AVX-512) the decode path runs products of up to this many rows of
// x: exact 512-token prefill 1.10-1.13x on both shapes with it at 64, 128 or 256 (the
// experts' products, of 19-48 rows); at every m, 0.96x on V2-Lite's shape.
constexpr int64_t kDotMaxRowsZen5 = 256;
// Threads split such a product by blocks of x's rows when the weights fit in L2 or each
// thread has this many rows; else by weight rows (see MatMulTyped).
constexpr int64_t kDotL2Bytes = 1 << 20;
constexpr int64_t kDotMinRowsEach = 128;

// Decode: weight rows are split across threads in units of kGemvRowUnit (a multiple of
// every GemvRowsPerBlock) and, with more than one group of x, walked in chunks of about
// kGemvChunkBytes that stay in L2 while every group of x passes over them.
constexpr int64_t kGemvRowUnit = 24;
constexpr int64_t kGemvChunkBytes = 256 << 10;
// Prefetch distance for the weight streams, in bytes ahead of the loads. Into L2 (T1):
// prefetching 8 streams x 1 KiB into L1 thrashes it and measured slower than none. 2 KiB
// rather than 1: with 4 rows of x a step takes long enough that 1 KiB ahead came too
// late (Zen 4, weights from DRAM, 2 threads: 28 -> 33 GB/s with 4 rows, 19 -> 21 with 8,
// one row unchanged). With one row of x on Zen 5, a quarter of that (see
// GemvPrefetchBytes).
constexpr int64_t kGemvPrefetchBytes = 2048;

// The prefetch distance of a GEMV over M rows of x: on Zen 5 one row's steps are short
// and its prefetches ran 512 bytes ahead best (exact decode, A B B A: small experts
// x1.06-1.10, V2-Lite's shape x1.01-1.03; batched B=4 and 16 x1.01-1.06 with the groups
// of 4 rows kept at 2 KiB; every M at 512 bytes, V2-Lite's B=4 0.97; 256 bytes 0.99 of
// 512).
int64_t GemvPrefetchBytes(int m) {
  static const bool zen5 = AmdZenAvx512() == 5;
  return m == 1 && zen5 ? 512 : kGemvPrefetchBytes;
}

// Packed GEMM blocking. The x panel [kKC][kMR] (8 KiB for AVX-512's 8 rows) stays in L1
// while the micro-kernel runs over the weight panels of the packed block [kKC x kNC]
// (384 KiB, L2); kNC is kGemmBlockCols rounded down to whole panels.
constexpr int64_t kKC = 256;
constexpr int64_t kGemmBlockCols = 384;
// Bytes of packed x kept per thread; rows of x beyond it are handled in chunks.
constexpr int64_t kXPackBytes = 4 << 20;

using internal::SplitRange;
using internal::TeamSize;

template <typename W>
inline float Widen(W v) {
  if constexpr (sizeof(W) == 2) {
    return Bf16ToFloat(v);
  } else {
    return v;
  }
}

// Per-thread scratch buffers (common/scratch_buffer.h).
enum ScratchSlot { kPackedX, kPackedW, kPermutedX, kScratchSlots };

float* ThreadScratch(ScratchSlot slot, int64_t floats) {
  thread_local epic::ScratchBuffer buffers[kScratchSlots];
  return static_cast<float*>(buffers[slot].Get(floats * static_cast<int64_t>(sizeof(float))));
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
// Vector paths: one traits struct per instruction set, and matmul_simd.inc (kernels,
// blocking, threading) compiled once over each. Every function that touches vectors
// carries its set's target attribute, so the binary runs on any x86-64 and each path is
// taken only where ActiveIsa() allows it.

#define EPIC_AVX512_OP __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))

struct Avx512 {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kRegisters = 32;
  // GEMM register tile: kMR rows of x by kNV vectors of outputs (8 x 48: 24 accumulators,
  // 3 weight vectors, 1 broadcast).
  static constexpr int kMR = 8;
  static constexpr int kNV = 3;
  // MatMulNoTrans block: 6 rows of x by 4 vectors (64 outputs).
  static constexpr int kNoTransRows = 6;
  static constexpr int kNoTransVecs = 4;
  // Weight rows read side by side for m rows of x: enough accumulators (m * R) to hide
  // FMA latency and keep several streams in flight, few enough to stay in registers.
  static constexpr int GemvRowsPerBlock(int m) {
    return m <= 2 ? 8 : m == 3 ? 6 : 4;
  }

  EPIC_AVX512_OP static __mmask16 Mask(int64_t count) { return FirstLanes(count); }
  EPIC_AVX512_OP static Vec Zero() { return _mm512_setzero_ps(); }
  EPIC_AVX512_OP static Vec Set1(float v) { return _mm512_set1_ps(v); }
  EPIC_AVX512_OP static Vec Load(const float* p) { return _mm512_loadu_ps(p); }
  // BF16 is the top half of an F32: zero-extend and shift.
  EPIC_AVX512_OP static Vec Load(const Bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // The first `count` (<= kLanes) elements, zeros after; nothing past them is read.
  EPIC_AVX512_OP static Vec LoadPart(const float* p, int64_t count) {
    return _mm512_maskz_loadu_ps(Mask(count), p);
  }
  EPIC_AVX512_OP static Vec LoadPart(const Bf16* p, int64_t count) {
    const __m256i h = _mm256_maskz_loadu_epi16(Mask(count), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // kLanes pairs of BF16: the even elements and the odd ones, widened.
  EPIC_AVX512_OP static void LoadPairs(const Bf16* p, Vec* even, Vec* odd) {
    const __m512i pairs = _mm512_loadu_si512(p);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    *odd = _mm512_castsi512_ps(
        _mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  EPIC_AVX512_OP static void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  EPIC_AVX512_OP static void StorePart(float* p, Vec v, int64_t count) {
    _mm512_mask_storeu_ps(p, Mask(count), v);
  }
  EPIC_AVX512_OP static Vec Fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  EPIC_AVX512_OP static Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  EPIC_AVX512_OP static float ReduceAdd(Vec v) { return _mm512_reduce_add_ps(v); }
  // OUT[j] = the sum of V[j]'s lanes, j < N <= 16: a tree of 45 adds and shuffles for
  // all sixteen where one reduction each takes about ten.
  EPIC_AVX512_OP static void ReduceEach(const Vec* v, int n, float* out) {
    Vec a[16];
    for (int j = 0; j < 16; ++j) a[j] = j < n ? v[j] : Zero();
    // Pairs fold 512 bits to 256: c[i] holds 8 partials of a[2i], then 8 of a[2i+1].
    Vec c[8];
    for (int i = 0; i < 8; ++i) {
      c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    }
    // 128-bit lane q of e[j] holds 4 partials of a[4j + q].
    Vec e[4];
    for (int j = 0; j < 4; ++j) {
      e[j] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0x88),
                           _mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0xDD));
    }
    // Lane q of g[k]: 2 partials of a[8k + q], then 2 of a[8k + 4 + q].
    Vec g[2];
    for (int k = 0; k < 2; ++k) {
      g[k] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * k], e[2 * k + 1], 0x44),
                           _mm512_shuffle_ps(e[2 * k], e[2 * k + 1], 0xEE));
    }
    // Element 4q + t: the sum of a[4t + q]; one permutation puts a[j] at j.
    const Vec h = _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], 0x88), _mm512_shuffle_ps(g[0], g[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_mask_storeu_ps(out, Mask(n), _mm512_permutexvar_ps(order, h));
  }

  // In-register transpose of a 16 x 16 tile: v[r][c] -> v[c][r].
  EPIC_AVX512_OP static void Transpose(Vec v[16]) {
    Vec t[16];
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
    Vec out[16];
    for (int j = 0; j < 4; ++j) {
      const Vec a = _mm512_shuffle_f32x4(v[j], v[4 + j], 0x88);
      const Vec b = _mm512_shuffle_f32x4(v[j], v[4 + j], 0xDD);
      const Vec c = _mm512_shuffle_f32x4(v[8 + j], v[12 + j], 0x88);
      const Vec d = _mm512_shuffle_f32x4(v[8 + j], v[12 + j], 0xDD);
      out[j] = _mm512_shuffle_f32x4(a, c, 0x88);
      out[8 + j] = _mm512_shuffle_f32x4(a, c, 0xDD);
      out[4 + j] = _mm512_shuffle_f32x4(b, d, 0x88);
      out[12 + j] = _mm512_shuffle_f32x4(b, d, 0xDD);
    }
    for (int i = 0; i < 16; ++i) v[i] = out[i];
  }
};

#define EPIC_AVX2_OP __attribute__((target("avx2,fma"), always_inline))

struct Avx2 {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kRegisters = 16;
  // 6 x 16 (BLIS's Haswell tile): 12 accumulators, 2 weight vectors, 1 broadcast.
  static constexpr int kMR = 6;
  static constexpr int kNV = 2;
  static constexpr int kNoTransRows = 6;
  static constexpr int kNoTransVecs = 2;
  static constexpr int GemvRowsPerBlock(int m) {
    return m == 1 ? 8 : m == 2 ? 4 : m <= 4 ? 2 : 1;
  }

  EPIC_AVX2_OP static __m256i Mask(int64_t count) { return FirstLanes8(count); }
  EPIC_AVX2_OP static Vec Zero() { return _mm256_setzero_ps(); }
  EPIC_AVX2_OP static Vec Set1(float v) { return _mm256_set1_ps(v); }
  EPIC_AVX2_OP static Vec Load(const float* p) { return _mm256_loadu_ps(p); }
  EPIC_AVX2_OP static Vec Load(const Bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  EPIC_AVX2_OP static Vec LoadPart(const float* p, int64_t count) {
    if (count >= kLanes) return Load(p);
    return _mm256_maskload_ps(p, Mask(count));
  }
  // AVX2 has no 16-bit masked load: a short tail goes through a zeroed copy.
  EPIC_AVX2_OP static Vec LoadPart(const Bf16* p, int64_t count) {
    if (count >= kLanes) return Load(p);
    Bf16 tail[kLanes] = {};
    std::memcpy(tail, p, static_cast<size_t>(count) * sizeof(Bf16));
    return Load(tail);
  }
  EPIC_AVX2_OP static void LoadPairs(const Bf16* p, Vec* even, Vec* odd) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    *odd = _mm256_castsi256_ps(
        _mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  EPIC_AVX2_OP static void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  EPIC_AVX2_OP static void StorePart(float* p, Vec v, int64_t count) {
    if (count >= kLanes) return Store(p, v);
    _mm256_maskstore_ps(p, Mask(count), v);
  }
  EPIC_AVX2_OP static Vec Fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  EPIC_AVX2_OP static Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  EPIC_AVX2_OP static float ReduceAdd(Vec v) { return ReduceAdd8(v); }
  EPIC_AVX2_OP static void ReduceEach(const Vec* v, int n, float* out) {
    for (int j = 0; j < n; ++j) out[j] = ReduceAdd(v[j]);
  }

  // In-register transpose of an 8 x 8 tile: v[r][c] -> v[c][r].
  EPIC_AVX2_OP static void Transpose(Vec v[8]) {
    Vec t[8], s[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    // Within each 128-bit half H, s[4i + j] now holds column 4H + j of rows 4i..4i+3.
    for (int i = 0; i < 2; ++i) {
      s[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
      s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
      s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x20);
      v[4 + j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x31);
    }
  }
};

namespace avx512 {
using V = Avx512;
#define EPIC_SIMD __attribute__((target("avx512f,avx512bw,avx512vl")))
#include "kernels/cpu/matmul_simd.inc"
#undef EPIC_SIMD
}  // namespace avx512

namespace avx2 {
using V = Avx2;
#define EPIC_SIMD __attribute__((target("avx2,fma")))
#include "kernels/cpu/matmul_simd.inc"
#undef EPIC_SIMD
}  // namespace avx2

// ---------------------------------------------------------------------------------

// Zeroes y[0..m, 0..n) unless accumulating: the product over an empty inner dimension.
void ZeroOutput(int64_t m, int64_t n, float* y, int64_t ldy, bool accumulate) {
  if (accumulate) return;
  for (int64_t i = 0; i < m; ++i) std::fill(y + i * ldy, y + i * ldy + n, 0.0f);
}

template <typename W>
void MatMulTyped(const float* x, int64_t m, int64_t ldx, const W* w, int64_t stride,
                 int64_t rows, int64_t cols, float* y, int64_t ldy, bool accumulate) {
  const bool decode = m <= (sizeof(W) == 2 ? kGemvMaxRowsBf16 : kGemvMaxRows);
  switch (internal::MatMulIsa()) {
    case Isa::kAvx512:
      if (sizeof(W) == 2 && !decode && m <= internal::Bf16DotMaxRows()) {
        // The threads take blocks of x's rows, each against all the weights, where the
        // weights stay in L2 or each block is long enough to pay for reading them all
        // (split by weight rows instead, a router of 160 rows ran 0.7x and a matrix of
        // 384 rows 0.66x: uneven units, and each pass of x over half the weights).
        // Otherwise each block of x takes every thread, split by weight rows.
        const int threads = TeamSize(static_cast<double>(m) * rows * cols);
        const int64_t each = std::min(kDotBlockRows, (m + threads - 1) / threads);
        const bool by_x_rows = threads > 1 && (rows * cols * static_cast<int64_t>(sizeof(W)) <= kDotL2Bytes ||
                                               each >= kDotMinRowsEach);
        if (!by_x_rows) {
          for (int64_t i = 0; i < m; i += kDotBlockRows) {
            avx512::Gemv(x + i * ldx, std::min(kDotBlockRows, m - i), ldx, w, stride, rows, cols, y + i * ldy,
                         ldy, accumulate);
          }
          return;
        }
        const int64_t blocks = (m + each - 1) / each;
        OnTeam(threads, [&](int t, int n) {
          int64_t b0, b1;
          SplitRange(blocks, n, t, &b0, &b1);
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t i = b * each;
            avx512::Gemv(x + i * ldx, std::min(each, m - i), ldx, w, stride, rows, cols, y + i * ldy, ldy,
                         accumulate);
          }
        });
        return;
      }
      return decode ? avx512::Gemv(x, m, ldx, w, stride, rows, cols, y, ldy, accumulate)
                    : avx512::Gemm(x, m, ldx, w, stride, rows, cols, y, ldy, accumulate);
    case Isa::kAvx2:
      return decode ? avx2::Gemv(x, m, ldx, w, stride, rows, cols, y, ldy, accumulate)
                    : avx2::Gemm(x, m, ldx, w, stride, rows, cols, y, ldy, accumulate);
    default:
      break;
  }
  const int threads = TeamSize(static_cast<double>(m) * rows * cols);
  OnTeam(threads, [&](int t, int n) {
    int64_t n0, n1;
    SplitRange(rows, n, t, &n0, &n1);
    MatMulPlainRows(x, m, ldx, w, stride, cols, n0, n1, y, ldy, accumulate);
  });
}

template <typename W>
void MatMulNoTransTyped(const float* x, int64_t m, int64_t ldx, const W* w, int64_t stride,
                        int64_t rows, int64_t cols, float* y, int64_t ldy, bool accumulate) {
  switch (internal::MatMulIsa()) {
    case Isa::kAvx512:
      return avx512::NoTrans(x, m, ldx, w, stride, rows, cols, y, ldy, accumulate);
    case Isa::kAvx2:
      return avx2::NoTrans(x, m, ldx, w, stride, rows, cols, y, ldy, accumulate);
    default:
      break;
  }
  const int threads = TeamSize(static_cast<double>(m) * rows * cols);
  OnTeam(threads, [&](int t, int n) {
    int64_t k0, k1;
    SplitRange(cols, n, t, &k0, &k1);
    MatMulNoTransPlainCols(x, m, ldx, w, stride, rows, k0, k1, y, ldy, accumulate);
  });
}

}  // namespace

void MatMul(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
            int64_t ldy, bool accumulate) {
  if (m <= 0 || w.rows <= 0) return;
  if (w.cols <= 0) return ZeroOutput(m, w.rows, y, ldy, accumulate);
  if (w.type == WeightType::kI8) return internal::MatMulInt8(x, m, ldx, w, y, ldy, accumulate);
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
  if (w.type == WeightType::kI8) {
    std::fprintf(stderr, "epic: MatMulNoTrans of an int8 matrix\n");
    std::abort();
  }
  if (w.type == WeightType::kBF16) {
    MatMulNoTransTyped(x, m, ldx, static_cast<const Bf16*>(w.data), w.row_stride, w.rows,
                       w.cols, y, ldy, accumulate);
  } else {
    MatMulNoTransTyped(x, m, ldx, static_cast<const float*>(w.data), w.row_stride, w.rows,
                       w.cols, y, ldy, accumulate);
  }
}

int64_t PackedF32Floats(int64_t rows, int64_t cols) {
  switch (internal::MatMulIsa()) {
    case Isa::kAvx512: return avx512::PackedRows(rows) * cols;
    case Isa::kAvx2: return avx2::PackedRows(rows) * cols;
    default: return rows * cols;
  }
}

void PackF32(const float* w, int64_t rows, int64_t cols, int64_t stride, float* packed) {
  switch (internal::MatMulIsa()) {
    case Isa::kAvx512: return avx512::PackF32(w, rows, cols, stride, packed);
    case Isa::kAvx2: return avx2::PackF32(w, rows, cols, stride, packed);
    default:
      for (int64_t r = 0; r < rows; ++r) std::copy(w + r * stride, w + r * stride + cols, packed + r * cols);
  }
}

void MatMulPackedF32(const float* x, int64_t m, int64_t ldx, const float* packed, int64_t rows, int64_t cols,
                     int64_t n_used, int64_t k_used, float* y, int64_t ldy) {
  if (m <= 0 || n_used <= 0) return;
  if (k_used <= 0) return ZeroOutput(m, n_used, y, ldy, /*accumulate=*/false);
  switch (internal::MatMulIsa()) {
    case Isa::kAvx512: return avx512::PackedProduct(x, m, ldx, packed, rows, cols, n_used, k_used, y, ldy);
    case Isa::kAvx2: return avx2::PackedProduct(x, m, ldx, packed, rows, cols, n_used, k_used, y, ldy);
    default:
      MatMulPlainRows(x, m, ldx, packed, cols, k_used, 0, n_used, y, ldy, /*accumulate=*/false);
  }
}

namespace internal {

Isa MatMulIsa() {
  if (Has(Isa::kAvx512)) return Isa::kAvx512;
  if (Has(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kPlain;
}

int64_t Bf16DotMaxRows() {
  static const int64_t rows = [] {
    const int zen = AmdZenAvx512();
    const int64_t host = zen == 4 ? std::numeric_limits<int64_t>::max() : zen == 5 ? kDotMaxRowsZen5 : 0;
    const char* form = std::getenv("EPIC_BF16_FORM");
    if (form == nullptr || *form == '\0') return host;
    if (std::strcmp(form, "dot") == 0) return std::numeric_limits<int64_t>::max();
    if (std::strcmp(form, "gemm") == 0) return int64_t{0};
    std::fprintf(stderr, "epic: EPIC_BF16_FORM=%s is neither dot nor gemm; ignored\n", form);
    return host;
  }();
  return rows;
}

void MatMulPlain(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
                 int64_t ldy, bool accumulate) {
  if (m <= 0 || w.rows <= 0) return;
  if (w.cols <= 0) return ZeroOutput(m, w.rows, y, ldy, accumulate);
  if (w.type == WeightType::kI8) return internal::MatMulInt8Plain(x, m, ldx, w, y, ldy, accumulate);
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
  switch (MatMulIsa()) {
    case Isa::kAvx512: return avx512::MicroKernelInCacheGflops(threads, seconds);
    case Isa::kAvx2: return avx2::MicroKernelInCacheGflops(threads, seconds);
    default: return 0;
  }
}

}  // namespace internal

}  // namespace epic::cpu
