// The fast products: x rounded to BF16 once per call, the weights packed per block of 32
// output columns into the layout both BF16 instructions read (pairs of consecutive k
// side by side for 16 columns: AMX's "VNNI" B tile rows, and vdpbf16ps's operand), then
// either 32x32 output blocks of AMX tiles (two A, two B, four C tiles; one tdpbf16ps
// per 16x16x32) or 12x32 register blocks of vdpbf16ps. Threads split the column blocks.
#include "kernels/cpu/matmul_fast.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "common/half.h"
#include "common/scratch_buffer.h"
#include "kernels/cpu/cpu_features.h"
#include "kernels/cpu/intrinsics.h"
#include "kernels/cpu/matmul_internal.h"
#include "kernels/cpu/parallel.h"

namespace epic::cpu {
namespace {

using Bf16 = uint16_t;

constexpr int64_t kBlockCols = 32;  // output columns a thread packs and computes at once
constexpr int64_t kTile = 16;       // AMX tile rows; also the columns of one packed panel
constexpr int64_t kKStep = 32;      // k values one A tile row (64 bytes of BF16) holds

int64_t RoundUp(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Per-thread scratch.
enum Slot { kPackedPanels, kOutputBlock, kRoundedRow, kRoundedX, kSlots };
template <typename T>
T* Scratch(Slot slot, int64_t count) {
  thread_local ScratchBuffer buffers[kSlots];
  return static_cast<T*>(buffers[slot].Get(count * static_cast<int64_t>(sizeof(T))));
}

// FloatToBf16 on 16 lanes at a time (8 on AVX2): the probabilities the BF16 attention
// rounds are as many as its multiply-adds over k, and every latent row written to a BF16
// cache is rounded.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void RoundRowAvx512(const float* in, int64_t k, Bf16* out) {
  for (int64_t c = 0; c < k; c += 16) {
    const __mmask16 lanes = FirstLanes(k - c);
    _mm256_mask_storeu_epi16(out + c, lanes, RoundToBf16Lanes(_mm512_maskz_loadu_ps(lanes, in + c)));
  }
}

// The same by vcvtneps2bf16 (RoundToBf16LanesBf16): decode's queries, rounded for every
// sequence and layer, were a seventh of a short sequence's attention core (Zen 4).
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16"))) void RoundRowAvx512Bf16(const float* in,
                                                                                                int64_t k, Bf16* out) {
  for (int64_t c = 0; c < k; c += 16) {
    const __mmask16 lanes = FirstLanes(k - c);
    _mm256_mask_storeu_epi16(out + c, lanes, RoundToBf16LanesBf16(_mm512_maskz_loadu_ps(lanes, in + c)));
  }
}

__attribute__((target("avx2"))) void RoundRowAvx2(const float* in, int64_t k, Bf16* out) {
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), RoundToBf16Lanes8(_mm256_loadu_ps(in + c)));
  }
  for (; c < k; ++c) out[c] = FloatToBf16(in[c]);
}

void RoundRowPlain(const float* in, int64_t k, Bf16* out) {
  for (int64_t c = 0; c < k; ++c) out[c] = FloatToBf16(in[c]);
}

using RoundRowFn = void (*)(const float*, int64_t, Bf16*);
const RoundRowFn kRoundRow = Has(Isa::kAvx512Bf16) ? RoundRowAvx512Bf16
                             : Has(Isa::kAvx512)   ? RoundRowAvx512
                             : Has(Isa::kAvx2)     ? RoundRowAvx2
                                                   : RoundRowPlain;

// OUT [kp] = IN [k] rounded to BF16, zeros past k.
void RoundRow(const float* in, int64_t k, int64_t kp, Bf16* out) {
  kRoundRow(in, k, out);
  std::fill(out + k, out + kp, Bf16{0});
}

// XB [rows_padded, kp] = x rounded to BF16, zero beyond m rows and k columns.
void RoundActivations(const float* x, int64_t m, int64_t ldx, int64_t k, int64_t rows_padded, int64_t kp, Bf16* xb) {
  ParallelRows(rows_padded, m * k > (1 << 16), [&](int64_t i) {
    Bf16* out = xb + i * kp;
    if (i >= m) {
      std::memset(out, 0, static_cast<size_t>(kp) * sizeof(Bf16));
      return;
    }
    RoundRow(x + i * ldx, k, kp, out);
  });
}

// OUT [pairs][16] = TILE [16][pairs] (32-bit words; PAIRS a multiple of 16), by 16 x 16
// transposes in registers: unpacks of words and of their pairs within each 128-bit lane,
// then two rounds of lane shuffles.
__attribute__((target("avx512f"))) void TransposeWords16(const uint32_t* tile, int64_t pairs, uint32_t* out) {
  for (int64_t p0 = 0; p0 < pairs; p0 += kTile) {
    __m512i r[16], a[16], b[16];
    for (int c = 0; c < 16; ++c) r[c] = _mm512_loadu_si512(tile + c * pairs + p0);
    for (int i = 0; i < 8; ++i) {
      a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // b[4i + j], lane l: word 4l + j of rows 4i .. 4i + 3.
    for (int i = 0; i < 4; ++i) {
      b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
      b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
      b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
      b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int j = 0; j < 4; ++j) {
      const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x44), c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xee);
      const __m512i c2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x44);
      const __m512i c3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xee);
      _mm512_storeu_si512(out + (p0 + j) * kTile, _mm512_shuffle_i32x4(c0, c2, 0x88));
      _mm512_storeu_si512(out + (p0 + 4 + j) * kTile, _mm512_shuffle_i32x4(c0, c2, 0xdd));
      _mm512_storeu_si512(out + (p0 + 8 + j) * kTile, _mm512_shuffle_i32x4(c1, c3, 0x88));
      _mm512_storeu_si512(out + (p0 + 12 + j) * kTile, _mm512_shuffle_i32x4(c1, c3, 0xdd));
    }
  }
}

// PackBf16PanelsTransposed's pairs of k: W's rows 2j and 2j + 1 (zero past K), 16 of
// their columns rounded and interleaved into a panel row of pairs at a time.
__attribute__((target("avx512f"))) void PackTransposedAvx512(const float* w, int64_t k, int64_t rows, int64_t ldw,
                                                             int64_t kp, uint16_t* panels) {
  const int64_t panel_count = Bf16Panels::Elements(rows, k) / (kp * kTile);
  for (int64_t p = 0; p < panel_count; ++p) {
    const __mmask16 lanes = FirstLanes(std::max<int64_t>(rows - p * kTile, 0));
    auto* out = reinterpret_cast<uint32_t*>(panels + p * kp * kTile);
    for (int64_t j = 0; j < kp / 2; ++j) {
      const __mmask16 even = 2 * j < k ? lanes : 0, odd = 2 * j + 1 < k ? lanes : 0;
      const __m512i low = RoundToBf16Words(_mm512_maskz_loadu_ps(even, w + 2 * j * ldw + p * kTile));
      const __m512i high = RoundToBf16Words(_mm512_maskz_loadu_ps(odd, w + (2 * j + 1) * ldw + p * kTile));
      _mm512_storeu_si512(out + j * kTile, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
    }
  }
}

// PANEL [kp / 2][16][2] from rows [n0, n0 + 16) of ROWS, ROW(r, out) writing row r's kp
// BF16 values: the rows into a tile, then transposed as pairs: by 16 x 16 transposes in
// registers (copied a word at a time, the packing of a decode's queries cost a fifth of
// a short sequence's attention), or a word at a time.
template <typename Row>
void PackRowsPanel(int64_t rows, int64_t kp, int64_t n0, Bf16* panel, Row&& row) {
  auto* out = reinterpret_cast<uint32_t*>(panel);  // a pair of k a word
  if (n0 >= rows) {  // a panel past the rows (the second of a block of 32)
    std::fill(panel, panel + kp * kTile, Bf16{0});
    return;
  }
  Bf16* tile = Scratch<Bf16>(kRoundedRow, kTile * kp);
  for (int64_t c = 0; c < kTile; ++c) {
    if (n0 + c < rows) {
      row(n0 + c, tile + c * kp);
    } else {
      std::fill(tile + c * kp, tile + (c + 1) * kp, Bf16{0});
    }
  }
  if (Has(Isa::kAvx512)) {
    TransposeWords16(reinterpret_cast<const uint32_t*>(tile), kp / 2, out);
  } else {
    for (int64_t c = 0; c < kTile; ++c) {
      for (int64_t p = 0; p < kp / 2; ++p) std::memcpy(out + p * kTile + c, tile + c * kp + 2 * p, sizeof(uint32_t));
    }
  }
}

// PANEL [kp / 2][16][2]: weight rows [n0, n0 + 16) (zero past ROWS), pairs of k side by side.
template <typename W>
void PackPanel(const W* w, int64_t stride, int64_t rows, int64_t k, int64_t kp, int64_t n0, Bf16* panel) {
  if constexpr (sizeof(W) == 4) {
    PackRowsPanel(rows, kp, n0, panel, [&](int64_t r, Bf16* tile_row) { RoundRow(w + r * stride, k, kp, tile_row); });
  } else if (n0 + kTile <= rows && k == kp) {
    // The common case: BF16 pairs copied as 32-bit words, a 16-column transpose.
    auto* out = reinterpret_cast<uint32_t*>(panel);  // a pair of k a word
    for (int64_t c = 0; c < kTile; ++c) {
      const W* row = w + (n0 + c) * stride;
      for (int64_t p = 0; p < kp / 2; ++p) std::memcpy(out + p * kTile + c, row + 2 * p, sizeof(uint32_t));
    }
  } else {
    for (int64_t c = 0; c < kTile; ++c) {
      for (int64_t kk = 0; kk < kp; ++kk) {
        panel[((kk / 2) * kTile + c) * 2 + kk % 2] = n0 + c < rows && kk < k ? w[(n0 + c) * stride + kk] : Bf16{0};
      }
    }
  }
}

// Y[i, n0 + j] (+)= C[i][j] for the valid rows and columns of a [rows][kBlockCols] block.
void Store(const float* c, int64_t ldc, int64_t i0, int64_t rows, int64_t n0, int64_t cols, float* y, int64_t ldy,
           bool accumulate) {
  for (int64_t i = 0; i < rows; ++i) {
    float* out = y + (i0 + i) * ldy + n0;
    const float* in = c + i * ldc;
    if (accumulate) {
      for (int64_t j = 0; j < cols; ++j) out[j] += in[j];
    } else {
      std::memcpy(out, in, static_cast<size_t>(cols) * sizeof(float));
    }
  }
}

// --- AMX ---------------------------------------------------------------------------

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

#define EPIC_AMX __attribute__((target("amx-tile,amx-bf16,avx512f")))

// Tiles 0-3: C (16 x 16 F32); 4, 5: A (16 rows x 32 BF16); 6, 7: B (16 pair rows x 16 columns).
EPIC_AMX void ConfigureTiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kTile;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// C [32][32] = XB rows [i0, i0 + 32) times the two panels (columns [0, 16) and [16, 32)).
EPIC_AMX void AmxBlock(const Bf16* xb, int64_t kp, int64_t i0, const Bf16* panel0, const Bf16* panel1, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t stride = kp * static_cast<int64_t>(sizeof(Bf16));
  const Bf16* a0 = xb + i0 * kp;
  const Bf16* a1 = xb + (i0 + kTile) * kp;
  for (int64_t k = 0; k < kp; k += kKStep) {
    _tile_loadd(4, a0 + k, stride);
    _tile_loadd(5, a1 + k, stride);
    _tile_loadd(6, panel0 + k * kTile, 64);  // pair rows k/2 .. k/2 + 15, 64 bytes each
    _tile_loadd(7, panel1 + k * kTile, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  constexpr int64_t ldc = kBlockCols * sizeof(float);
  _tile_stored(0, c, ldc);
  _tile_stored(1, c + kTile, ldc);
  _tile_stored(2, c + kTile * kBlockCols, ldc);
  _tile_stored(3, c + kTile * kBlockCols + kTile, ldc);
}

EPIC_AMX void ReleaseTiles() { _tile_release(); }

// --- AVX512_BF16 ---------------------------------------------------------------------

#define EPIC_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// kRows rows of BF16 values STRIDE apart from ROWS, read a pair of values (32 bits) at a
// time: a pointer a group of 4 rows, moved a pair at a time by Next, and the group's rows
// at 0-3 strides from it. A pointer a row took more registers than there are, and was
// spilled and reloaded every pair.
template <int kRows>
struct RowPairs {
  using Word = int32_t __attribute__((may_alias));
  static constexpr int kGroups = (kRows + 3) / 4;

  RowPairs(const Bf16* rows, int64_t stride) {
    for (int g = 0; g < kGroups; ++g) group[g] = reinterpret_cast<const char*>(rows + 4 * g * stride);
    s1 = stride * static_cast<int64_t>(sizeof(Bf16));
    s2 = 2 * s1;
    s3 = 3 * s1;
  }
  // Once a pass: the strides made opaque, so that the compiler keeps them as index
  // registers rather than making a pointer a row again.
  void Pin() { asm("" : "+r"(s1), "+r"(s2), "+r"(s3)); }
  int32_t Pair(int r) const {
    const int64_t offset = r % 4 == 0 ? 0 : r % 4 == 1 ? s1 : r % 4 == 2 ? s2 : s3;
    return *reinterpret_cast<const Word*>(group[r / 4] + offset);
  }
  void Next() {
    for (int g = 0; g < kGroups; ++g) group[g] += sizeof(Word);
  }

  const char* group[kGroups];
  int64_t s1, s2, s3;
};

constexpr int kDotRows = 12;  // 24 accumulators, 2 panel rows and a broadcast: 27 of 32 registers

// Y [12][32] (+)= XB rows [i0, i0 + 12) times the two panels over their first PAIRS
// pairs of k, of which the first VALID_ROWS rows and COLS columns are stored: each pair
// of x broadcast, dotted with a panel row of 16 column pairs. Stored from the registers
// under masks (through a block in memory copied a row at a time, a product over k = 96,
// prefill's scores, ran at 0.69 of the kernel's rate). X's pairs through RowPairs: with a
// pointer a row, three were reloaded from vector registers and the stack every pair (the
// BF16 expanded attention 0.90-0.96x the time at 512 tokens, 0.94x at 2048, Zen 4).
EPIC_AVX512_BF16 void DotBlock(const Bf16* xb, int64_t kp, int64_t pairs, int64_t i0, const Bf16* panel0,
                               const Bf16* panel1, float* y, int64_t ldy, int64_t valid_rows, int64_t cols,
                               bool accumulate) {
  constexpr int kRows = kDotRows;
  __m512 acc0[kRows], acc1[kRows];
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  RowPairs<kRows> x(xb + i0 * kp, kp);
  for (int64_t p = 0; p < pairs; ++p) {
    x.Pin();
    const __m512bh b0 = (__m512bh)_mm512_load_si512(panel0 + p * 2 * kTile);
    const __m512bh b1 = (__m512bh)_mm512_load_si512(panel1 + p * 2 * kTile);
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(x.Pair(r));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], a, b0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], a, b1);
    }
    x.Next();
  }
  const __mmask16 mask0 = FirstLanes(cols);
  const __mmask16 mask1 = FirstLanes(std::max<int64_t>(cols - kTile, 0));
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) {
    if (r >= valid_rows) break;
    float* out = y + r * ldy;
    if (accumulate) {
      acc0[r] = _mm512_add_ps(acc0[r], _mm512_maskz_loadu_ps(mask0, out));
      acc1[r] = _mm512_add_ps(acc1[r], _mm512_maskz_loadu_ps(mask1, out + kTile));
    }
    _mm512_mask_storeu_ps(out, mask0, acc0[r]);
    _mm512_mask_storeu_ps(out + kTile, mask1, acc1[r]);
  }
}

// DotBlock's sums without BF16 instructions (hosts that have none; products of packed
// panels, MatMulBf16Panels, still run there): the same products of the same operands.
void PlainBlock(const Bf16* xb, int64_t kp, int64_t i0, const Bf16* panel0, const Bf16* panel1, float* c) {
  for (int r = 0; r < kDotRows; ++r) {
    const Bf16* row = xb + (i0 + r) * kp;
    for (int64_t j = 0; j < kBlockCols; ++j) {
      const Bf16* panel = j < kTile ? panel0 : panel1;
      const int64_t col = j % kTile;
      float sum = 0.0f;
      for (int64_t p = 0; p < kp / 2; ++p) {
        for (int h = 0; h < 2; ++h) {
          sum += Bf16ToFloat(row[2 * p + h]) * Bf16ToFloat(panel[(p * kTile + col) * 2 + h]);
        }
      }
      c[r * kBlockCols + j] = sum;
    }
  }
}


// Y [rows][heads] for kRows rows of BF16 values (STRIDE apart) against one panel of 16
// heads over PAIRS pairs of k: each row's pair broadcast, dotted with the panel's row.
// The AHEAD rows after them are prefetched as it goes: a decode's cache rows come from
// memory (the step's weights pushed them out of the caches), and without it the scores
// ran no faster than their F32 form.
template <int kRows>
EPIC_AVX512_BF16 void RowsBlock(const Bf16* rows, int64_t stride, const Bf16* panel, int64_t pairs, __mmask16 heads,
                                int64_t ahead, float* y, int64_t ldy) {
  constexpr int64_t kLinePairs = 16;  // pairs of BF16 in a 64-byte line
  __m512 acc[kRows];
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  RowPairs<kRows> x(rows, stride);
  for (int64_t p = 0; p < pairs; ++p) {
    if (p % kLinePairs == 0) {
      for (int64_t r = 0; r < ahead; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(rows + (kRows + r) * stride + 2 * p), _MM_HINT_T0);
      }
    }
    x.Pin();
    const __m512bh b = (__m512bh)_mm512_loadu_si512(panel + p * 2 * kTile);
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(x.Pair(r)), b);
    x.Next();
  }
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) _mm512_mask_storeu_ps(y + r * ldy, heads, acc[r]);
}

EPIC_AVX512_BF16 void MatMulBf16RowsDot(const Bf16* rows, int64_t n, int64_t stride, const Bf16Panels& q,
                                        int64_t heads, int64_t k, float* y, int64_t ldy) {
  for (int64_t h0 = 0; h0 < heads; h0 += kTile) {
    const Bf16* panel = q.data + (h0 / kTile) * q.panel_elements();
    const __mmask16 lanes = FirstLanes(heads - h0);
    // Blocks of 12 rows (12 accumulators, latency hidden), the tail by 4 and by 1; the
    // next rows prefetched only in the first panel's pass.
    auto ahead = [&](int64_t t, int64_t block) { return h0 == 0 ? std::min(block, n - t - block) : 0; };
    int64_t t = 0;
    for (; t + kDotRows <= n; t += kDotRows) {
      RowsBlock<kDotRows>(rows + t * stride, stride, panel, k / 2, lanes, ahead(t, kDotRows), y + t * ldy + h0, ldy);
    }
    for (; t + 4 <= n; t += 4) {
      RowsBlock<4>(rows + t * stride, stride, panel, k / 2, lanes, ahead(t, 4), y + t * ldy + h0, ldy);
    }
    for (; t < n; ++t) RowsBlock<1>(rows + t * stride, stride, panel, k / 2, lanes, 0, y + t * ldy + h0, ldy);
  }
}

// Y [kHeads][16 columns] (+)= X [kHeads][n] W [n][16 columns], both BF16, for W's
// columns [c, c + 16) (LANES of them): each pair of W's rows interleaved in registers
// (lanes in the order below, put back on the store), dotted with each head's pair of X.
template <int kHeads>
EPIC_AVX512_BF16 void NoTransBf16Block(const Bf16* x, int64_t ldx, const Bf16* w, int64_t n, int64_t stride,
                                       __mmask16 lanes, float* y, int64_t ldy, bool accumulate) {
  // unpacklo/hi of two rows' 16 values pair columns 0-3 and 8-11, then 4-7 and 12-15.
  const __m512i order = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
  __m512 acc[kHeads];
#pragma GCC unroll 16
  for (int h = 0; h < kHeads; ++h) acc[h] = _mm512_setzero_ps();
  const char* wt = reinterpret_cast<const char*>(w);
  int64_t w_stride = stride * static_cast<int64_t>(sizeof(Bf16));
  // Rows T and T + 1 of W (R0, R1) against X's pairs (X[h, t], X[h, t + 1]: at any t,
  // aligned or not).
  auto step = [&](const RowPairs<kHeads>& x_pairs, __m256i r0, __m256i r1) EPIC_AVX512_BF16 {
    const __m512bh pairs = (__m512bh)_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_unpacklo_epi16(r0, r1)),
                                                        _mm256_unpackhi_epi16(r0, r1), 1);
#pragma GCC unroll 16
    for (int h = 0; h < kHeads; ++h) {
      acc[h] = _mm512_dpbf16_ps(acc[h], pairs, (__m512bh)_mm512_set1_epi32(x_pairs.Pair(h)));
    }
  };
  RowPairs<kHeads> x_pairs(x, ldx);
  for (int64_t t = 0; t + 1 < n; t += 2) {
    x_pairs.Pin();
    asm("" : "+r"(w_stride));  // an index register too
    step(x_pairs, _mm256_maskz_loadu_epi16(lanes, wt), _mm256_maskz_loadu_epi16(lanes, wt + w_stride));
    wt += 2 * w_stride;
    x_pairs.Next();
  }
  // The last row of an odd count, paired with zeros (X's pair past it meets them).
  if (n % 2 != 0) step(RowPairs<kHeads>(x + n - 1, ldx), _mm256_maskz_loadu_epi16(lanes, wt), _mm256_setzero_si256());
#pragma GCC unroll 16
  for (int h = 0; h < kHeads; ++h) {
    __m512 v = _mm512_permutexvar_ps(order, acc[h]);
    if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, y + h * ldy));
    _mm512_mask_storeu_ps(y + h * ldy, lanes, v);
  }
}

EPIC_AVX512_BF16 void MatMulNoTransBf16Dot(const Bf16* x, int64_t ldx, int64_t m, const Bf16* w, int64_t n,
                                           int64_t stride, int64_t cols, float* y, int64_t ldy, bool accumulate) {
  // Rows of X in blocks of 16 (a register each, and the pairs), the rest by 8, 4, 2, 1.
  for (int64_t i = 0; i < m;) {
    const int64_t left = m - i;
    const int64_t rows = left >= 16 ? 16 : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 lanes = FirstLanes(cols - c);
      const Bf16* xi = x + i * ldx;
      float* yi = y + i * ldy + c;
      switch (rows) {
        case 16: NoTransBf16Block<16>(xi, ldx, w + c, n, stride, lanes, yi, ldy, accumulate); break;
        case 8: NoTransBf16Block<8>(xi, ldx, w + c, n, stride, lanes, yi, ldy, accumulate); break;
        case 4: NoTransBf16Block<4>(xi, ldx, w + c, n, stride, lanes, yi, ldy, accumulate); break;
        case 2: NoTransBf16Block<2>(xi, ldx, w + c, n, stride, lanes, yi, ldy, accumulate); break;
        default: NoTransBf16Block<1>(xi, ldx, w + c, n, stride, lanes, yi, ldy, accumulate); break;
      }
    }
    i += rows;
  }
}

enum class Path { kNone, kDot, kAmx };

Path FastPathOf() {
  if (Has(Isa::kAmx)) return Path::kAmx;
  if (Has(Isa::kAvx512Bf16)) return Path::kDot;
  return Path::kNone;
}

template <typename W>
void MatMulFast(Path path, const float* x, int64_t m, int64_t ldx, const W* w, int64_t stride, int64_t rows,
                int64_t k, float* y, int64_t ldy, bool accumulate);

// The AMX kernel checked once against the dot-product one on a product with every edge
// (row and column tails, a k tail) before any real use: a host whose tiles misbehave
// (seen: guests that report AMX and never grant it) falls back, and says so.
bool AmxAgreesWithDot() {
  const int64_t m = 37, n = 45, k = 70;
  std::vector<float> x(static_cast<size_t>(m * k));
  std::vector<Bf16> w(static_cast<size_t>(n * k));
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(static_cast<int>(i * 7919 % 201) - 100) / 64.0f;
  for (size_t i = 0; i < w.size(); ++i) w[i] = FloatToBf16(static_cast<float>(static_cast<int>(i * 104729 % 199) - 99) / 32.0f);
  std::vector<float> amx(static_cast<size_t>(m * n)), dot(amx.size());
  MatMulFast(Path::kAmx, x.data(), m, k, w.data(), k, n, k, amx.data(), n, false);
  MatMulFast(Path::kDot, x.data(), m, k, w.data(), k, n, k, dot.data(), n, false);
  for (size_t i = 0; i < amx.size(); ++i) {
    if (std::fabs(amx[i] - dot[i]) > 1e-5f * (1.0f + std::fabs(dot[i]))) {
      std::fprintf(stderr, "epic: the AMX kernel disagrees with AVX512_BF16 on this host; using AVX512_BF16\n");
      return false;
    }
  }
  return true;
}

Path ActivePath() {
  static const Path path = [] {
    const Path best = FastPathOf();
    return best == Path::kAmx && !AmxAgreesWithDot() ? Path::kDot : best;
  }();
  return path;
}

// Rows of x a register block (or AMX's two A tiles) takes.
int64_t BlockRows(Path path) { return path == Path::kAmx ? 2 * kTile : kDotRows; }

// Y (+)= X W^T with W's rows in panels of 16 (PackPanel's layout): PANELS(b, kp, &p0, &p1)
// gives the two panels of output columns [32 b, 32 b + 32) over KP values of k, on the
// calling thread; X already in BF16, XB [RoundUp(m, BlockRows(path))][kp].
template <typename Panels>
void ProductOverRounded(Path path, const Bf16* xb, int64_t m, int64_t rows, int64_t k, float* y, int64_t ldy,
                        bool accumulate, const Panels& panels, Causal causal = {}) {
  const int64_t kp = RoundUp(k, kKStep);
  const int64_t block_rows = BlockRows(path);
  const int64_t blocks = (rows + kBlockCols - 1) / kBlockCols;
  const double work = static_cast<double>(m) * static_cast<double>(rows) * static_cast<double>(k);
  const int threads = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(work / (1 << 20)) + 1));
  OnTeam(threads, [&](int t, int n) {
    float* c = Scratch<float>(kOutputBlock, block_rows * kBlockCols);
    if (path == Path::kAmx) ConfigureTiles();
    int64_t b0, b1;
    internal::SplitRange(blocks, n, t, &b0, &b1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kBlockCols;
      const int64_t cols = std::min(kBlockCols, rows - n0);
      const Bf16* panel0;
      const Bf16* panel1;
      panels(b, kp, &panel0, &panel1);
      for (int64_t i0 = 0; i0 < m; i0 += block_rows) {
        const int64_t valid_rows = std::min(block_rows, m - i0);
        // The block's last row's reach: its columns, or its k, under CAUSAL.
        const int64_t reach = causal.first + i0 + valid_rows;
        if (causal.kind == Causal::kColumns && n0 >= reach) continue;
        const int64_t pairs = causal.kind == Causal::kK ? std::clamp<int64_t>((reach + 1) / 2, 0, kp / 2) : kp / 2;
        if (path == Path::kAmx) {
          AmxBlock(xb, kp, i0, panel0, panel1, c);
        } else if (path == Path::kDot) {
          DotBlock(xb, kp, pairs, i0, panel0, panel1, y + i0 * ldy + n0, ldy, valid_rows, cols, accumulate);
          continue;
        } else {
          PlainBlock(xb, kp, i0, panel0, panel1, c);
        }
        Store(c, kBlockCols, i0, valid_rows, n0, cols, y, ldy, accumulate);
      }
    }
    if (path == Path::kAmx) ReleaseTiles();
  });
}

// The same from X in F32, rounded first.
template <typename Panels>
void ProductOverPanels(Path path, const float* x, int64_t m, int64_t ldx, int64_t rows, int64_t k, float* y,
                       int64_t ldy, bool accumulate, const Panels& panels, Causal causal = {}) {
  const int64_t kp = RoundUp(k, kKStep);
  const int64_t mp = RoundUp(m, BlockRows(path));
  // The calling thread's, shared by the team: x in BF16, read by every column block (a
  // vector of its own each call was allocated and zeroed first).
  Bf16* xb = Scratch<Bf16>(kRoundedX, mp * kp);
  RoundActivations(x, m, ldx, k, mp, kp, xb);
  ProductOverRounded(path, xb, m, rows, k, y, ldy, accumulate, panels, causal);
}

// PANELS for Bf16Panels' column blocks in place.
auto InPlace(const Bf16Panels& w) {
  return [&w](int64_t b, int64_t, const Bf16** panel0, const Bf16** panel1) {
    *panel0 = w.data + 2 * b * w.panel_elements();
    *panel1 = *panel0 + w.panel_elements();
  };
}

template <typename W>
void MatMulFast(Path path, const float* x, int64_t m, int64_t ldx, const W* w, int64_t stride, int64_t rows,
                int64_t k, float* y, int64_t ldy, bool accumulate) {
  ProductOverPanels(path, x, m, ldx, rows, k, y, ldy, accumulate,
                    [&](int64_t b, int64_t kp, const Bf16** panel0, const Bf16** panel1) {
                      Bf16* packed = Scratch<Bf16>(kPackedPanels, 2 * kp * kTile);
                      PackPanel(w, stride, rows, k, kp, b * kBlockCols, packed);
                      PackPanel(w, stride, rows, k, kp, b * kBlockCols + kTile, packed + kp * kTile);
                      *panel0 = packed;
                      *panel1 = packed + kp * kTile;
                    });
}

}  // namespace

const char* PrecisionName(Precision precision) { return precision == Precision::kFast ? "fast" : "exact"; }

bool ParsePrecision(const char* name, Precision* precision) {
  for (const Precision p : {Precision::kExact, Precision::kFast}) {
    if (std::strcmp(name, PrecisionName(p)) == 0) {
      *precision = p;
      return true;
    }
  }
  return false;
}

void MatMul(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y, int64_t ldy, bool accumulate,
            Precision precision) {
  const Path path = ActivePath();
  if (precision == Precision::kExact || path == Path::kNone || m < internal::kFastMinRows || w.rows <= 0 ||
      w.cols <= 0 || w.type == WeightType::kI8) {
    MatMul(x, m, ldx, w, y, ldy, accumulate);
    return;
  }
  if (w.type == WeightType::kBF16) {
    MatMulFast(path, x, m, ldx, static_cast<const Bf16*>(w.data), w.row_stride, w.rows, w.cols, y, ldy, accumulate);
  } else {
    MatMulFast(path, x, m, ldx, static_cast<const float*>(w.data), w.row_stride, w.rows, w.cols, y, ldy, accumulate);
  }
}

void MatMulBf16Panels(const float* x, int64_t m, int64_t ldx, const Bf16Panels& w, int64_t rows, int64_t k, float* y,
                      int64_t ldy, Causal causal) {
  if (m <= 0 || rows <= 0) return;
  ProductOverPanels(ActivePath(), x, m, ldx, rows, k, y, ldy, /*accumulate=*/false, InPlace(w), causal);
}

int64_t Bf16Rows(int64_t m) { return RoundUp(m, BlockRows(ActivePath())); }

void RoundRowsToBf16(const float* x, int64_t m, int64_t ldx, int64_t k, uint16_t* xb) {
  RoundActivations(x, m, ldx, k, Bf16Rows(m), Bf16Panels::Kp(k), xb);
}

void MatMulBf16PanelsRounded(const uint16_t* xb, int64_t m, const Bf16Panels& w, int64_t rows, int64_t k, float* y,
                             int64_t ldy, Causal causal) {
  if (m <= 0 || rows <= 0) return;
  ProductOverRounded(ActivePath(), xb, m, rows, k, y, ldy, /*accumulate=*/false, InPlace(w), causal);
}

void PackBf16Panels(const float* w, int64_t rows, int64_t k, int64_t ldw, uint16_t* panels) {
  const int64_t kp = Bf16Panels::Kp(k);
  const int64_t count = Bf16Panels::Elements(rows, k) / (kp * kTile);
  for (int64_t i = 0; i < count; ++i) PackPanel(w, ldw, rows, k, kp, i * kTile, panels + i * kp * kTile);
}

// Rows of A a joined packing reads ahead: each row is a short run (a head's k_nope, 256
// bytes) of a long one (every head's keys and values), the hardware's prefetchers do not
// follow them, and the packing waited on each (16 heads' keys at 512 tokens, one thread:
// 270-420 us, 190-205 with it; 4 to 32 rows ahead alike).
constexpr int64_t kJoinedAhead = 8;

void PackBf16PanelsJoined(const float* a, int64_t lda, int64_t ka, const uint16_t* b, int64_t ldb, int64_t kb,
                          int64_t rows, uint16_t* panels) {
  const int64_t k = ka + kb;
  const int64_t kp = Bf16Panels::Kp(k);
  const int64_t count = Bf16Panels::Elements(rows, k) / (kp * kTile);
  for (int64_t i = 0; i < count; ++i) {
    PackRowsPanel(rows, kp, i * kTile, panels + i * kp * kTile, [&](int64_t r, Bf16* tile_row) {
      if (r + kJoinedAhead < rows) {
        const char* ahead = reinterpret_cast<const char*>(a + (r + kJoinedAhead) * lda);
        for (int64_t byte = 0; byte < ka * static_cast<int64_t>(sizeof(float)); byte += 64) {
          __builtin_prefetch(ahead + byte, 0, 3);
        }
      }
      kRoundRow(a + r * lda, ka, tile_row);
      std::memcpy(tile_row + ka, b + r * ldb, static_cast<size_t>(kb) * sizeof(Bf16));
      std::fill(tile_row + k, tile_row + kp, Bf16{0});
    });
  }
}

void PackBf16PanelsTransposed(const float* w, int64_t k, int64_t rows, int64_t ldw, uint16_t* panels) {
  const int64_t kp = Bf16Panels::Kp(k);
  if (Has(Isa::kAvx512)) return PackTransposedAvx512(w, k, rows, ldw, kp, panels);
  const int64_t padded_rows = Bf16Panels::Elements(rows, k) / kp;
  for (int64_t r = 0; r < padded_rows; ++r) {
    for (int64_t c = 0; c < kp; ++c) {
      panels[Bf16Panels::Index(kp, r, c)] = r < rows && c < k ? FloatToBf16(w[c * ldw + r]) : Bf16{0};
    }
  }
}

void MatMulBf16Rows(const uint16_t* rows, int64_t n, int64_t stride, const Bf16Panels& q, int64_t heads, int64_t k,
                    float* y, int64_t ldy) {
  if (Has(Isa::kAvx512Bf16)) return MatMulBf16RowsDot(rows, n, stride, q, heads, k, y, ldy);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      float sum = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        sum += Bf16ToFloat(rows[t * stride + j]) * Bf16ToFloat(q.data[Bf16Panels::Index(q.kp, h, j)]);
      }
      y[t * ldy + h] = sum;
    }
  }
}

void MatMulNoTransBf16(const uint16_t* x, int64_t ldx, int64_t m, const uint16_t* w, int64_t n, int64_t stride,
                       int64_t cols, float* y, int64_t ldy, bool accumulate) {
  if (Has(Isa::kAvx512Bf16)) return MatMulNoTransBf16Dot(x, ldx, m, w, n, stride, cols, y, ldy, accumulate);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = 0; c < cols; ++c) {
      float sum = 0.0f;
      for (int64_t t = 0; t < n; ++t) sum += Bf16ToFloat(x[i * ldx + t]) * Bf16ToFloat(w[t * stride + c]);
      y[i * ldy + c] = accumulate ? y[i * ldy + c] + sum : sum;
    }
  }
}

void RoundToBf16(const float* in, int64_t n, uint16_t* out) { kRoundRow(in, n, out); }

bool Bf16ProductsBeatF32() {
  const Path path = ActivePath();
  return path == Path::kAmx || (path == Path::kDot && AmdZenAvx512() >= 4);
}

namespace internal {

const char* FastPath() {
  switch (ActivePath()) {
    case Path::kAmx: return "amx";
    case Path::kDot: return "avx512_bf16";
    case Path::kNone: return nullptr;
  }
  return nullptr;
}

}  // namespace internal
}  // namespace epic::cpu
