// Attention on the CPU over a KV cache, as mlx-lm's caches hand it over (left-padded rows, a
// rotated window, GQA): one query position per row (decode), a few (speculative drafts being
// verified) or a prefill chunk (causal).
// MLX's CPU SDPA runs ~8 ops for it (two batched matmuls, a where, a softmax with MLX's slow exp:
// ~23 ns an element, which makes a prefill's softmax its largest part); this is one pass over the
// attended keys and values per (row, kv head, query position), or for a long causal prefill
// chunk tiles of query vectors against blocks of keys (attention_prefill.h).
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxd {

namespace mx = mlx::core;

// q [B, Hq, L, D], k [B, Hk, T, D], v [B, Hk, T, Dv] float32 (any strides; views into a cache's
// buffer are read in place), Hq a multiple of Hk. mask: bool [B or 1, 1, L or 1, T], false where
// a key is not attended (padding, outside the window, after the query position); none attends
// every key. causal: query position l also sees only keys t <= T - L + l (MLX's "causal" mask,
// aligned to the last key; T >= L). Returns float32 softmax(scale * q k^T) v as [B, Hq, L, Dv],
// as mx.fast.scaled_dot_product_attention. With `flat` (L == 1 only) the same values come as
// [B, 1, Hq * Dv], the shape an output projection reads (a decode step's reshape node saved).
mx::array decode_attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const std::optional<mx::array>& mask,
    float scale,
    bool causal = false,
    bool flat = false);

class DecodeAttention : public mx::UnaryPrimitive {
 public:
  DecodeAttention(mx::Stream s, float scale, bool causal)
      : mx::UnaryPrimitive(s), scale_(scale), causal_(causal) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxdDecodeAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DecodeAttention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

 private:
  float scale_;
  bool causal_;
};

} // namespace mlxd
