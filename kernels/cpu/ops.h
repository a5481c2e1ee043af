// Element-wise and row-wise operations of the DeepSeek layer on F32 activations.
#pragma once

#include <cstdint>
#include <span>

namespace epic::cpu {

// out[r, i] = x[r, i] * weight[i] / sqrt(mean_i(x[r, i]^2) + eps) for rows of width n.
// x and out are [rows, ldx] and [rows, ldo]; out may equal x.
void RmsNorm(const float* x, int64_t rows, int64_t n, int64_t ldx, const float* weight, float eps,
             float* out, int64_t ldo);

// Rotates DeepSeek's interleaved pairs (x[2i], x[2i+1]) of one rope slice of width
// 2 * inv_freq_count by angle position * inv_freq[i], and scales by mscale (YaRN's
// attention temperature; 1 otherwise). The angle is taken in double precision so
// that long positions keep their phase.
void ApplyRope(float* x, int64_t position, const double* inv_freq, int64_t inv_freq_count,
               double mscale);
// The same rotation of SLICES slices at x + i * SLICE_STRIDE (a token's heads), the angles'
// cosines and sines computed once for all of them.
void ApplyRope(float* x, int64_t slices, int64_t slice_stride, int64_t position, const double* inv_freq,
               int64_t inv_freq_count, double mscale);
// One position's factors: COS[i] = cos(position * inv_freq[i]) * mscale and SIN[i]
// likewise, for i < COUNT, in double; and the rotation by them, as the forms above do
// (which compute them each call; a step's layers share them).
void RopeFactors(int64_t position, const double* inv_freq, int64_t count, double mscale, double* cos, double* sin);
void ApplyRope(float* x, int64_t slices, int64_t slice_stride, const double* cos, const double* sin, int64_t count);

// out[i] = silu(gate[i]) * up[i].
void SiluMul(const float* gate, const float* up, int64_t n, float* out);

// x = softmax(x) over n values (max-subtracted; exp within 2 ulp of expf on AVX-512).
void Softmax(float* x, int64_t n);

// A softmax's unnormalised share over each column c < COLS of X [ROWS, ldx LDX]:
// out[c * ldo + r] = exp(scale * x[r, c] - max[c]) with max[c] = max_r scale * x[r, c],
// and sum[c] = sum_r out[c * ldo + r] (summed in double). Written transposed: a decode's
// scores for all heads at once have a head per column, its values product a head per row.
void ExpColumns(const float* x, int64_t rows, int64_t cols, int64_t ldx, float scale, float* out, int64_t ldo,
                float* max, float* sum);

// One row's block of a softmax taken a block of keys at a time (FlashAttention's online
// form): the running *MAX raised to the largest SCALE * x[i] for i < VALID, those
// replaced by exp(scale * x[i] - max) and [valid, width) zeroed, and *SUM scaled to the
// new maximum before the block's exponentials are added (in double). Returns
// exp(old max - new max): the factor for the outputs of the blocks before (0 after the
// first, 1 when the maximum holds or VALID is 0). The vector paths' exponentials are
// within about 5e-6 of exp (a cheaper polynomial than Softmax's: the softmax of the BF16
// attention, which keeps 8 bits of each).
float OnlineSoftmaxRow(float* x, int64_t valid, int64_t width, float scale, float* max, double* sum);

// OnlineSoftmaxRow with its exponentials rounded to BF16 (as FloatToBf16) into
// OUT[0, valid) and zeros into OUT[valid, width), X left as it was; the same *MAX, *SUM
// (of the values before rounding) and factor. The BF16 attention's probabilities in one
// pass, for MatMulBf16PanelsRounded.
float OnlineSoftmaxRowBf16(const float* x, int64_t valid, int64_t width, float scale, float* max, double* sum,
                           uint16_t* out);

// y[i] += alpha * x[i].
void Axpy(float alpha, const float* x, int64_t n, float* y);

// y[i] = sum over j of w[j] * x[j][i], in the order of j: the same values, bit for bit,
// as Y zeroed and then Axpy(w[j], x[j], n, y) for each j, in one pass over Y and the
// rows side by side (the MoE combine of a token's experts' outputs; decode's of a
// query's splits).
void WeightedSum(std::span<const float* const> x, const float* w, int64_t n, float* y);

// x[i] *= alpha.
void Scale(float alpha, float* x, int64_t n);

}  // namespace epic::cpu
