// The block-quantized dot-product kernels behind qmm and the fused MLP (internal to kernels/).
#pragma once

#include <cstdint>
#include <vector>

namespace mlxd {

constexpr int kGroup = 32;

enum class SType { F32, F16, BF16 };

// One MLX affine group-32 weight matrix W [N, K]: w packed 4 or 8 bits, scales/biases [N, K/32].
struct QWeight {
  const uint8_t* w;
  const void* scales;
  const void* biases;
  SType stype;
  int N, K, bits;
};

struct Acts;

// y[m, n - n0] (row stride ldy) = x[m, :] . dequantize(W)[n, :] for m < a.M, n in [n0, n1): with
// int8 activations where the build has VNNI or SDOT (qdot_i8.h), else each block is dequantized
// in registers and multiplied with float32 activations by FMAs. A row of y sums in the same
// order alone or in any batch (batched equals single, bit for bit).
void qdot_rows(const QWeight& W, const Acts& a, float* y, int ldy, int n0, int n1);

// Row n's packed weights; its scales and biases converted to float into sf and bf.
const uint8_t* load_row(const QWeight& W, int n, float* sf, float* bf);

// Row groups a kernel prefetches ahead: a thread streams its rows from DRAM, and the hardware
// prefetcher alone leaves a one-row decode latency-bound.
constexpr int kAhead = 4;

// Asks for rows [n, n + count) of W (weights, scales, biases) to be brought into the cache.
void prefetch_rows(const QWeight& W, int n, int count);

// Rows [n0, n1) of dequantize(W) as float32 into out [N, K].
void dequant_rows(const QWeight& W, float* out, int n0, int n1);

// A group of NR (1 or 2) consecutive weight rows from row n: packed weights, scales, biases.
struct RowGroup {
  int n;
  const uint8_t* w[2];
  float* s[2];
  float* b[2];
};

// f.operator()<NR>(group) for rows [n0, n1) of W in groups of 2 (then 1), each group's scales
// and biases converted to float and the groups kAhead further on prefetched.
template <typename F>
void for_row_groups(const QWeight& W, int n0, int n1, F&& f) {
  const int nb = W.K / kGroup;
  std::vector<float> scratch(4 * nb);
  auto group = [&]<int NR>(int n) {
    RowGroup g{n, {}, {}, {}};
    for (int i = 0; i < NR; ++i) {
      g.s[i] = scratch.data() + 2 * i * nb;
      g.b[i] = scratch.data() + (2 * i + 1) * nb;
      g.w[i] = load_row(W, n + i, g.s[i], g.b[i]);
    }
    if (n + (kAhead + 1) * NR <= W.N) {
      prefetch_rows(W, n + kAhead * NR, NR);
    }
    f.template operator()<NR>(g);
  };
  int n = n0;
  for (; n + 2 <= n1; n += 2) {
    group.template operator()<2>(n);
  }
  for (; n < n1; ++n) {
    group.template operator()<1>(n);
  }
}

// Rows per chunk when `threads` share W's N rows (small enough to balance, large enough for the
// hardware prefetcher to see each thread's stream).
int row_chunk(int N, int threads);

// The SIMD code path compiled in: "avx512-vnni" or "neon-dotprod" (int8 activations), "avx512",
// "avx2", "neon", "scalar".
const char* simd_path();

// x[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, for n values (vectorized exp, activations.cpp).
void swiglu(const float* g, const float* u, float* out, int n);

// x[i] = gelu_tanh(g[i]) * u[i] (nn.gelu_approx: gemma's MLP), for n values (vectorized exp).
void gelu_tanh_mul(const float* g, const float* u, float* out, int n);

} // namespace mlxd
