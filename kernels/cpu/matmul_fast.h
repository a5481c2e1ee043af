// Products with BF16 activations on the processor's BF16 instructions: the engine's
// fast precision (--precision fast). Each activation is rounded to BF16 (8 significant
// bits, ~2e-3 relative) before the product; weights are BF16 already (F32 weights are
// rounded too); sums stay F32. AMX tiles where the host has them (Intel Sapphire
// Rapids and later), else AVX512_BF16 dot products (e.g. AMD Zen 4); hosts with neither,
// and products of few rows (decode, where reading the weights bounds the time and
// rounding would gain nothing), run the exact MatMul.
#pragma once

#include <cstdint>

#include "kernels/cpu/matmul.h"

namespace epic::cpu {

// How a backend computes its products.
enum class Precision { kExact, kFast };

// "exact" / "fast".
const char* PrecisionName(Precision precision);
// The precision NAME names ("exact" or "fast"), or false.
bool ParsePrecision(const char* name, Precision* precision);

// --precision's help, shared by the programs that take it.
inline constexpr const char* kPrecisionHelp =
    "how the CPU computes the matrix products: exact (F32 activations against the checkpoint's BF16/F32 "
    "weights, checked against float64 to 1e-5) or fast (the products' weights quantized to int8 per row at "
    "load, activations per 256 values at each product, summed exactly in int32 (AVX512_VNNI, AVX-VNNI or AVX2, "
    "one result on each): half the weight memory, about 2x decode and 2-3x prefill; its error is in "
    "docs/performance.md). A processor without AVX2 runs exact, and says so. The embedding and the routers stay "
    "exact. The latent cache holds BF16 rows (half its memory), and decode's attention takes its queries and "
    "probabilities in BF16 against them; prefill's attention takes BF16 operands on processors whose BF16 products outrun "
    "F32 (AMX, AVX512_BF16 on AMD Zen 4 and 5), F32 ones elsewhere";

// MatMul's contract with PRECISION: kExact is MatMul itself.
void MatMul(const float* x, int64_t m, int64_t ldx, const WeightMatrix& w, float* y, int64_t ldy, bool accumulate,
            Precision precision);

// A matrix of BF16 weights packed once for many products (the expanded attention's keys
// and values, whose prefixes each chunk of queries reads): panels of 16 rows, each
// [kp / 2][16][2] (pairs of k side by side), at data + i * kp * 16 for panel i; rows
// and k zero-padded to an even number of panels and to kp, a multiple of 32. DATA is
// 64-byte aligned (the kernels load whole panel rows aligned).
struct Bf16Panels {
  const uint16_t* data = nullptr;
  int64_t kp = 0;
  int64_t panel_elements() const { return kp * 16; }
  // Index of weight (ROW, K) in the packed layout.
  static int64_t Index(int64_t kp, int64_t row, int64_t k) {
    return (row / 16) * kp * 16 + ((k / 2) * 16 + row % 16) * 2 + k % 2;
  }
  // Elements to hold ROWS x K packed; its kp.
  static int64_t Elements(int64_t rows, int64_t k) { return (rows + 31) / 32 * 32 * Kp(k); }
  static int64_t Kp(int64_t k) { return (k + 31) / 32 * 32; }
};

// W [rows x k] (row stride LDW) rounded to BF16 (as FloatToBf16) into PANELS
// (Bf16Panels::Elements(rows, k) values, laid out as Bf16Panels::Index), zeros past K
// and past ROWS.
void PackBf16Panels(const float* w, int64_t rows, int64_t k, int64_t ldw, uint16_t* panels);

// PackBf16Panels of the rows [A[r, 0, ka) rounded | B[r, 0, kb)], B already BF16, with
// no row put together first: the expanded attention's keys, each head's k_nope beside
// the k_pe all heads share (rounded once for them all). The same panels, bit for bit.
void PackBf16PanelsJoined(const float* a, int64_t lda, int64_t ka, const uint16_t* b, int64_t ldb, int64_t kb,
                          int64_t rows, uint16_t* panels);

// PackBf16Panels of W's transpose: W [k x rows] (row stride LDW) packed as the ROWS x K
// matrix W^T, two rows of W making each pair of k side by side (the expanded attention's
// values, a row per context position, packed a panel row per value dimension, with no
// transposed copy in between).
void PackBf16PanelsTransposed(const float* w, int64_t k, int64_t rows, int64_t ldw, uint16_t* panels);

// What a causal attention's product may leave out, row I of X being position FIRST + I:
// kColumns (its scores), Y's columns past FIRST + I, which are then left as they were;
// kK (its probabilities times values), the terms past k = FIRST + I, X's row I being
// zero there.
struct Causal {
  enum Kind { kNone, kColumns, kK } kind = kNone;
  int64_t first = 0;
};

// Y[m, rows] = X[m, k] W^T with X rounded to BF16 and W's first ROWS rows and first K
// values of k (K <= W.kp) read from its panels: the fast path's product, and a plain loop
// over the same operands on hosts without BF16 instructions. CAUSAL's products skip whole
// blocks of the columns and of k it leaves out.
void MatMulBf16Panels(const float* x, int64_t m, int64_t ldx, const Bf16Panels& w, int64_t rows, int64_t k, float* y,
                      int64_t ldy, Causal causal = {});

// Rows X holds once rounded for MatMulBf16PanelsRounded: M rounded up to the products'
// blocks of rows (12 for vdpbf16ps, 32 for AMX).
int64_t Bf16Rows(int64_t m);

// XB [Bf16Rows(m)][Bf16Panels::Kp(k)] = X [m, k] (rows LDX apart) rounded to BF16 (as
// FloatToBf16), zeros past M and past K.
void RoundRowsToBf16(const float* x, int64_t m, int64_t ldx, int64_t k, uint16_t* xb);

// MatMulBf16Panels over X already rounded, in RoundRowsToBf16's layout: one rounding for
// several products, or rows written rounded where they are made (the BF16 attention's
// probabilities, OnlineSoftmaxRowBf16). The same products, bit for bit.
void MatMulBf16PanelsRounded(const uint16_t* xb, int64_t m, const Bf16Panels& w, int64_t rows, int64_t k, float* y,
                             int64_t ldy, Causal causal = {});

// Y[t, h] = sum_{j < k} rows[t * stride + j] q[h, j] for t < N, h < HEADS: BF16 rows
// (a decode's latent cache) against BF16 queries packed as Bf16Panels (HEADS rows, kp >=
// K; K even), summed in F32: vdpbf16ps where the host has AVX512_BF16, a plain loop
// over the same operands elsewhere (a reference, not a speed-up).
void MatMulBf16Rows(const uint16_t* rows, int64_t n, int64_t stride, const Bf16Panels& q, int64_t heads, int64_t k,
                    float* y, int64_t ldy);

// Y[i, c] (+)= sum_{t < n} X[i, t] W[t, c] for i < M, c < COLS: BF16 X (rows LDX apart;
// when N is odd X[i, n] is read and multiplied by zero, so it must be finite) and BF16
// W (N rows STRIDE apart), summed in F32: a decode's attention outputs, probabilities
// times BF16 latent rows. vdpbf16ps over pairs of W's rows where the host has
// AVX512_BF16, a plain loop elsewhere.
void MatMulNoTransBf16(const uint16_t* x, int64_t ldx, int64_t m, const uint16_t* w, int64_t n, int64_t stride,
                       int64_t cols, float* y, int64_t ldy, bool accumulate);

// OUT[0, n) = IN[0, n) rounded to BF16, as FloatToBf16 (common/half.h) bit for bit.
void RoundToBf16(const float* in, int64_t n, uint16_t* out);

// Whether this host's BF16 products outrun its F32 ones: AMX tiles, or AVX512_BF16 on AMD
// Zen 4 and 5 (AmdZenAvx512(); precision_bench measured them at 1.6-1.8x F32 on prefill
// shapes on Zen 4, 1.65-2.2x on Zen 5; an Intel host without usable AMX ran them at
// 0.6x). There the fast precision's attention takes BF16 operands.
bool Bf16ProductsBeatF32();

namespace internal {

// The fast path's instructions on this host ("amx", "avx512_bf16"), or nullptr when it
// has none (kFast then computes exactly).
const char* FastPath();

// The fewest rows of x the fast path takes; fewer run exactly.
constexpr int64_t kFastMinRows = 8;

}  // namespace internal
}  // namespace epic::cpu
