// Block-quantized dot products with integer activations (AVX-512 VNNI; on arm64 the ARMv8.2
// dot-product instructions, qdot_sdot.cpp). x is quantized per
// 32-value block once per call, in two int8 levels: step = max|x| / 127, q1 = round(x / step),
// q2 = round(256 * (x - q1 * step) / step), so x ~ step / 256 * (256 * q1 + q2) to ~15 bits (one
// level, as llama.cpp's Q8 activations, flipped near-tie greedy tokens of SmolLM2: "Paris" among
// them). A block's dot product is two u8 x s8 VNNI instructions. The bias term of an affine
// weight uses the block's exact float sum of x. Against the fp32 path: ~3e-5 relative error,
// 15-30% less time at one row, the same at 16 (2026-11-29, AMD EPYC, one core, weights in cache);
// 4-bit weights then went 8 blocks a pass (qdot_i8.cpp: ~1.5x less time a row from 5 rows on);
// 8-bit ones too (2026-11-30: the 8-bit 49152x576 lm_head 0.74x the time at 1 row, 0.55x at 16).
#pragma once

#include <vector>

#include "qdot.h"

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define MLXD_VNNI 1
#elif defined(__aarch64__) && defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#define MLXD_SDOT 1
#endif

namespace mlxd {

// x [M, K] float32 quantized per 32-value block for a weight of `bits` bits (4-bit weights read
// the block's even values against low nibbles, odd ones against high nibbles). The weights are
// centered (q - 2^(bits-1)), which halves the rounding error an affine weight's offset would add:
// corr holds each block's -2^(bits-1) * sum(256 * q1 + q2), as the 8 int32 lanes VNNI sums into.
struct Acts {
  const float* x = nullptr; // the float32 rows (the path without VNNI reads these)
  std::vector<int8_t> q; // [M, K / 32, 2, 32]: q1 then q2 of each block
  std::vector<float> d; // [M, K / 32] block units (step / 256)
  std::vector<float> sum; // [M, K / 32] block sums of x
  // [M, K / 32, 8] (SDOT: [M, K / 32], each block's total for 4-bit weights, 0 for 8-bit ones,
  // which are centered in registers)
  std::vector<int32_t> corr;
  // Weights are read in full groups of 8 blocks, one int32 lane per block (qdot_i8.cpp): per
  // row and group, q1 then q2 as 8 vectors of 8 lanes (lane l holds 4 bytes of block kLane[l]),
  // the blocks' units, total corrections and sums of x in the same lane order. The blocks past
  // the last full group (K / 32 % 8 of them) are read from q, d, corr and sum.
  std::vector<int8_t> qt; // [M, K / 256, 2, 8, 8, 4] (SDOT: passes of 4 blocks, qdot_sdot.cpp)
  std::vector<float> dt; // [M, K / 256, 8]
  std::vector<int32_t> ct; // [M, K / 256, 8]
  std::vector<float> st; // [M, K / 256, 8]
  int M = 0, K = 0, bits = 0;
};

// Fills `a` for x (with VNNI or SDOT; otherwise only a.x, M and K are set).
void quantize_acts(const float* x, int M, int K, int bits, Acts& a);

#if defined(MLXD_VNNI) || defined(MLXD_SDOT)
// qdot_rows on int8 activations (a.bits must equal W.bits).
void qdot_rows_i8(const QWeight& W, const Acts& a, float* y, int ldy, int n0, int n1);
#endif

} // namespace mlxd
