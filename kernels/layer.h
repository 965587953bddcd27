// A decoder layer's decode-step input side as one primitive on the CPU: RMSNorm, the q/k/v
// projections (one pass over the three weights, their rows shared by the threads) and RoPE on q
// and k. Unfused these are six ops and three reshapes per layer, each paying MLX's dispatch.
#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxd {

namespace mx = mlx::core;

// x [B, 1, K] float32, norm_w [K] float32; q/k/v weights [Hq * D, K], [Hk * D, K], [Hk * Dv, K]
// group-32 with `bits`; offset int [B] or [1] (each row's position). Returns q [B, Hq, 1, D] and
// k [B, Hk, 1, D] rotated as mx.fast.rope(dims, traditional, base, scale) does, v [B, Hk, 1, Dv].
// With q_norm_w and k_norm_w ([D] float32; qwen3's and gemma3's per-head norms), each q and k
// head is RMS-normed (eps as the input norm's) before RoPE. With q_bias, k_bias and v_bias
// ([Hq * D], [Hk * D], [Hk * Dv] float32; qwen2's), each is added to its projection first.
std::vector<mx::array> attn_in(
    const mx::array& x,
    const mx::array& norm_w,
    float eps,
    const mx::array& q_w,
    const mx::array& q_s,
    const mx::array& q_b,
    const mx::array& k_w,
    const mx::array& k_s,
    const mx::array& k_b,
    const mx::array& v_w,
    const mx::array& v_s,
    const mx::array& v_b,
    int bits,
    const mx::array& offset,
    int n_heads,
    int n_kv_heads,
    int dims,
    bool traditional,
    float base,
    float scale,
    const std::optional<mx::array>& q_norm_w = std::nullopt,
    const std::optional<mx::array>& k_norm_w = std::nullopt,
    const std::optional<mx::array>& q_bias = std::nullopt,
    const std::optional<mx::array>& k_bias = std::nullopt,
    const std::optional<mx::array>& v_bias = std::nullopt);

class AttnIn : public mx::Primitive {
 public:
  AttnIn(mx::Stream s, int bits, float eps, int dims, bool traditional, float base, float scale)
      : mx::Primitive(s),
        bits_(bits),
        eps_(eps),
        dims_(dims),
        traditional_(traditional),
        base_(base),
        scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxdAttnIn";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const AttnIn&>(other);
    return bits_ == o.bits_ && eps_ == o.eps_ && dims_ == o.dims_ &&
        traditional_ == o.traditional_ && base_ == o.base_ && scale_ == o.scale_;
  }

 private:
  int bits_;
  float eps_;
  int dims_;
  bool traditional_;
  float base_, scale_;
};

} // namespace mlxd
