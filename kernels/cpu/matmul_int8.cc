// Int8 products (kernels/cpu/matmul_int8.h). The activations are quantized once per
// call into per-thread scratch; threads split the weight panels; each takes 4 panels
// (64 output columns) at a time and runs blocks of up to 6 rows of x over them, k in
// chunks that keep the 4 panels' part in L1, summing each scale block in int32 and the
// scale blocks in an F32 block that the last chunk scales into y. A few rows of x read
// one whole panel after another instead.
#include "kernels/cpu/matmul_int8.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "common/half.h"
#include "common/scratch_buffer.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/intrinsics.h"
#include "kernels/cpu/matmul_internal.h"
#include "kernels/cpu/parallel.h"

namespace epic::cpu {
namespace {

constexpr int64_t kPanelRows = internal::kInt8PanelRows;  // output columns of one packed panel
constexpr int64_t kGroup = internal::kInt8Group;     // k values one int32 lane sums
constexpr int64_t kGroupBytes = kPanelRows * kGroup;  // one vpdpbusd operand
constexpr int kBlockPanels = 4;                      // panels a block of x runs over
constexpr int kBlockRows = 6;                        // rows of x in a register block
constexpr int64_t kChunkGroups = 64;                 // k/4 per chunk: 4 panels x 4 KiB in L1
constexpr int64_t kBlockCols = kBlockPanels * kPanelRows;
constexpr int64_t kScaleGroups = kInt8ScaleBlock / kGroup;  // groups of 4 under one scale of x
static_assert(kChunkGroups % kScaleGroups == 0, "a chunk of k starts a scale block");
// k/4 a chunk of the products of more than 3 rows: kChunkGroups, or twice that on Zen 5,
// whose L1 holds 48 KiB (512-token fast prefill x1.03 on V2-Lite's shape, about 1.0 on
// small experts; batched B=16 x1.03, B=64 0.99-1.015; A B B A).
int64_t ChunkGroups() {
  static const int64_t groups = AmdZenAvx512() == 5 ? 2 * kChunkGroups : kChunkGroups;
  return groups;
}
// A thread's share of weights read as one stream up to this many bytes prefetches each
// panel's lines a panel ahead (see Panels).
constexpr int64_t kShortStreamBytes = int64_t{1} << 20;
constexpr uint8_t kOffset = internal::kInt8Offset;

int64_t RoundUp(int64_t v, int64_t to) { return (v + to - 1) / to * to; }
int64_t PaddedCols(int64_t cols) { return RoundUp(cols, kGroup); }
int64_t PanelBytes(int64_t padded_cols) { return kPanelRows * padded_cols; }

// Per-thread scratch: the quantized activations, their scale blocks' sums and scales
// (the calling thread's), and each worker's F32 block.
enum Slot { kXq, kXSums, kXScales, kAcc, kSlots };
template <typename T>
T* Scratch(Slot slot, int64_t count) {
  thread_local ScratchBuffer buffers[kSlots];
  return static_cast<T*>(buffers[slot].Get(std::max<int64_t>(count, 1) * static_cast<int64_t>(sizeof(T))));
}

// One row quantized: Q[0, padded) = round(x / scale) (zero past K); returns the scale
// (max |x| / 127; NaN when the row has a NaN or an infinity, so that its products are
// NaN as the exact ones would be not finite) and sets SUM to the sum of Q.
float QuantizeRowPlain(const float* x, int64_t k, int64_t padded, int8_t* q, int32_t* sum) {
  float amax = 0.0f;
  float poison = 0.0f;  // NaN when any x is not finite (inf * 0 and NaN * 0 are NaN)
  for (int64_t c = 0; c < k; ++c) {
    amax = std::max(amax, std::fabs(x[c]));
    poison += x[c] * 0.0f;
  }
  std::memset(q, 0, static_cast<size_t>(padded));
  *sum = 0;
  if (poison != 0.0f || std::isnan(poison)) return std::numeric_limits<float>::quiet_NaN();
  if (amax == 0.0f) return 0.0f;
  const float inv = 127.0f / amax;
  int32_t s = 0;
  for (int64_t c = 0; c < k; ++c) {
    const auto v = static_cast<int32_t>(std::nearbyint(x[c] * inv));
    q[c] = static_cast<int8_t>(v);
    s += v;
  }
  *sum = s;
  return amax / 127.0f;
}

// For the vector quantizers, once a row's max |x| (A) and whether a value is not finite
// (NOT_FINITE) are known: zeroes Q's padding and SUM; a row with a value not finite
// (scale NaN) or all zeros (scale 0) is done here, Q zeroed: true, and its SCALE.
bool SpecialRow(float a, bool not_finite, int64_t k, int64_t padded, int8_t* q, int32_t* sum, float* scale) {
  // Rows of a multiple of 4 have no padding (a batch's folds quantize thousands of rows
  // of 64 a step, and the call cost a tenth of them).
  if (padded > k) std::memset(q + k, 0, static_cast<size_t>(padded - k));
  *sum = 0;
  if (not_finite) {
    *scale = std::numeric_limits<float>::quiet_NaN();
  } else if (a == 0.0f) {
    *scale = 0.0f;
  } else {
    return false;
  }
  std::memset(q, 0, static_cast<size_t>(k));
  return true;
}

#define EPIC_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

EPIC_VNNI float QuantizeRowVnni(const float* x, int64_t k, int64_t padded, int8_t* q, int32_t* sum) {
  __m512 amax = _mm512_setzero_ps();
  __m512 poison = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 16) {
    const __mmask16 mask = FirstLanes(k - c);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + c);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    poison = _mm512_add_ps(poison, _mm512_mul_ps(v, zero));
  }
  const float a = _mm512_reduce_max_ps(amax);
  // x * 0 is 0 for finite x, NaN otherwise: a lane's NaN, with no reduction.
  const bool not_finite = _mm512_cmp_ps_mask(poison, poison, _CMP_UNORD_Q) != 0;
  if (float scale; SpecialRow(a, not_finite, k, padded, q, sum, &scale)) return scale;
  const __m512 inv = _mm512_set1_ps(127.0f / a);
  __m512i s = _mm512_setzero_si512();
  for (int64_t c = 0; c < k; c += 16) {
    const __mmask16 mask = FirstLanes(k - c);
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + c), inv));
    s = _mm512_add_epi32(s, v);
    _mm_mask_storeu_epi8(q + c, mask, _mm512_cvtsepi32_epi8(v));
  }
  *sum = _mm512_reduce_add_epi32(s);
  return a / 127.0f;
}

// Group G's 4 values of a quantized row X, as one int32 (a vpdpbusd broadcast).
inline int32_t XGroup(const int8_t* x, int64_t g) {
  int32_t four;
  std::memcpy(&four, x + g * kGroup, sizeof four);
  return four;
}

// Panels at AT whose lines a block prefetches into L2 as it runs: the lines of every
// EVERY-th group it passes, from group PHASE (each row tile of a chunk takes its share of
// the next chunk, see Panels).
struct Ahead {
  const uint8_t* at = nullptr;
  int every = 1, phase = 0;
};

// Group G's lines of kPanels panels at AHEAD where G is one of the block's share; WAIT
// counts down the groups to the next (from AHEAD.phase).
template <int kPanels>
inline void PrefetchGroup(const Ahead& ahead, int64_t panel_bytes, int64_t g, int& wait) {
  if (ahead.at == nullptr || wait-- != 0) return;
  wait = ahead.every - 1;
#pragma GCC unroll 4
  for (int p = 0; p < kPanels; ++p) {
    _mm_prefetch(reinterpret_cast<const char*>(ahead.at + p * panel_bytes + g * kGroupBytes), _MM_HINT_T1);
  }
}

#define EPIC_AVX2_INT8 __attribute__((target("avx2,fma")))
#define EPIC_AVX_VNNI __attribute__((target("avx2,fma,avxvnni")))

EPIC_AVX2_INT8 float ReduceMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

EPIC_AVX2_INT8 int32_t ReduceAdd(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// QuantizeRowPlain on AVX2: the same integers (round to nearest even, saturation never
// reached) and the same scale.
EPIC_AVX2_INT8 float QuantizeRowAvx2(const float* x, int64_t k, int64_t padded, int8_t* q, int32_t* sum) {
  __m256 amax = _mm256_setzero_ps();
  __m256 poison = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t c = 0; c < k; c += 8) {
    const __m256 v = _mm256_maskload_ps(x + c, FirstLanes8(k - c));
    amax = _mm256_max_ps(amax, _mm256_and_ps(v, magnitude));
    poison = _mm256_add_ps(poison, _mm256_mul_ps(v, zero));
  }
  const float a = ReduceMax(amax);
  const bool not_finite = _mm256_movemask_ps(_mm256_cmp_ps(poison, poison, _CMP_UNORD_Q)) != 0;
  if (float scale; SpecialRow(a, not_finite, k, padded, q, sum, &scale)) return scale;
  const __m256 inv = _mm256_set1_ps(127.0f / a);
  __m256i s = _mm256_setzero_si256();
  for (int64_t c = 0; c < k; c += 8) {
    const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_maskload_ps(x + c, FirstLanes8(k - c)), inv));
    s = _mm256_add_epi32(s, v);
    // 8 int32 to 8 int8: each 128-bit lane packs its four into its low 4 bytes.
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v, v), _mm256_setzero_si256());
    const uint64_t eight = static_cast<uint32_t>(_mm256_extract_epi32(bytes, 0)) |
                           static_cast<uint64_t>(static_cast<uint32_t>(_mm256_extract_epi32(bytes, 4))) << 32;
    std::memcpy(q + c, &eight, static_cast<size_t>(std::min<int64_t>(8, k - c)));
  }
  *sum = ReduceAdd(s);
  return a / 127.0f;
}

using QuantizeFn = float (*)(const float*, int64_t, int64_t, int8_t*, int32_t*);

// Scale blocks of a row of PADDED values.
int64_t ScaleBlocks(int64_t padded) { return (padded + kInt8ScaleBlock - 1) / kInt8ScaleBlock; }

// Row X of K values quantized a scale block at a time: Q[0, padded), each scale block's
// sum into SUMS and scale into SCALES.
void QuantizeBlocks(QuantizeFn quantize, const float* x, int64_t k, int64_t padded, int8_t* q, int32_t* sums,
                    float* scales) {
  for (int64_t b = 0, c = 0; c < padded; ++b, c += kInt8ScaleBlock) {
    scales[b] = quantize(x + c, std::min(kInt8ScaleBlock, k - c), std::min(kInt8ScaleBlock, padded - c), q + c,
                         sums + b);
  }
}

QuantizeFn QuantizerFor(internal::Int8Path path) {
  switch (path) {
    case internal::Int8Path::kAvx512Vnni: return QuantizeRowVnni;
    case internal::Int8Path::kAvxVnni:
    case internal::Int8Path::kAvx2: return QuantizeRowAvx2;
    default: return QuantizeRowPlain;
  }
}

struct QuantizedX {
  const int8_t* q;       // [m][padded]
  const int32_t* sums;   // [m][blocks]
  const float* scales;   // [m][blocks]
  int64_t padded, blocks;
};

QuantizedX QuantizeActivations(QuantizeFn quantize, const float* x, int64_t m, int64_t ldx, int64_t k,
                               int64_t padded) {
  const int64_t blocks = ScaleBlocks(padded);
  auto* q = Scratch<int8_t>(kXq, m * padded);
  auto* sums = Scratch<int32_t>(kXSums, m * blocks);
  auto* scales = Scratch<float>(kXScales, m * blocks);
  // Over the threads from 16k values: a batched decode's 64 rows of 1024 were quantized
  // on one thread, twice a layer, while the other waited (with attention's heads taken
  // in shares, compute_cpu.cc, B=64 on small experts 6% faster).
  ParallelRows(m, m * k >= (1 << 14), [&](int64_t i) {
    QuantizeBlocks(quantize, x + i * ldx, k, padded, q + i * padded, sums + i * blocks, scales + i * blocks);
  });
  return {q, sums, scales, padded, blocks};
}

// SUM + (acc - 128 * sum_x) * scale_x: a scale block's int32 products into a row's F32
// sum, the one formula (fused) every path uses; the sum times scale_w is the product.
inline float AddScaleBlock(float sum, int32_t acc, int32_t x_sum, float x_scale) {
  return std::fma(static_cast<float>(acc - int32_t{kOffset} * x_sum), x_scale, sum);
}

// ACC [rows][ldc] (+)= the products of ROWS rows of X from row I0 with NP panels at W,
// PANEL_BYTES apart, over GROUPS groups of 4 columns from group G0 (a scale block's
// first): each scale block's int32 sums, less the offset, times x's scale
// (AddScaleBlock), into F32 sums held in registers where they fit, else in ACC. With
// AHEAD, its share of the same lines of the panels at AHEAD.at is prefetched into L2 as
// it goes (Panels passes the next chunk's).
template <int kRows, int kPanels>
EPIC_VNNI void Block(const QuantizedX& x, int64_t i0, int64_t g0, const uint8_t* w, int64_t panel_bytes,
                     int64_t groups, float* acc, int64_t ldc, bool first, Ahead ahead) {
  constexpr bool kHeld = kRows * kPanels <= 12;
  const int8_t* xq = x.q + i0 * x.padded + g0 * kGroup;
  int wait = ahead.phase;
  const int64_t ldq = x.padded;
  __m512 f[kHeld ? kRows : 1][kHeld ? kPanels : 1];
#pragma GCC unroll 8
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int p = 0; p < kPanels; ++p) {
      float* a = acc + i * ldc + p * kPanelRows;
      if constexpr (kHeld) {
        f[i][p] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(a);
      } else if (first) {
        _mm512_storeu_ps(a, _mm512_setzero_ps());  // so that each scale block adds to ACC alike
      }
    }
  }
  for (int64_t s0 = 0; s0 < groups; s0 += kScaleGroups) {
    __m512i c[kRows][kPanels];
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
      for (int p = 0; p < kPanels; ++p) {
        // Each zero a value of its own: given one for all, GCC 12 copied every accumulator
        // register to register and to the stack at each group (int8 GEMM 0.45x).
        c[i][p] = _mm512_setzero_si512();
        asm("" : "+v"(c[i][p]));
      }
    }
    const int64_t s1 = std::min(groups, s0 + kScaleGroups);
    for (int64_t g = s0; g < s1; ++g) {
      __m512i wv[kPanels];
#pragma GCC unroll 4
      for (int p = 0; p < kPanels; ++p) wv[p] = _mm512_loadu_si512(w + p * panel_bytes + g * kGroupBytes);
      PrefetchGroup<kPanels>(ahead, panel_bytes, g, wait);
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) {
        const __m512i xb = _mm512_set1_epi32(XGroup(xq + i * ldq, g));
#pragma GCC unroll 4
        for (int p = 0; p < kPanels; ++p) c[i][p] = _mm512_dpbusd_epi32(c[i][p], wv[p], xb);
      }
    }
    const int64_t b = (g0 + s0) / kScaleGroups;
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      const __m512i offset = _mm512_set1_epi32(int32_t{kOffset} * x.sums[(i0 + i) * x.blocks + b]);
      const __m512 scale = _mm512_set1_ps(x.scales[(i0 + i) * x.blocks + b]);
#pragma GCC unroll 4
      for (int p = 0; p < kPanels; ++p) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(c[i][p], offset));
        if constexpr (kHeld) {
          f[i][p] = _mm512_fmadd_ps(v, scale, f[i][p]);
        } else {
          float* a = acc + i * ldc + p * kPanelRows;
          _mm512_storeu_ps(a, _mm512_fmadd_ps(v, scale, _mm512_loadu_ps(a)));
        }
      }
    }
  }
  if constexpr (kHeld) {
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
      for (int p = 0; p < kPanels; ++p) _mm512_storeu_ps(acc + i * ldc + p * kPanelRows, f[i][p]);
    }
  }
}

// The same on 256-bit vectors, a panel as two halves of 8 rows. With AVX-VNNI,
// vpdpbusd as above. Without it, the weights are made signed (stored - 128, in
// [-127, 127]) and multiplied by |x| with x's sign moved onto them: vpmaddubsw's pairs
// then stay within 2 * 127 * 127 and never saturate, vpmaddwd sums them into int32. That
// sum is already less the offset's 128 * sum_x (not subtracted again).
template <int kRows, int kPanels, bool kVnni>
EPIC_AVX_VNNI void Block256(const QuantizedX& x, int64_t i0, int64_t g0, const uint8_t* w, int64_t panel_bytes,
                            int64_t groups, float* acc, int64_t ldc, bool first, Ahead ahead) {
  constexpr bool kHeld = kRows * kPanels <= (kVnni ? 2 : 1);
  const int8_t* xq = x.q + i0 * x.padded + g0 * kGroup;
  int wait = ahead.phase;
  const int64_t ldq = x.padded;
  __m256 f[kHeld ? kRows : 1][kHeld ? kPanels : 1][2];
#pragma GCC unroll 8
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 2
    for (int p = 0; p < kPanels; ++p) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        float* a = acc + i * ldc + p * kPanelRows + h * 8;
        if constexpr (kHeld) {
          f[i][p][h] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(a);
        } else if (first) {
          _mm256_storeu_ps(a, _mm256_setzero_ps());
        }
      }
    }
  }
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t s0 = 0; s0 < groups; s0 += kScaleGroups) {
    __m256i c[kRows][kPanels][2];
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 2
      for (int p = 0; p < kPanels; ++p) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          c[i][p][h] = _mm256_setzero_si256();
          asm("" : "+v"(c[i][p][h]));  // as in Block
        }
      }
    }
    const int64_t s1 = std::min(groups, s0 + kScaleGroups);
    for (int64_t g = s0; g < s1; ++g) {
      __m256i wv[kPanels][2];
#pragma GCC unroll 2
      for (int p = 0; p < kPanels; ++p) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const uint8_t* at = w + p * panel_bytes + g * kGroupBytes + h * 32;
          wv[p][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
          if constexpr (!kVnni) wv[p][h] = _mm256_xor_si256(wv[p][h], flip);
        }
      }
      PrefetchGroup<kPanels>(ahead, panel_bytes, g, wait);
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) {
        const __m256i xb = _mm256_set1_epi32(XGroup(xq + i * ldq, g));
        if constexpr (kVnni) {
#pragma GCC unroll 2
          for (int p = 0; p < kPanels; ++p) {
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) c[i][p][h] = _mm256_dpbusd_avx_epi32(c[i][p][h], wv[p][h], xb);
          }
        } else {
          const __m256i ax = _mm256_abs_epi8(xb);
#pragma GCC unroll 2
          for (int p = 0; p < kPanels; ++p) {
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
              const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[p][h], xb));
              c[i][p][h] = _mm256_add_epi32(c[i][p][h], _mm256_madd_epi16(pairs, ones));
            }
          }
        }
      }
    }
    const int64_t b = (g0 + s0) / kScaleGroups;
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      const __m256i offset = _mm256_set1_epi32(kVnni ? int32_t{kOffset} * x.sums[(i0 + i) * x.blocks + b] : 0);
      const __m256 scale = _mm256_set1_ps(x.scales[(i0 + i) * x.blocks + b]);
#pragma GCC unroll 2
      for (int p = 0; p < kPanels; ++p) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(c[i][p][h], offset));
          if constexpr (kHeld) {
            f[i][p][h] = _mm256_fmadd_ps(v, scale, f[i][p][h]);
          } else {
            float* a = acc + i * ldc + p * kPanelRows + h * 8;
            _mm256_storeu_ps(a, _mm256_fmadd_ps(v, scale, _mm256_loadu_ps(a)));
          }
        }
      }
    }
  }
  if constexpr (kHeld) {
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 2
      for (int p = 0; p < kPanels; ++p) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(acc + i * ldc + p * kPanelRows + h * 8, f[i][p][h]);
      }
    }
  }
}

using BlockFn = void (*)(const QuantizedX&, int64_t, int64_t, const uint8_t*, int64_t, int64_t, float*, int64_t,
                        bool, Ahead);

template <int kRows>
BlockFn BlockFor(int panels) {
  switch (panels) {
    case 1: return Block<kRows, 1>;
    case 2: return Block<kRows, 2>;
    case 3: return Block<kRows, 3>;
    default: return Block<kRows, 4>;
  }
}

BlockFn BlockFor(int rows, int panels) {
  switch (rows) {
    case 1: return BlockFor<1>(panels);
    case 2: return BlockFor<2>(panels);
    case 3: return BlockFor<3>(panels);
    case 4: return BlockFor<4>(panels);
    case 5: return BlockFor<5>(panels);
    default: return BlockFor<6>(panels);
  }
}

// The 256-bit blocks cover one panel, or two where few rows leave registers for both.
template <bool kVnni>
BlockFn Block256For(int rows, int panels) {
  if (panels >= 2) return rows <= 1 ? Block256<1, 2, kVnni> : Block256<2, 2, kVnni>;
  switch (rows) {
    case 1: return Block256<1, 1, kVnni>;
    case 2: return Block256<2, 1, kVnni>;
    case 3: return Block256<3, 1, kVnni>;
    case 4: return Block256<4, 1, kVnni>;
    case 5: return Block256<5, 1, kVnni>;
    default: return Block256<6, 1, kVnni>;
  }
}

// How a path covers a block of kBlockPanels panels by rows of x: ROWS and PANELS a call;
// up to SEQUENTIAL_ROWS rows, STREAMS panels a call over all of k instead, each from a
// part of the thread's panels of its own (Panels).
struct Tiling {
  int rows;
  int panels;
  BlockFn (*block)(int rows, int panels);
  int sequential_rows;
  int streams;
  int64_t near_ahead = 0;  // bytes ahead products of 2+ rows prefetch their streams (Panels)
};

Tiling TilingFor(internal::Int8Path path, int64_t m) {
  switch (path) {
    case internal::Int8Path::kAvx512Vnni: return {kBlockRows, kBlockPanels, BlockFor, kBlockRows, kBlockPanels, 2048};
    // Two panels (4 accumulators a row) for up to 2 rows, read as 2 streams (2 rows so:
    // 1.08-1.25x with AVX-VNNI, 1.03-1.21x without, over cold and hot weights on Zen 5);
    // one panel for more. Without vpdpbusd a second row already makes the products, not
    // the stream, the limit.
    case internal::Int8Path::kAvxVnni:
      return m <= 2 ? Tiling{2, 2, Block256For<true>, 2, 2} : Tiling{6, 1, Block256For<true>, 1, 2};
    default: return m <= 2 ? Tiling{2, 2, Block256For<false>, 2, 2} : Tiling{4, 1, Block256For<false>, 1, 2};
  }
}

// Y's columns [n0, n0 + 16 * panels) of M rows from ACC [m][kBlockCols] times the
// weights' scales.
EPIC_VNNI void StoreBlock(const float* acc, int64_t m, const WeightMatrix& w, int64_t n0, int panels, float* y,
                          int64_t ldy, bool accumulate) {
  __mmask16 masks[kBlockPanels];
  __m512 w_scales[kBlockPanels];
  int valid = 0;  // panels with any row of W
  for (int p = 0; p < panels; ++p) {
    const int64_t n = n0 + p * kPanelRows;
    if (n >= w.rows) break;
    masks[p] = FirstLanes(w.rows - n);
    w_scales[p] = _mm512_maskz_loadu_ps(masks[p], w.scales + n);
    valid = p + 1;
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int p = 0; p < valid; ++p) {
      __m512 v = _mm512_mul_ps(_mm512_loadu_ps(acc + i * kBlockCols + p * kPanelRows), w_scales[p]);
      float* out = y + i * ldy + n0 + p * kPanelRows;
      if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(masks[p], out), v);
      _mm512_mask_storeu_ps(out, masks[p], v);
    }
  }
}

// The same on 256-bit vectors, 8 columns at a time.
EPIC_AVX2_INT8 void StoreBlock256(const float* acc, int64_t m, const WeightMatrix& w, int64_t n0, int panels,
                                  float* y, int64_t ldy, bool accumulate) {
  const int64_t cols = std::min<int64_t>(panels * kPanelRows, w.rows - n0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < cols; j += 8) {
      const __m256i mask = FirstLanes8(cols - j);
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(acc + i * kBlockCols + j), _mm256_maskload_ps(w.scales + n0 + j, mask));
      float* out = y + i * ldy + n0 + j;
      if (accumulate) v = _mm256_add_ps(_mm256_maskload_ps(out, mask), v);
      _mm256_maskstore_ps(out, mask, v);
    }
  }
}

// Y's columns [n0, n0 + 16 * panels) of M rows from ACC [m][kBlockCols], on PATH.
void Store(internal::Int8Path path, const float* acc, int64_t m, const WeightMatrix& w, int64_t n0, int panels,
           float* y, int64_t ldy, bool accumulate) {
  if (path == internal::Int8Path::kAvx512Vnni) {
    StoreBlock(acc, m, w, n0, panels, y, ldy, accumulate);
  } else {
    StoreBlock256(acc, m, w, n0, panels, y, ldy, accumulate);
  }
}

// Rows [i0, i0 + rows) of a block of kBlockCols floats at Y (rows LDY apart) into L1.
void PrefetchRows(const float* y, int64_t i0, int rows, int64_t ldy) {
  for (int64_t i = i0; i < i0 + rows; ++i) {
    for (int64_t c = 0; c < kBlockCols; c += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(y + i * ldy + c), _MM_HINT_T0);
    }
  }
}

// The weight scales of COUNT panels from panel P, STRIDE panels apart (a line a panel),
// into L1 ahead of their Store: a cold line stalled it (6% of small experts' batched
// decode's samples; paired, cold experts of 1-4 rows 1.00-1.18x).
void PrefetchScales(const WeightMatrix& w, int64_t p, int count, int64_t stride) {
  for (int k = 0; k < count; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(w.scales + (p + k * stride) * kPanelRows), _MM_HINT_T0);
  }
}

// Panels [p0, p1) of W against all M rows of X, on this thread.
void Panels(internal::Int8Path path, const QuantizedX& x, int64_t m, const WeightMatrix& w, int64_t p0, int64_t p1,
            float* y, int64_t ldy, bool accumulate) {
  const int64_t padded = w.row_stride;
  const int64_t groups = padded / kGroup;
  const int64_t panel_bytes = PanelBytes(padded);
  const auto* base = static_cast<const uint8_t*>(w.data);
  const Tiling tiling = TilingFor(path, m);
  float* acc = Scratch<float>(kAcc, m * kBlockCols);
  // Few rows of x (decode, batched decode's experts; up to 6 with AVX-512, 2 on AVX2)
  // read each panel once, whole: the thread's panels as STREAMS equal parts side by side,
  // a panel of each a call, so that the hardware prefetchers follow several sequential
  // streams and the products have as many independent sums. Against one panel after
  // another (Zen 5, paired in one process, cold weights): one thread over V2-Lite's 2816
  // x 2048 experts 1.35x, two over a lm_head-sized matrix 1.37x, V2-Lite's shape decode
  // 1.20x (B=1) and 1.11x (B=4), small experts' 1.06x and 1.045x (B=16); AVX2's two
  // streams 1.24x over the large experts; a 512 x 1024 matrix in L2 2.1x (one row), 1.5x
  // (2), 1.25x (3). One thread alone over a small expert's cold 512 KiB ran 0.86-1.01x,
  // but two together (decode) 1.01x. Up to 6 rows so, rather than in chunks of k by tiles
  // of rows below (4-6 rows 1.12-1.29x over cold experts and lm_head-sized matrices, 2-3
  // rows over long streams 1.0-1.4x; batched decode 1.07-1.15x on V2-Lite's shape,
  // 0.99-1.02x on small experts).
  //
  // A short stream (a small expert's matrix, a head's fold) ends before the prefetchers
  // reach full speed: it prefetches each stream's next panel's lines into L2 as the
  // panels before run (small experts' decode, Zen 5, A B B A: x1.004-1.125 in four runs,
  // one stream; the same over V2-Lite's 2.8-5.6 MB experts was 0.90-1.11, noise, and is
  // left to the hardware).
  //
  // Each row of x adds a step's multiply-adds between its loads, fewer of which are then
  // in flight, and the reads slowed: two threads over cold small experts of 1 / 3 / 6
  // rows read 48-55 / 41-45 / 33-41 GB/s. With AVX-512, products of 2-6 rows prefetch
  // their streams 2 KiB ahead (a panel where that is shorter) instead: short streams, and
  // long ones from 5 rows (paired, Zen 5: small experts' gate|up cold, 2 / 4 / 6 rows,
  // 1.10-1.12 / 1.08-1.20 / 1.13-1.29 on two threads; lm_head-sized 5 / 6 rows 1.12 /
  // 1.23-1.33, V2-Lite's expert on one thread 1.08 / 1.43, but 2-4 rows 0.92-1.05;
  // decode steps B=64 1.04-1.05 on small experts and V2-Lite's shape, B=16 on V2-Lite's
  // 1.07). AVX-VNNI's 2 rows over 2 streams so ran 0.93 on one thread, 0.9-1.0 on two.
  // One row's short streams too: a panel ahead, four panels' lines at once, ran slower
  // (Zen 4, alternating step by step in one process: small experts' decode
  // steps 0.96-0.99x the time, their experts phase at B=1 / 4 / 16 / 64 0.96-0.98 /
  // 0.98 / 0.94-0.99 / 0.99x; V2-Lite's shape's decode 0.94-0.98x, B=4 and B=16
  // 0.99-1.00x).
  const bool short_stream = (p1 - p0) * panel_bytes <= kShortStreamBytes;
  if (m <= tiling.sequential_rows) {
    const int64_t ahead = tiling.near_ahead > 0 && (short_stream || m >= 5)
                              ? std::min(panel_bytes, tiling.near_ahead)
                          : short_stream ? panel_bytes
                                         : 0;
    const int streams = p1 - p0 >= 2 * tiling.streams ? tiling.streams : 1;
    const int64_t part = (p1 - p0) / streams;
    const BlockFn side_by_side = tiling.block(static_cast<int>(m), streams);
    PrefetchScales(w, p0, streams, part);
    for (int64_t q = 0; q < part; ++q) {
      const uint8_t* at = base + (p0 + q) * panel_bytes;
      if (q + 1 < part) PrefetchScales(w, p0 + q + 1, streams, part);
      const bool last = q + 1 == part && ahead == panel_bytes;  // a panel ahead: past the part
      side_by_side(x, 0, 0, at, part * panel_bytes, groups, acc, kBlockCols, /*first=*/true,
                   {ahead > 0 && !last ? at + ahead : nullptr});
      for (int k = 0; k < streams; ++k) {
        Store(path, acc + k * kPanelRows, m, w, (p0 + k * part + q) * kPanelRows, 1, y, ldy, accumulate);
      }
    }
    const BlockFn one = tiling.block(static_cast<int>(m), 1);
    PrefetchScales(w, p0 + streams * part, static_cast<int>(p1 - p0 - streams * part), 1);
    for (int64_t p = p0 + streams * part; p < p1; ++p) {  // fewer than STREAMS left
      one(x, 0, 0, base + p * panel_bytes, panel_bytes, groups, acc, kBlockCols, /*first=*/true, {});
      Store(path, acc, m, w, p * kPanelRows, 1, y, ldy, accumulate);
    }
    return;
  }
  const int64_t chunk = ChunkGroups();
  const int tiles = static_cast<int>((m + tiling.rows - 1) / tiling.rows);
  for (int64_t pb = p0; pb < p1; pb += kBlockPanels) {
    const int panels = static_cast<int>(std::min<int64_t>(kBlockPanels, p1 - pb));
    const uint8_t* wp = base + pb * panel_bytes;
    PrefetchScales(w, pb, panels, 1);
    for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
      const int64_t g = std::min(chunk, groups - g0);
      // A panel's chunk is 4 KiB, one page (8 KiB on Zen 5): the hardware prefetchers
      // stop at a page's end, and a chunk of cold weights started every pass with a miss
      // on each line. The tiles of rows prefetch the next chunk into L2 (into L1 it
      // pushed out this chunk's lines, which the other tiles read): small experts'
      // decode 13% faster, their 512-token prefill 10% (v2-small-experts, Zen 4). Each
      // tile takes an equal share, so that memory is busy for the whole chunk: when the
      // first tile took it all, memory idled while the others ran from L1, and a product
      // of 8-48 rows took the time of its reads plus that of its multiply-adds (cold
      // V2-Lite experts 1.15-1.40x faster, Zen 5; see docs/performance.md).
      const uint8_t* next = g0 + chunk < groups ? wp + (g0 + chunk) * kGroupBytes
                            : pb + kBlockPanels < p1     ? base + (pb + kBlockPanels) * panel_bytes
                                                         : nullptr;
      for (int64_t i0 = 0; i0 < m; i0 += tiling.rows) {
        const int rows = static_cast<int>(std::min<int64_t>(tiling.rows, m - i0));
        // The next block's lines of y, as this block's first chunk runs: the stores of its
        // epilogue missed on every line of a cold y (an expert's down rows, the attention
        // projections' outputs; 512-token prefill 1.018-1.023 on small experts, 1.017 on
        // V2-Lite's shape).
        if (g0 == 0 && pb + kBlockPanels < p1) PrefetchRows(y + (pb + kBlockPanels) * kPanelRows, i0, rows, ldy);
        for (int p = 0; p < panels; p += tiling.panels) {
          const int np = std::min(tiling.panels, panels - p);
          tiling.block(rows, np)(x, i0, g0, wp + p * panel_bytes + g0 * kGroupBytes, panel_bytes, g,
                                 acc + i0 * kBlockCols + p * kPanelRows, kBlockCols, g0 == 0,
                                 Ahead{next != nullptr ? next + p * panel_bytes : nullptr, tiles,
                                       static_cast<int>(i0 / tiling.rows)});
        }
      }
    }
    Store(path, acc, m, w, pb * kPanelRows, panels, y, ldy, accumulate);
  }
}

}  // namespace

int64_t QuantizedPanelBytes(int64_t rows, int64_t cols) { return RoundUp(rows, kPanelRows) * PaddedCols(cols); }

int64_t QuantizedBytes(int64_t rows, int64_t cols) {
  return QuantizedPanelBytes(rows, cols) + RoundUp(rows * static_cast<int64_t>(sizeof(float)), 64);
}

WeightMatrix QuantizeInt8(const WeightMatrix& w, void* memory) {
  const int64_t packed = QuantizedPanelBytes(w.rows, w.cols);
  return QuantizeInt8Into(w, memory, reinterpret_cast<float*>(static_cast<uint8_t*>(memory) + packed));
}

namespace {

// Row R of a kI8 matrix with PADDED columns from the F32 values ROW[0, cols): its scale
// into SCALES[R], its values (+128) into the 4-byte groups of its panel. Q: PADDED bytes.
void StoreQuantizedRow(QuantizeFn quantize, const float* row, int64_t cols, int64_t padded, int64_t r,
                       uint8_t* panels, float* scales, int8_t* q) {
  int32_t sum;
  scales[r] = quantize(row, cols, padded, q, &sum);
  uint8_t* out = panels + internal::Int8Index(padded, r, 0);
  for (int64_t c = 0; c < padded; c += kGroup) {
    uint32_t group;
    std::memcpy(&group, q + c, sizeof(group));
    group ^= 0x80808080u;  // + 128 on each byte
    std::memcpy(out + c * kPanelRows, &group, sizeof(group));
  }
}

}  // namespace

WeightMatrix QuantizeInt8Into(const WeightMatrix& w, void* panels, float* scales) {
  const int64_t padded = PaddedCols(w.cols);
  const int64_t packed = QuantizedPanelBytes(w.rows, w.cols);
  auto* out = static_cast<uint8_t*>(panels);
  std::memset(out, kOffset, static_cast<size_t>(packed));
  const QuantizeFn quantize = QuantizerFor(internal::ActiveInt8Path());
  OnTeam(omp_get_max_threads(), [&](int t, int n) {
    std::vector<float> row(static_cast<size_t>(w.cols));
    std::vector<int8_t> q(static_cast<size_t>(padded));
    int64_t r0, r1;
    internal::SplitRange(w.rows, n, t, &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) {
      const float* values;
      if (w.type == WeightType::kBF16) {
        const auto* in = static_cast<const uint16_t*>(w.data) + r * w.row_stride;
        for (int64_t c = 0; c < w.cols; ++c) row[c] = Bf16ToFloat(in[c]);
        values = row.data();
      } else {
        values = static_cast<const float*>(w.data) + r * w.row_stride;
      }
      StoreQuantizedRow(quantize, values, w.cols, padded, r, out, scales, q.data());
    }
  });
  WeightMatrix m;
  m.type = WeightType::kI8;
  m.data = out;
  m.rows = w.rows;
  m.cols = w.cols;
  m.row_stride = padded;
  m.scales = scales;
  return m;
}

namespace {
void* AllocateQuantized(const WeightMatrix& w) {
  void* memory = std::aligned_alloc(64, static_cast<size_t>(QuantizedBytes(w.rows, w.cols)));
  if (memory == nullptr) throw std::bad_alloc();
  return memory;
}
}  // namespace

QuantizedMatrix::QuantizedMatrix(const WeightMatrix& w)
    : memory_(AllocateQuantized(w), std::free), matrix_(QuantizeInt8(w, memory_.get())) {}

bool HasInt8Products() { return internal::ActiveInt8Path() != internal::Int8Path::kPlain; }

namespace internal {

const char* Int8PathName(Int8Path path) {
  constexpr const char* kNames[] = {"plain", "avx2", "avx_vnni", "avx512_vnni"};
  return kNames[static_cast<int>(path)];
}

std::vector<Int8Path> Int8Paths() {
  std::vector<Int8Path> paths = {Int8Path::kPlain};
  if (!Has(Isa::kAvx2)) return paths;
  paths.push_back(Int8Path::kAvx2);
  if (HasAvxVnni()) paths.push_back(Int8Path::kAvxVnni);
  if (Has(Isa::kAvx512Vnni)) paths.push_back(Int8Path::kAvx512Vnni);
  return paths;
}

Int8Path ActiveInt8Path() {
  static const Int8Path path = [] {
    const std::vector<Int8Path> paths = Int8Paths();
    const char* forced = std::getenv("EPIC_INT8_PATH");
    if (forced == nullptr || *forced == '\0') return paths.back();
    for (Int8Path p : paths) {
      if (std::strcmp(forced, Int8PathName(p)) == 0) return p;
    }
    std::fprintf(stderr, "epic: EPIC_INT8_PATH=%s is not a path this processor runs; using %s\n", forced,
                 Int8PathName(paths.back()));
    return paths.back();
  }();
  return path;
}

namespace {

// The plain product of quantized rows: the reference.
void PlainProduct(const QuantizedX& qx, int64_t m, const WeightMatrix& w, float* y, int64_t ldy, bool accumulate) {
  const int64_t padded = w.row_stride;
  const auto* base = static_cast<const uint8_t*>(w.data);
  for (int64_t i = 0; i < m; ++i) {
    const int8_t* xi = qx.q + i * padded;
    for (int64_t n = 0; n < w.rows; ++n) {
      float sum = 0.0f;
      for (int64_t b = 0; b < qx.blocks; ++b) {
        int32_t acc = 0;
        for (int64_t c = b * kInt8ScaleBlock; c < std::min(padded, (b + 1) * kInt8ScaleBlock); ++c) {
          acc += int32_t{base[Int8Index(padded, n, c)]} * xi[c];
        }
        sum = AddScaleBlock(sum, acc, qx.sums[i * qx.blocks + b], qx.scales[i * qx.blocks + b]);
      }
      const float v = sum * w.scales[n];
      y[i * ldy + n] = accumulate ? y[i * ldy + n] + v : v;
    }
  }
}

// Quantized rows against W on PATH, the threads splitting W's panels.
void Product(Int8Path path, const QuantizedX& qx, int64_t m, const WeightMatrix& w, float* y, int64_t ldy,
             bool accumulate) {
  if (path == Int8Path::kPlain) return PlainProduct(qx, m, w, y, ldy, accumulate);
  const int64_t panels = RoundUp(w.rows, kPanelRows) / kPanelRows;
  // Work in F32 multiply-adds: an int8 one costs about a quarter, but a few rows of x
  // are bound by reading the weights, a byte each where BF16 reads two (decode's q_a and
  // kv_a, 320-384 KiB, ran on one thread while the other waited).
  const double macs = static_cast<double>(m) * w.rows * w.cols;
  const int threads = static_cast<int>(std::min<int64_t>(
      panels, TeamSize(std::max(macs / 4, static_cast<double>(w.rows) * w.cols / 2))));
  // Many rows of x against few panels (prefill's q_a, kv_a, q_b and o_proj): the threads
  // take x's rows, each against every panel, rather than a few panels each with short
  // tails (512 x 288 x 1024 1.26x, 512 x 384 x 1024 1.22x, 512 x 1024 x 1024 1.10x; 3072
  // weight rows the same either way; paired, Zen 5). The same sums, row by row.
  const bool by_rows = m >= 128 && panels < 64 * threads;
  OnTeam(threads, [&](int t, int n) {
    if (by_rows) {
      int64_t r0, r1;
      SplitRange(m, n, t, &r0, &r1);
      const QuantizedX part{qx.q + r0 * qx.padded, qx.sums + r0 * qx.blocks, qx.scales + r0 * qx.blocks, qx.padded,
                            qx.blocks};
      Panels(path, part, r1 - r0, w, 0, panels, y + r0 * ldy, ldy, accumulate);
      return;
    }
    int64_t p0, p1;
    SplitRange(panels, n, t, &p0, &p1);
    Panels(path, qx, m, w, p0, p1, y, ldy, accumulate);
  });
}

}  // namespace

void MatMulInt8Plain(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y, int64_t ldy,
                     bool accumulate) {
  if (m <= 0 || w.rows <= 0) return;
  PlainProduct(QuantizeActivations(QuantizeRowPlain, x, m, ldx, w.cols, w.row_stride), m, w, y, ldy, accumulate);
}

void MatMulInt8On(Int8Path path, const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y,
                  int64_t ldy, bool accumulate) {
  if (m <= 0 || w.rows <= 0) return;
  Product(path, QuantizeActivations(QuantizerFor(path), x, m, ldx, w.cols, w.row_stride), m, w, y, ldy, accumulate);
}

void MatMulInt8(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y, int64_t ldy,
                bool accumulate) {
  MatMulInt8On(ActiveInt8Path(), x, m, ldx, w, y, ldy, accumulate);
}

}  // namespace internal

void Int8Rows::Resize(int64_t m, int64_t k) {
  rows_ = m;
  cols_ = k;
  padded_ = PaddedCols(k);
  blocks_ = ScaleBlocks(padded_);
  // Grown, never shrunk: a layer's rows and an expert's gathered ones change every step.
  values_ = memory_.Get<int8_t>(std::max<int64_t>(m * padded_, 1));
  if (static_cast<int64_t>(sums_.size()) < m * blocks_) {
    sums_.resize(static_cast<size_t>(m * blocks_));
    scales_.resize(static_cast<size_t>(m * blocks_));
  }
}

void Int8Rows::Quantize(const float* x, int64_t m, int64_t ldx, int64_t k) {
  Resize(m, k);
  const QuantizeFn quantize = QuantizerFor(internal::ActiveInt8Path());  // every path's integers are the same
  ParallelRows(m, m * k >= (1 << 14), [&](int64_t i) {
    QuantizeBlocks(quantize, x + i * ldx, k, padded_, values_ + i * padded_, sums_.data() + i * blocks_,
                   scales_.data() + i * blocks_);
  });
}

void Int8Rows::Gather(const Int8Rows& from, const int32_t* index, int64_t n) {
  Resize(n, from.cols_);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(values_ + i * padded_, from.values_ + index[i] * padded_, static_cast<size_t>(padded_));
    std::copy_n(from.sums_.data() + index[i] * blocks_, blocks_, sums_.data() + i * blocks_);
    std::copy_n(from.scales_.data() + index[i] * blocks_, blocks_, scales_.data() + i * blocks_);
  }
}

void MatMulInt8(const Int8Rows& x, const WeightMatrix& w, float* y, int64_t ldy, bool accumulate) {
  if (w.type != WeightType::kI8 || w.cols != x.cols()) {
    std::fprintf(stderr, "epic: MatMulInt8 of %lld quantized columns against a %s matrix of %lld\n",
                 static_cast<long long>(x.cols()), w.type == WeightType::kI8 ? "kI8" : "non-int8",
                 static_cast<long long>(w.cols));
    std::abort();
  }
  if (x.rows() <= 0 || w.rows <= 0) return;
  internal::Product(internal::ActiveInt8Path(), {x.values(), x.sums(), x.scales(), w.row_stride, x.blocks()},
                    x.rows(), w, y, ldy, accumulate);
}

}  // namespace epic::cpu
