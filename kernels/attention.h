// Decode attention on the CPU: one query position per row (or a few: speculative drafts being
// verified) over a batch KV cache, as mlx-lm's BatchKVCache / BatchRotatingKVCache hand it over
// (left-padded rows, a rotated window, GQA).
// MLX's CPU SDPA runs ~8 ops for it (two batched matmuls, a where, a softmax with MLX's slow exp);
// this is one pass over K and V per (row, kv head).
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxd {

namespace mx = mlx::core;

// q [B, Hq, L, D], k [B, Hk, T, D], v [B, Hk, T, Dv] float32 (any strides; views into a cache's
// buffer are read in place), Hq a multiple of Hk. mask: bool [B or 1, 1, L or 1, T], false where
// a key is not attended (padding, outside the window, after the query position); none attends
// every key. Returns float32 softmax(scale * q k^T) v as [B, Hq, L, Dv], as
// mx.fast.scaled_dot_product_attention. Each query position is a pass of its own over K and V:
// meant for a few positions, not for a prefill.
mx::array decode_attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const std::optional<mx::array>& mask,
    float scale);

class DecodeAttention : public mx::UnaryPrimitive {
 public:
  DecodeAttention(mx::Stream s, float scale) : mx::UnaryPrimitive(s), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxdDecodeAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const DecodeAttention&>(other).scale_;
  }

 private:
  float scale_;
};

} // namespace mlxd
