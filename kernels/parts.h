// The primitives' computations on raw rows (internal to kernels/): each primitive's eval runs
// its own, and the fused decoder layer (decoder.cpp) runs them back to back, so both give the
// same bits.
#pragma once

#include <cstdint>

#include "attention_job.h"
#include "mlx/array.h"
#include "qdot.h"

namespace mlxd {

struct RopeArgs {
  int dims;
  bool traditional;
  float base, scale;
};

// attn_in's (layer.h): x [B, K] -> ys[0] q [B, Hq, D], ys[1] k [B, Hk, D], ys[2] v [B, Hk, Dv]
// for the q, k, v weights W (data set); off holds B positions (per_row) or one; qn, kn the
// per-head norm weights or null; bias the q, k, v biases or null.
void attn_in_rows(
    const QWeight* W,
    const float* x,
    const float* nw,
    float eps,
    int B,
    int Hq,
    int Hk,
    const int32_t* off,
    bool per_row,
    const float* qn,
    const float* kn,
    const float* const* bias,
    const RopeArgs& rope,
    float* const* ys);

// decode_attention's (attention.h).
void attention_rows(const Job& j);

// qmm's: y [M, N] = x [M, K] . dequantize(W)^T.
void qmm_rows(const QWeight& W, const float* x, int M, float* y);

// mlp_residual's (mlp.h) over M rows: y = x + mlp(rms_norm(x, nw, eps)), the MLP's output
// RMS-normed with post_nw first when given.
void mlp_residual_rows(
    const QWeight& G,
    const QWeight& U,
    const QWeight& Dn,
    bool gelu,
    const float* x,
    const float* nw,
    const float* post_nw,
    float eps,
    int M,
    float* y);

// kv_update's (kv_cache.h): positions [t0, t0 + L) of the row-major buffer dst (T positions)
// from src [B, H, L, D] (any strides).
void write_rows(const mlx::core::array& src, char* dst, int64_t T, int64_t t0);

} // namespace mlxd
